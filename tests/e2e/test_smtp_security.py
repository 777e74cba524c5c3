"""SMTP security of Receive connectors (issue #4): STARTTLS, AUTH for mailbox users with
brute-force protection, and no open relay. Real node, real sockets and TLS over loopback;
catalogue numbers (reliability.md) in each test."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import time
from typing import Iterator

import pytest

from tests.conftest import MailgateEnv, NodeThread
from tests.smtp import (ALICE, chat, client_tls, free_port, message, read_reply,
                         wait_listening)

PASSWORD = "correct horse battery staple"


@pytest.fixture
def submission(demo_env: MailgateEnv) -> Iterator[tuple[MailgateEnv, int]]:
    """A submission connector: TLS, then AUTH for mailbox users (ExchangeUsers), who may
    relay; alice has a password."""
    port = free_port()
    demo_env.cli("receive-connector", "new", "--name", "Submission", "--bindings",
                 f"127.0.0.1:{port}", "--remote-ip-ranges", "0.0.0.0/0",
                 "--permission-groups", "ExchangeUsers", "--auth-mechanism",
                 "Tls,BasicAuthRequireTLS", "--tarpit-interval", "1s",
                 "--max-logon-failures", "3")
    demo_env.cli("mailbox", "set-password", "alice", "--password-stdin",
                 input=PASSWORD + "\n")
    node = NodeThread(demo_env)
    try:
        wait_listening(port)
        yield demo_env, port
    finally:
        node.stop()


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_t26_auth_needs_tls_then_a_mailbox_password_and_is_rate_limited(
        submission: tuple[MailgateEnv, int]) -> None:
    """T26: AUTH before STARTTLS → 538 5.7.11 and MAIL without AUTH → 530; after TLS,
    wrong passwords are answered 535 only after TarpitInterval and the third failure
    closes the connection (421); the right password on a new connection logs on (235) and
    the user may relay to any domain."""
    env, port = submission
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        c.ehlo("client.test")
        assert b"AUTH" not in (c.ehlo_resp or b"")
        code, _ = c.docmd("AUTH PLAIN " + plain(ALICE, PASSWORD))
        assert code == 538
        assert c.docmd("MAIL FROM:<alice@contoso.test>")[0] == 530
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        c.starttls(context=client_tls())
        c.ehlo("client.test")
        assert b"AUTH LOGIN PLAIN" in (c.ehlo_resp or b"")
        start = time.monotonic()
        codes = []
        for attempt in range(3):
            try:
                codes.append(c.docmd("AUTH PLAIN " + plain(ALICE, f"wrong{attempt}"))[0])
            except smtplib.SMTPServerDisconnected:
                codes.append(0)
        assert codes[:2] == [535, 535] and codes[2] in (535, 421), codes
        assert time.monotonic() - start >= 2.0     # two tarpits of 1 s before attempts 2, 3
        # The 421 follows the third 535; then the connection is closed.
        try:
            after = c.docmd("NOOP")[0]
        except (smtplib.SMTPServerDisconnected, OSError):
            after = 0
        assert after in (421, 0)
        with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
            c.docmd("NOOP")
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        c.starttls(context=client_tls())
        c.ehlo("client.test")
        assert c.login(ALICE, PASSWORD)[0] == 235
        assert c.sendmail(ALICE, ["friend@other.test"], message("relayed")) == {}


def test_t26_secrets_never_reach_the_log(demo_env: MailgateEnv) -> None:
    """T26: with the node as a real process, neither the password nor the AUTH blob appears
    in its log, while the failure itself is logged."""
    port = free_port()
    demo_env.cli("receive-connector", "new", "--name", "Submission", "--bindings",
                 f"127.0.0.1:{port}", "--permission-groups", "ExchangeUsers",
                 "--auth-mechanism", "Tls,BasicAuthRequireTLS", "--tarpit-interval", "0s")
    demo_env.cli("mailbox", "set-password", "alice", "--password-stdin",
                 input=PASSWORD + "\n")
    demo_env.start()
    try:
        wait_listening(port)
        blob = plain(ALICE, "Sup3r-secret-guess")
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.starttls(context=client_tls())
            c.ehlo("client.test")
            assert c.docmd("AUTH PLAIN " + blob)[0] == 535
            assert c.login(ALICE, PASSWORD)[0] == 235
    finally:
        demo_env.stop()
    log = demo_env.log.read_text()
    assert "SMTP AUTH failed" in log
    for secret in ("Sup3r-secret-guess", blob, PASSWORD, plain(ALICE, PASSWORD)):
        assert secret not in log


def test_t24_starttls_discards_injected_commands_and_resets_the_session(
        demo_env: MailgateEnv) -> None:
    """T24: `STARTTLS\\r\\nNOOP\\r\\n` in one write: the NOOP sent in clear is discarded, not
    answered inside TLS; after the handshake MAIL before a new EHLO is 503; a second
    STARTTLS is refused; TLS below 1.2 is refused."""
    port = free_port()
    demo_env.cli("receive-connector", "new", "--name", "Default", "--bindings",
                 f"127.0.0.1:{port}", "--permission-groups", "AnonymousUsers")
    node = NodeThread(demo_env)
    try:
        wait_listening(port)
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        read_reply(s)
        assert b"STARTTLS" in chat(s, b"EHLO client.test")
        s.sendall(b"STARTTLS\r\nNOOP\r\n")
        assert read_reply(s).startswith(b"220")
        tls = client_tls().wrap_socket(s, server_hostname="localhost")
        tls.settimeout(2.0)
        with pytest.raises(socket.timeout):
            tls.recv(1024)
        tls.settimeout(10)
        assert chat(tls, b"MAIL FROM:<bob@fabrikam.test>").startswith(b"503")  # type: ignore[arg-type]
        assert b"STARTTLS" not in chat(tls, b"EHLO client.test")  # type: ignore[arg-type]
        assert chat(tls, b"STARTTLS")[:1] == b"5"  # type: ignore[arg-type]
        assert chat(tls, b"MAIL FROM:<bob@fabrikam.test>").startswith(b"250")  # type: ignore[arg-type]
        tls.close()
        import warnings

        old = client_tls()
        with warnings.catch_warnings():   # TLS 1.0/1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        try:
            old.set_ciphers("ALL:@SECLEVEL=0")
        except ssl.SSLError:
            pass
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        read_reply(s)
        chat(s, b"EHLO client.test")
        assert chat(s, b"STARTTLS").startswith(b"220")
        with pytest.raises((ssl.SSLError, OSError)):
            old.wrap_socket(s, server_hostname="localhost")
        s.close()
    finally:
        node.stop()


def test_t27_no_open_relay(demo_env: MailgateEnv) -> None:
    """T27: on one binding, a connector for everybody (AnonymousUsers) and one for the
    trusted host 127.0.0.1 only (ExchangeServers, may relay). From 127.0.0.66 every relay
    form is refused at RCPT and local delivery still works in the same session; from
    127.0.0.1 relaying is allowed."""
    port = free_port()
    demo_env.cli("receive-connector", "new", "--name", "Default", "--bindings",
                 f"0.0.0.0:{port}", "--remote-ip-ranges", "0.0.0.0/0",
                 "--permission-groups", "AnonymousUsers")
    demo_env.cli("receive-connector", "new", "--name", "Relay", "--bindings",
                 f"0.0.0.0:{port}", "--remote-ip-ranges", "127.0.0.1",
                 "--permission-groups", "ExchangeServers")
    node = NodeThread(demo_env)
    try:
        wait_listening(port)
        with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.66", 0),
                          timeout=20) as c:
            c.ehlo("outside.test")
            c.mail("spammer@example.test")
            for rcpt in ("user@other.test", '"user@other.test"@contoso.test',
                         "user%other.test@contoso.test", "other.test!user@contoso.test",
                         "@contoso.test:user@other.test", "user@[127.0.0.1]"):
                code, text = c.docmd(f"RCPT TO:<{rcpt}>")
                assert code == 550 and text[:4] in (b"5.7.", b"5.1."), (rcpt, code, text)
            assert c.docmd("RCPT TO:<user@other.test@contoso.test>")[0] == 501
            assert c.rcpt(ALICE)[0] == 250
            assert c.data(message("local"))[0] == 250
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            assert c.sendmail("app@contoso.test", ["user@other.test"], message("out")) == {}
    finally:
        node.stop()
