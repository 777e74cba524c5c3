"""SMTP in through Receive connectors (issue #4), against a running node over loopback with
real clients (Python's smtplib and raw sockets). Each test names the reliability catalogue
entry it implements (../shared/reference/reliability.md)."""

from __future__ import annotations

import smtplib
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import MailgateEnv, NodeThread, wait_for
from tests.delivered import mailbox_files
from tests.smtp import (
    ALICE,
    Smtp,
    add_connector,
    delivered_ids,
    free_port,
    message,
    chat,
    read_reply,
    start_data,
    wait_listening,
)


@pytest.fixture
def smtp(demo_env: MailgateEnv) -> Iterator[Smtp]:
    port = free_port()
    add_connector(demo_env, port, "--max-hop-count", "30")
    node = NodeThread(demo_env)
    try:
        wait_listening(port)
        yield Smtp(demo_env, port)
    finally:
        node.stop()


def test_accepted_domain_mail_is_delivered_and_other_domains_are_not_relayed(
        smtp: Smtp) -> None:
    """AnonymousUsers: a message for alice and for a fax number (IMCEA) is accepted with
    250 after it is stored, and lands in the Maildir and the Drop directory; a recipient in
    a domain that is not accepted gets 550 5.7.54 and an unknown mailbox 550 5.1.1, at RCPT
    (T27 for the relay part)."""
    with smtp.client() as c:
        c.ehlo("client.test")
        assert b"DSN" in c.ehlo_resp and b"PIPELINING" in c.ehlo_resp  # type: ignore[operator]
        code, _ = c.mail("bob@fabrikam.test")
        assert code == 250
        assert c.rcpt(ALICE)[0] == 250
        assert c.rcpt("IMCEAFAX-+2B16661234@contoso.test")[0] == 250
        code, text = c.rcpt("someone@other.test")
        assert (code, text[:6]) == (550, b"5.7.54")
        code, text = c.rcpt("nobody@contoso.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = c.data(message("one"))
        assert code == 250 and text.startswith(b"2.6.0"), text
    wait_for(lambda: delivered_ids(smtp.env) == ["one"], what="alice's copy")
    drops = wait_for(lambda: list((smtp.env.drop / "Fax").glob("*.eml")), what="the fax")
    data = drops[0].read_bytes()  # type: ignore[index]
    assert b"X-Receiver: <FAX:+16661234>" in data and b"body of one" in data
    [mail] = mailbox_files(smtp.env)
    head = mail.read_bytes().split(b"\n\n", 1)[0]
    assert b"Received: from client.test ([127.0.0.1]) by " in head and b" with ESMTP;" in head


def test_dsn_parameters_are_kept_with_the_message(smtp: Smtp) -> None:
    """MAIL RET/ENVID and RCPT NOTIFY/ORCPT are accepted and travel with the message (they
    appear in the Drop file's envelope); the null sender is accepted."""
    with smtp.client() as c:
        c.ehlo("client.test")
        assert c.docmd("MAIL FROM:<> RET=HDRS ENVID=QQ+2B1")[0] == 250
        assert c.docmd("RCPT TO:<IMCEAFAX-+2B16660001@contoso.test> NOTIFY=SUCCESS,FAILURE "
                       "ORCPT=rfc822;fax+2B1@contoso.test")[0] == 250
        assert c.docmd("DATA")[0] == 354
        c.send(b"Subject: dsn\r\n\r\nx\r\n.\r\n")
        assert c.getreply()[0] == 250
    [drop] = wait_for(lambda: list((smtp.env.drop / "Fax").glob("*.eml")),  # type: ignore[misc]
                      what="the fax")
    head = drop.read_bytes().split(b"X-EndOfInjectedXHeaders", 1)[0]
    assert b"X-Sender: <> RET=HDRS ENVID=QQ+2B1" in head
    assert b"NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;fax+2B1@contoso.test" in head


def test_t16_loop_detection_by_received_count(smtp: Smtp) -> None:
    """T16: with MaxHopCount 30, messages with 29 and 30 Received fields are accepted and
    31 or 101 are refused at the end of DATA with 554 5.4.0; the refused ones are never
    acknowledged or queued."""
    results = {}
    for hops in (29, 30, 31, 101):
        received = "".join(f"Received: from hop{i}.test by hop{i + 1}.test; "
                           f"Mon, 30 Nov 2026 10:00:00 +0000\r\n" for i in range(hops))
        with smtp.client() as c:
            try:
                c.sendmail("bob@fabrikam.test", [ALICE], received.encode() + message(f"h{hops}"))
                results[hops] = 250
            except smtplib.SMTPDataError as exc:
                results[hops] = exc.smtp_code
                assert exc.smtp_error.startswith(b"5.4.0")
    assert results == {29: 250, 30: 250, 31: 554, 101: 554}
    wait_for(lambda: delivered_ids(smtp.env) == ["h29", "h30"], what="the two accepted")


SMUGGLING = [
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r",
]


@pytest.mark.parametrize("terminator", SMUGGLING)
def test_t17_inbound_smuggling_is_refused_as_a_whole(smtp: Smtp, terminator: bytes) -> None:
    """T17: a body with a fake end of data followed by a second transaction is refused as a
    whole (550 5.6.0) once the real CRLF.CRLF arrives; nothing from the smuggled sender is
    ever queued, and the session stays usable for a clean message."""
    s = smtp.raw()
    start_data(s)
    s.sendall(message("first") + terminator + b"MAIL FROM:<smuggled@example.test>\r\n"
              b"RCPT TO:<alice@contoso.test>\r\nDATA\r\nSubject: smuggled\r\n"
              b"X-Test-Id: smuggled\r\n\r\nevil\r\n.\r\n")
    reply = read_reply(s)
    assert reply.startswith(b"550 5.6.0"), reply
    assert chat(s, b"MAIL FROM:<bob@fabrikam.test>").startswith(b"250")
    assert chat(s, f"RCPT TO:<{ALICE}>".encode()).startswith(b"250")
    assert chat(s, b"DATA").startswith(b"354")
    s.sendall(message("clean") + b".\r\n")
    assert read_reply(s).startswith(b"250")
    s.close()
    wait_for(lambda: delivered_ids(smtp.env) == ["clean"], what="the clean message")
    time.sleep(0.5)
    assert delivered_ids(smtp.env) == ["clean"]


@pytest.mark.parametrize("line", [
    b"EHLO x\n", b"EHLO evil.test\rX-Injected: yes\r\n", b"MAIL FROM:<a@example.test>\n",
    b"NOOP \x00\r\n",
])
def test_t19_bare_cr_or_lf_in_commands_is_refused(smtp: Smtp, line: bytes) -> None:
    """T19: a command line with a bare LF, a stray CR or NUL is refused with 500 5.5.2 and
    changes nothing; the session goes on."""
    s = smtp.raw()
    s.sendall(line)
    assert read_reply(s).startswith(b"500 5.5.2")
    s.sendall(b"EHLO ok.test\r\n")
    assert read_reply(s).startswith(b"250")
    s.close()


def test_t19_received_header_never_carries_control_characters(smtp: Smtp) -> None:
    """T19: whatever the client says in EHLO, our Received field has no CR, LF or NUL and
    re-parsing the stored message finds no injected header."""
    s = smtp.raw()
    start_data(s, b"evil\x01.test")
    s.sendall(message("helo") + b".\r\n")
    assert read_reply(s).startswith(b"250")
    s.close()
    [mail] = wait_for(lambda: mailbox_files(smtp.env), what="the message")  # type: ignore[misc]
    [received] = [line for line in mail.read_bytes().split(b"\n")
                  if line.startswith(b"Received: ")]
    assert received.startswith(b"Received: from evil?.test ([127.0.0.1]) by ")


def test_t20_line_limits(smtp: Smtp) -> None:
    """T20: a 1000-octet text line is accepted, 1001 refused (554 5.6.0); a command line
    far over the limit is refused and the session stays usable; a following valid message
    in the same session is delivered."""
    with smtp.client() as c:
        c.ehlo("client.test")
        ok = message("l1000", "X-Long: " + "a" * (1000 - 10) + "\r\n")
        assert c.sendmail("bob@fabrikam.test", [ALICE], ok) == {}
        long_line = message("l1001", "X-Long: " + "a" * (1001 - 10) + "\r\n")
        with pytest.raises(smtplib.SMTPDataError) as exc:
            c.sendmail("bob@fabrikam.test", [ALICE], long_line)
        assert exc.value.smtp_code == 554
        code, _ = c.docmd("NOOP " + "x" * 5000)
        assert code == 500
        assert c.sendmail("bob@fabrikam.test", [ALICE], message("after")) == {}
    wait_for(lambda: delivered_ids(smtp.env) == ["after", "l1000"], what="two messages")


def test_t21_recipient_limit(smtp: Smtp) -> None:
    """T21: MaxRecipientsPerMessage 200: recipients beyond it get 452 4.5.3, the earlier
    ones are kept and the message is accepted for them."""
    with smtp.client() as c:
        c.ehlo("client.test")
        c.mail("bob@fabrikam.test")
        for i in range(200):
            assert c.rcpt(f"IMCEAFAX-+2B1666{i:04d}@contoso.test")[0] == 250
        code, text = c.rcpt(ALICE)
        assert (code, text[:5]) == (452, b"4.5.3")
        assert c.data(message("many"))[0] == 250
    [drop] = wait_for(lambda: list((smtp.env.drop / "Fax").glob("*.eml")),  # type: ignore[misc]
                      what="the fax")
    assert drop.read_bytes().count(b"X-Receiver:") == 200


def test_t22_size_limit(smtp: Smtp) -> None:
    """T22: SIZE over MaxMessageSize is refused at MAIL (552 5.3.4); a body over it without
    SIZE is refused after the terminator; nothing is queued."""
    smtp.env.cli("receive-connector", "set", "Default", "--max-message-size", "64KB")
    time.sleep(1.5)  # the listener applies the change
    with smtp.client() as c:
        c.ehlo("client.test")
        code, text = c.docmd("MAIL FROM:<bob@fabrikam.test> SIZE=65537")
        assert (code, text[:5]) == (552, b"5.3.4")
    s = smtp.raw()
    start_data(s)
    s.sendall(message("big", "X-Pad: " + "p" * 900 + "\r\n") * 80 + b".\r\n")
    assert read_reply(s).startswith(b"552 5.3.4")
    s.close()
    time.sleep(0.5)
    assert delivered_ids(smtp.env) == []


def test_t23_pipelined_transaction_in_one_write(smtp: Smtp) -> None:
    """T23: MAIL, RCPT, DATA and the body in one write are handled in order: each reply
    comes, the message is accepted once and delivered once; a second MAIL right after the
    terminator in the same write starts a new transaction."""
    s = smtp.raw()
    s.sendall(b"EHLO client.test\r\n")
    read_reply(s)
    s.sendall(b"MAIL FROM:<bob@fabrikam.test>\r\nRCPT TO:<alice@contoso.test>\r\nDATA\r\n"
              + message("piped") + b".\r\nMAIL FROM:<bob@fabrikam.test>\r\nRSET\r\nQUIT\r\n")
    data = b""
    while b"221" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    codes = [line[:3] for line in data.split(b"\r\n") if line]
    assert codes == [b"250", b"250", b"354", b"250", b"250", b"250", b"221"], data
    s.close()
    wait_for(lambda: delivered_ids(smtp.env) == ["piped"], what="the message")


def test_t31_connection_limits(smtp: Smtp) -> None:
    """T30/T31: MaxInboundConnectionPerSource: the connection over the cap gets 421 4.3.2
    and is closed; a client from another source address is still served; once the
    connections close, the source is served again."""
    smtp.env.cli("receive-connector", "set", "Default", "--max-inbound-connection-per-source",
                 "5")
    time.sleep(1.5)
    held = [smtp.raw() for _ in range(5)]
    s = socket.create_connection(("127.0.0.1", smtp.port), timeout=10)
    assert read_reply(s).startswith(b"421 ")
    s.close()
    other = smtp.raw(source="127.0.0.2")
    assert chat(other, b"QUIT").startswith(b"221")
    other.close()
    for h in held:
        h.close()
    time.sleep(0.3)
    with smtp.client() as c:
        assert c.ehlo("client.test")[0] == 250


def test_t30_a_trickling_client_is_cut_off_but_a_steady_upload_is_not(smtp: Smtp) -> None:
    """T30: with ConnectionInactivityTimeout 2 s, a client that sends one byte of a command
    every second is disconnected; a client uploading a message in pieces every 0.5 s
    (faster than the minimum data rate) completes and is delivered."""
    smtp.env.cli("receive-connector", "set", "Default", "--connection-inactivity-timeout",
                 "2s")
    time.sleep(1.5)
    s = smtp.raw()
    start = time.monotonic()
    closed = False
    for ch in b"EHLO slowloris.test":
        try:
            s.sendall(bytes([ch]))
            if s.recv(1024, socket.MSG_DONTWAIT) == b"":
                closed = True
                break
        except BlockingIOError:
            pass
        except OSError:
            closed = True
            break
        time.sleep(1.0)
    assert closed and time.monotonic() - start < 8
    s.close()
    s = smtp.raw()
    start_data(s, b"steady.test")
    body = message("steady", "".join(f"X-Pad-{i}: {'p' * 900}\r\n" for i in range(20)))
    for i in range(0, len(body), 2048):
        s.sendall(body[i:i + 2048])
        time.sleep(0.5)
    s.sendall(b".\r\n")
    assert read_reply(s).startswith(b"250")
    s.close()
    wait_for(lambda: delivered_ids(smtp.env) == ["steady"], what="the steady message")


def test_inactivity_is_counted_from_the_last_command(smtp: Smtp) -> None:
    """ConnectionInactivityTimeout 2 s: a session that sends a command every 1.2 s lives on
    past 2 s; once it stops, it is closed about 2 s after its last command."""
    smtp.env.cli("receive-connector", "set", "Default", "--connection-inactivity-timeout",
                 "2s")
    time.sleep(1.5)
    s = smtp.raw()
    for _ in range(3):
        s.sendall(b"NOOP\r\n")
        assert read_reply(s).startswith(b"250")
        time.sleep(1.2)
    s.sendall(b"NOOP\r\n")
    assert read_reply(s).startswith(b"250")
    last = time.monotonic()
    s.settimeout(10)
    rest = b""
    while chunk := s.recv(1024):
        rest += chunk
    waited = time.monotonic() - last
    assert 1.5 < waited < 4, waited
    s.close()


def test_connection_timeout_ends_a_busy_session(smtp: Smtp) -> None:
    """ConnectionTimeout 3 s: a session that keeps sending commands (never inactive for
    long) is still ended with 421 about 3 s after it connected."""
    smtp.env.cli("receive-connector", "set", "Default", "--connection-inactivity-timeout",
                 "2s", "--connection-timeout", "3s")
    time.sleep(1.5)
    started = time.monotonic()
    s = smtp.raw()
    s.settimeout(10)
    replies = b""
    while time.monotonic() - started < 8:
        try:
            s.sendall(b"NOOP\r\n")
            reply = read_reply(s)
        except OSError:
            break
        replies += reply
        if not reply or reply.startswith(b"421"):
            break
        time.sleep(0.5)
    ended = time.monotonic() - started
    s.close()
    assert b"421" in replies, replies
    assert 2.5 < ended < 5, ended


def test_help_lists_the_commands_and_explains_one(smtp: Smtp) -> None:
    """HELP (RFC 5321 4.1.1.8) answers from the session's command table."""
    s = smtp.raw()
    s.sendall(b"HELP\r\n")
    listing = read_reply(s)
    assert listing.startswith(b"250") and b"MAIL" in listing and b"BDAT" in listing
    s.sendall(b"HELP MAIL\r\n")
    assert b"MAIL FROM:" in read_reply(s)
    s.sendall(b"HELP NOSUCH\r\n")
    assert read_reply(s).startswith(b"501")
    s.close()


def test_t33_header_injection_by_bare_lf_is_refused(smtp: Smtp) -> None:
    """T33: `Subject: a\\nBcc: hidden@...` and `Subject: a\\rX-Injected: 1` in DATA are
    refused (550 5.6.0): no extra recipient, nothing queued."""
    for head in (b"Subject: a\nBcc: hidden@contoso.test\r\n", b"Subject: a\rX-Injected: 1\r\n"):
        with smtp.client() as c:
            with pytest.raises(smtplib.SMTPDataError) as exc:
                c.sendmail("bob@fabrikam.test", [ALICE], head + b"\r\nbody\r\n")
            assert exc.value.smtp_code == 550
    time.sleep(0.5)
    assert mailbox_files(smtp.env) == []


def test_t28_addresses_with_controls_or_source_routes(smtp: Smtp) -> None:
    """T28/T27: addresses with control characters or bad syntax are refused at MAIL/RCPT
    with 501; source routes are stripped (RFC 5321 4.1.2) so `@our.test:user@other.test`
    is judged as user@other.test (not relayed); `%`, `!` and quoted `@` forms of another
    domain are no mailbox of ours (550)."""
    with smtp.client() as c:
        c.ehlo("client.test")
        assert c.docmd("MAIL FROM:<a\x01b@fabrikam.test>")[0] == 501
        assert c.docmd("MAIL FROM:<no-at-sign>")[0] == 501
        assert c.docmd("MAIL FROM:<@relay.test:bob@fabrikam.test>")[0] == 250
        for rcpt, code in (("@contoso.test:user@other.test", 550),
                           ("user%other.test@contoso.test", 550),
                           ("other.test!user@contoso.test", 550),
                           ('"user@other.test"@contoso.test', 550),
                           ("user@other.test@contoso.test", 501),
                           ("user@[127.0.0.1]", 550)):
            assert c.docmd(f"RCPT TO:<{rcpt}>")[0] == code, rcpt


def test_t20_command_line_and_path_limits(smtp: Smtp) -> None:
    """T20: a command line of 512 octets (CRLF included) is accepted and 513 refused
    (500 5.5.2); a path of 256 octets (with its brackets) is accepted and 257 refused
    (501); a domain over 255 octets is refused; the session stays usable and a message
    sent after all that is delivered."""
    s = smtp.raw()
    assert chat(s, b"EHLO client.test").startswith(b"250")
    assert chat(s, b"NOOP " + b"x" * (512 - 7)).startswith(b"250")
    assert chat(s, b"NOOP " + b"x" * (513 - 7)).startswith(b"500")
    local = "b" * 64
    domain = ("d" * 62 + ".") * 2 + "d" * 63
    fits = local + "@" + domain
    assert len(fits) == 254
    assert chat(s, f"MAIL FROM:<{fits}>".encode()).startswith(b"250")
    assert chat(s, b"RSET").startswith(b"250")
    assert chat(s, f"MAIL FROM:<{fits}y>".encode()).startswith(b"501")
    long_domain = ("d" * 63 + ".") * 4
    assert chat(s, f"MAIL FROM:<a@{long_domain[:256]}>".encode()).startswith(b"501")
    assert chat(s, b"MAIL FROM:<bob@fabrikam.test>").startswith(b"250")
    assert chat(s, f"RCPT TO:<{ALICE}>".encode()).startswith(b"250")
    assert chat(s, b"DATA").startswith(b"354")
    s.sendall(message("after-limits") + b".\r\n")
    assert read_reply(s).startswith(b"250")
    s.close()
    wait_for(lambda: delivered_ids(smtp.env) == ["after-limits"], what="the message")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_t20_a_100_mb_line_costs_no_memory(demo_env: MailgateEnv) -> None:
    """T20: 100 MB without a line end, as a command and inside DATA, are refused (500 /
    554 5.6.0) with the node's peak RSS growing by less than 50 MB; a following valid
    message in the same session is delivered."""
    port = free_port()
    add_connector(demo_env, port, "--max-message-size", "200MB")
    proc = demo_env.start()
    try:
        wait_listening(port)
        before = peak_rss_mb(proc.pid)
        chunk = b"x" * (1 << 20)
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        read_reply(s)
        assert chat(s, b"EHLO client.test").startswith(b"250")
        s.sendall(b"NOOP ")
        for _ in range(100):
            s.sendall(chunk)
        assert chat(s, b"").startswith(b"500")
        start_data(s)
        for _ in range(100):
            s.sendall(chunk)
        s.sendall(b"\r\n.\r\n")
        assert read_reply(s).startswith(b"554 5.6.0")
        assert chat(s, b"MAIL FROM:<bob@fabrikam.test>").startswith(b"250")
        assert chat(s, f"RCPT TO:<{ALICE}>".encode()).startswith(b"250")
        assert chat(s, b"DATA").startswith(b"354")
        s.sendall(message("after-100mb") + b".\r\n")
        assert read_reply(s).startswith(b"250")
        s.close()
        growth = peak_rss_mb(proc.pid) - before
        assert growth < 50, f"peak RSS grew by {growth:.0f} MB"
        wait_for(lambda: delivered_ids(demo_env) == ["after-100mb"], what="the message")
    finally:
        demo_env.stop()
