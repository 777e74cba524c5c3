"""Helpers for the SMTP receive tests: a node's Receive connector on a free loopback port,
raw-socket replies, and message bodies that carry an X-Test-Id."""

from __future__ import annotations

import smtplib
import socket
import ssl

from tests.conftest import MailgateEnv
from tests.delivered import mailbox_files
from tests.peers import free_port, wait_port  # noqa: F401 - free_port is for the SMTP tests

ALICE = "alice@contoso.test"


def client_tls() -> ssl.SSLContext:
    """A client context that does not check the server's certificate: the node's is
    self-signed, and the tests check the protocol, not the trust."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def add_connector(env: MailgateEnv, port: int, *args: str, name: str = "Default") -> None:
    """A Receive connector for everybody on 127.0.0.1:<port> (AnonymousUsers)."""
    env.cli("receive-connector", "new", "--name", name, "--bindings", f"127.0.0.1:{port}",
            "--remote-ip-ranges", "0.0.0.0/0", "--permission-groups", "AnonymousUsers",
            *args)


def message(test_id: str, extra: str = "") -> bytes:
    return (f"From: bob@fabrikam.test\r\nTo: {ALICE}\r\nSubject: {test_id}\r\n"
            f"X-Test-Id: {test_id}\r\n{extra}\r\nbody of {test_id}\r\n").encode()


def delivered_ids(env: MailgateEnv) -> list[str]:
    """The X-Test-Id of every message in alice's Maildir, sorted (repeats kept)."""
    out = []
    for p in mailbox_files(env):
        for line in p.read_bytes().splitlines():
            if line.startswith(b"X-Test-Id: "):
                out.append(line[11:].decode().strip())
    return sorted(out)


class Smtp:
    """A node with one Receive connector on 127.0.0.1:<port>."""

    def __init__(self, env: MailgateEnv, port: int) -> None:
        self.env = env
        self.port = port

    def client(self, source: str = "127.0.0.1") -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, source_address=(source, 0), timeout=20)

    def raw(self, source: str = "127.0.0.1") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=20,
                                     source_address=(source, 0))
        assert read_reply(s).startswith(b"220")
        return s


_leftover: dict[int, bytes] = {}


def read_reply(s: socket.socket) -> bytes:
    """Exactly one whole (possibly multi-line) reply; what the server sent after it (a
    pipelined reply) is kept for the next call. b"" when the connection closed first."""
    data = _leftover.pop(id(s), b"")
    while True:
        pos = 0
        while (end := data.find(b"\r\n", pos)) >= 0:
            if data[pos + 3:pos + 4] != b"-":
                if data[end + 2:]:
                    _leftover[id(s)] = data[end + 2:]
                return data[:end + 2]
            pos = end + 2
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def wait_listening(port: int) -> None:
    wait_port(port)




def chat(s: socket.socket, line: bytes) -> bytes:
    """Send one command line (CRLF added) and read its reply."""
    s.sendall(line + b"\r\n")
    return read_reply(s)


def start_data(s: socket.socket, helo: bytes = b"client.test") -> None:
    """EHLO, MAIL from bob, RCPT to alice, DATA: each answered as expected."""
    assert chat(s, b"EHLO " + helo).startswith(b"250")
    assert chat(s, b"MAIL FROM:<bob@fabrikam.test>").startswith(b"250")
    assert chat(s, f"RCPT TO:<{ALICE}>".encode()).startswith(b"250")
    assert chat(s, b"DATA").startswith(b"354")
