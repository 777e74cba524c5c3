"""Floods against a running `mailgate serve` (reliability catalogue T30 and T31 at full
scale): hundreds of trickling connections, thousands of held connections, and a node out
of file descriptors. Real sockets from many loopback source addresses (127.0.0.x)."""

from __future__ import annotations

import os
import resource
import selectors
import socket
import threading
import time
from collections import Counter
from typing import Iterator

import pytest

from tests.conftest import MailgateEnv, drop_file, wait_for
from tests.smtp import add_connector, delivered_ids, free_port, message, read_reply
from tests.smtp import start_data, wait_listening


@pytest.fixture
def opened() -> Iterator[list[socket.socket]]:
    """Client sockets a test holds: closed at its end, whatever happened."""
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def _own_open_files(at_least: int) -> None:
    """This test process holds thousands of sockets: raise its soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else at_least
    assert limit >= at_least, f"the open files hard limit ({hard}) is below {at_least}"
    if soft != resource.RLIM_INFINITY and soft < at_least:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def _connect(port: int, source: str) -> socket.socket:
    s = socket.socket()
    try:
        s.bind((source, 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
    except OSError:
        s.close()
        raise
    return s


def _first_replies(socks: list[socket.socket], timeout: float) -> list[str]:
    """The code of each socket's first reply ("closed" when it closed first, "none" when
    nothing came within `timeout`)."""
    codes = ["none"] * len(socks)
    sel = selectors.DefaultSelector()
    for n, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, n)
    deadline = time.monotonic() + timeout
    left = len(socks)
    while left and time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(512)
            except OSError:
                data = b""
            codes[key.data] = data[:3].decode() if data else "closed"
            sel.unregister(s)
            left -= 1
    sel.close()
    for s in socks:
        s.setblocking(True)
        s.settimeout(10)
    return codes


def _send(port: int, source: str, test_id: str) -> None:
    """One message for alice from `source`, on a connection of its own: 250 expected."""
    with _connect(port, source) as s:
        assert read_reply(s).startswith(b"220")
        start_data(s, test_id.encode() + b".test")
        s.sendall(message(test_id) + b".\r\n")
        assert read_reply(s).startswith(b"250")


def _pickup(env: MailgateEnv, test_id: str) -> None:
    drop_file(env.pickup, f"{test_id}.eml", message(test_id))


def _node_log(env: MailgateEnv) -> str:
    return env.log.read_text(errors="replace")


def test_t30_trickling_flood_slow_upload_and_a_legitimate_client(
        demo_env: MailgateEnv, opened: list[socket.socket]) -> None:
    """T30: (a) 200 connections from one source, each sending a byte a second: the per-source
    cap (20) refuses 180 with 421 and the 20 admitted are closed by the inactivity deadline
    (3 s here) because no command ever completes; (b) meanwhile a client on another source
    is served within 5 s; (c) meanwhile a 3 MB message uploaded at 200 KB/s (15 s, five
    times the deadline) is not cut off. (b) and (c) are delivered."""
    env = demo_env
    _own_open_files(1024)
    port = free_port()
    add_connector(env, port, "--max-inbound-connection-per-source", "20",
                  "--connection-inactivity-timeout", "3s", "--max-message-size", "10MB")
    env.start()
    wait_listening(port)

    upload: dict[str, object] = {}

    def slow_upload() -> None:
        s = _connect(port, "127.0.0.3")
        assert read_reply(s).startswith(b"220")
        start_data(s, b"steady.test")
        line = b"y" * 998 + b"\r\n"
        body = message("steady-3mb", "".join(f"X-Pad: {i}\r\n" for i in range(3)))
        body += line * (3 * 1024 * 1024 // len(line))
        t0 = time.monotonic()
        for i in range(0, len(body), 20 * 1024):   # 20 KB every 0.1 s: 200 KB/s
            s.sendall(body[i:i + 20 * 1024])
            time.sleep(max(0.0, t0 + (i // (20 * 1024) + 1) * 0.1 - time.monotonic()))
        s.sendall(b".\r\n")
        upload["reply"] = read_reply(s)
        upload["seconds"] = time.monotonic() - t0
        s.close()

    uploader = threading.Thread(target=slow_upload)
    uploader.start()
    trickle = [_connect(port, "127.0.0.2") for _ in range(200)]
    opened.extend(trickle)
    codes = _first_replies(trickle, 10)
    assert Counter(codes) == Counter({"220": 20, "421": 180}), Counter(codes)
    admitted = [s for s, code in zip(trickle, codes) if code == "220"]
    t0 = time.monotonic()
    closed_at: dict[int, float] = {}
    served_in = None
    while len(closed_at) < len(admitted) and time.monotonic() - t0 < 15:
        for n, s in enumerate(admitted):
            if n in closed_at:
                continue
            try:
                s.send(b"E")
                s.setblocking(False)
                if s.recv(512) == b"":
                    closed_at[n] = time.monotonic() - t0
            except BlockingIOError:
                pass
            except OSError:
                closed_at[n] = time.monotonic() - t0
            finally:
                if s.fileno() != -1:
                    s.setblocking(True)
        if served_in is None:
            # (b) while the trickle goes on: a normal client from another address.
            b0 = time.monotonic()
            _send(port, "127.0.0.4", "legit")
            served_in = time.monotonic() - b0
        time.sleep(1.0)
    assert len(closed_at) == 20, f"{len(closed_at)} of 20 trickling sessions closed"
    assert max(closed_at.values()) < 8, closed_at
    assert served_in is not None and served_in < 5, served_in
    uploader.join(60)
    reply, seconds = upload.get("reply"), upload.get("seconds")
    assert isinstance(reply, bytes) and reply.startswith(b"250"), upload
    assert isinstance(seconds, float) and seconds > 14, upload
    wait_for(lambda: delivered_ids(env) == ["legit", "steady-3mb"], timeout=30,
             what="the legitimate and the slow message")


def test_t31_flood_of_held_connections(demo_env: MailgateEnv,
                                       opened: list[socket.socket]) -> None:
    """T31: 2,000 connections from 40 addresses are opened and held against a connector
    with MaxInboundConnection 1000: exactly 1,000 are served, 1,000 get 421 4.3.2 and are
    closed. During the flood the CLI answers, a new client gets 421 (not a hang), and mail
    from Pickup is still delivered; afterwards new sessions are served again."""
    env = demo_env
    _own_open_files(4096)
    port = free_port()
    add_connector(env, port, "--max-inbound-connection", "1000",
                  "--max-inbound-connection-per-source", "100")
    proc = env.start()
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (1500, 1500))
    wait_listening(port)
    held = [_connect(port, f"127.0.1.{1 + i // 50}") for i in range(2000)]
    opened.extend(held)
    codes = Counter(_first_replies(held, 30))
    assert codes == Counter({"220": 1000, "421": 1000}), codes
    late = _connect(port, "127.0.2.1")
    reply = read_reply(late)   # in place of the greeting: "421 <host> 4.3.2 ..."
    assert reply.startswith(b"421 ") and b" 4.3.2 " in reply, reply
    late.close()
    assert env.cli("queue", "get").returncode == 0
    _pickup(env, "during-flood")
    wait_for(lambda: delivered_ids(env) == ["during-flood"], timeout=30,
             what="Pickup mail delivered during the flood")
    for s in held:
        s.close()
    time.sleep(0.5)
    _send(port, "127.0.2.2", "after-flood")
    wait_for(lambda: delivered_ids(env) == ["after-flood", "during-flood"], timeout=30,
             what="mail after the flood")
    assert proc.poll() is None and "Traceback" not in _node_log(env)


def test_t31_a_node_out_of_file_descriptors_keeps_running(
        demo_env: MailgateEnv, opened: list[socket.socket]) -> None:
    """T31 (no EMFILE crash): with only 40 descriptors to spare, 300 connections exhaust
    them. The node does not crash; once the connections are gone (and the limit is back)
    it serves SMTP and delivers again, and nothing accepted is lost."""
    env = demo_env
    _own_open_files(1024)
    port = free_port()
    add_connector(env, port, "--max-inbound-connection-per-source", "1000")
    proc = env.start()
    wait_listening(port)
    _send(port, "127.0.3.1", "before-emfile")
    wait_for(lambda: delivered_ids(env) == ["before-emfile"], what="the first message")
    in_use = len(os.listdir(f"/proc/{proc.pid}/fd"))
    # Only the soft limit: raising a hard limit back needs a privilege tests may not have.
    soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (in_use + 40, hard))
    flood: list[socket.socket] = []
    for i in range(300):
        try:
            flood.append(_connect(port, f"127.0.3.{2 + i // 100}"))
        except OSError:
            break   # the backlog is full: the node no longer accepts
    opened.extend(flood)
    codes = Counter(_first_replies(flood, 5))
    assert codes["220"] <= 40 and codes["220"] + codes["421"] < 300, codes
    assert proc.poll() is None, "the node died out of file descriptors"
    log = _node_log(env)
    # One line every 10 s, not asyncio's traceback for every failed accept().
    assert "out of file descriptors" in log, log[-3000:]
    assert "socket.accept() out of system resource" not in log, log[-3000:]
    for s in flood:
        s.close()
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    time.sleep(2)   # asyncio retries accept() a second after EMFILE
    _send(port, "127.0.3.9", "after-emfile")
    _pickup(env, "pickup-after")
    wait_for(lambda: delivered_ids(env) == ["after-emfile", "before-emfile", "pickup-after"],
             timeout=30, what="mail after the descriptors came back")
    assert proc.poll() is None
