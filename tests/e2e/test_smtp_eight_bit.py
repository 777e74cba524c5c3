"""T29 8BITMIME, SMTPUTF8 and invalid UTF-8 (issue #4): over SMTP into a running node and
out through a Send connector to Postfix's smtp-sink started with -8, which offers neither
8BITMIME nor SMTPUTF8."""

from __future__ import annotations

import re
import socket
import time
from typing import Any, cast

from tests.conftest import MailgateEnv, wait_for
from tests.e2e.test_queue_engine import recipient_blocks, reports
from tests.e2e.test_send_connector import events
from tests.peers import SmtpSink, free_port
from tests.smtp import chat, read_reply, wait_listening

ALICE = "alice@contoso.test"
UTF8_ADDRESS = "jösé@fabrikam.test"
GREETING = "Grüße aus Köln: UTF-8 in the body, no MIME encoding.".encode()


def send(s: socket.socket, mail: bytes, rcpt: str, message: bytes) -> None:
    """One transaction, each step answered as it should be; CRLF line ends."""
    assert chat(s, mail).startswith(b"250")
    assert chat(s, f"RCPT TO:<{rcpt}>".encode()).startswith(b"250")
    assert chat(s, b"DATA").startswith(b"354")
    s.sendall(message.replace(b"\n", b"\r\n") + b".\r\n")
    assert read_reply(s).startswith(b"250 2.6.0")


def test_t29_8bit_and_utf8_to_a_next_hop_without_8bitmime_or_smtputf8(
        demo_env: MailgateEnv) -> None:
    """T29: a non-ASCII address without SMTPUTF8 is refused as RFC 6531 3.5 says (MAIL FROM
    550 5.6.7, RCPT TO 553 5.6.7), and accepted with it. An 8-bit body without
    BODY=8BITMIME and with it, a Subject of invalid UTF-8, and a message sent with SMTPUTF8
    from and to ASCII addresses are accepted and go to the next hop byte for byte, without
    BODY=8BITMIME or SMTPUTF8 since it offers neither (no 7-bit conversion, as the README
    says); the SMTPUTF8 one's Received field says `with UTF8SMTP`. Tracking reads the
    invalid Subject without failing. A message with a UTF-8 recipient is not downgraded: the
    next hop never sees it, and the sender gets an NDR 5.6.7."""
    env = demo_env
    port = free_port()
    env.cli("receive-connector", "new", "--name", "Relay", "--bindings", f"127.0.0.1:{port}",
            "--remote-ip-ranges", "127.0.0.1", "--permission-groups", "ExchangeServers")
    bodies = {
        "no BODY": b"Subject: no BODY\n\n" + GREETING + b"\n",
        "BODY=8BITMIME": b"Subject: BODY=8BITMIME\n\n" + GREETING + b"\n",
        "invalid": b"Subject: Caf\xe9 \xff\xfe invalid UTF-8\n\nLatin-1: caf\xe9\n",
        "SMTPUTF8": "Subject: SMTPUTF8, Grüße\n\n".encode() + GREETING + b"\n",
    }
    with SmtpSink("-8") as sink:
        env.cli("send-connector", "new", "--name", "Outbound", "--address-spaces", "*",
                "--smart-hosts", "127.0.0.1", "--port", str(sink.port))
        env.start()
        wait_listening(port)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            read_reply(s)
            assert b"SMTPUTF8" in chat(s, b"EHLO client.test")
            refused = chat(s, f"MAIL FROM:<{UTF8_ADDRESS}>".encode())
            assert refused.startswith(b"550 5.6.7"), refused
            assert chat(s, f"MAIL FROM:<{ALICE}>".encode()).startswith(b"250")
            refused = chat(s, f"RCPT TO:<{UTF8_ADDRESS}>".encode())
            assert refused.startswith(b"553 5.6.7"), refused
            assert chat(s, b"RSET").startswith(b"250")
            assert chat(s, f"MAIL FROM:<{UTF8_ADDRESS}> SMTPUTF8".encode()).startswith(b"250")
            assert chat(s, b"RSET").startswith(b"250")
            send(s, f"MAIL FROM:<{ALICE}>".encode(), "bob@fabrikam.test", bodies["no BODY"])
            send(s, f"MAIL FROM:<{ALICE}> BODY=8BITMIME".encode(), "bob@fabrikam.test",
                 bodies["BODY=8BITMIME"])
            send(s, f"MAIL FROM:<{ALICE}>".encode(), "carol@fabrikam.test", bodies["invalid"])
            send(s, f"MAIL FROM:<{ALICE}> SMTPUTF8".encode(), "dave@fabrikam.test",
                 bodies["SMTPUTF8"])
            send(s, f"MAIL FROM:<{ALICE}> SMTPUTF8".encode(), UTF8_ADDRESS,
                 b"Subject: to a UTF-8 address\n\nHello.\n")
            assert chat(s, b"QUIT").startswith(b"221")
        got = cast(list[Any], wait_for(lambda: len(m := sink.messages()) >= 4 and m,
                                       what="four messages in smtp-sink"))
        [ndr] = cast(list[Any], wait_for(lambda: reports(env), what="alice's NDR"))
        time.sleep(1.0)
        assert len(sink.messages()) == 4

    by_subject = {m.data.split(b"\nSubject: ", 1)[1].split(b"\n", 1)[0]: m for m in got}
    for body in bodies.values():
        subject = body.split(b"\n", 1)[0][len(b"Subject: "):]
        m = by_subject[subject]
        # Byte for byte from the Subject on (smtp-sink ends its dump with a blank line).
        tail = m.data[m.data.index(b"\nSubject: ") + 1:]
        assert tail in (body, body + b"\n"), m.data
        assert m.mail_args.split() == [f"<{ALICE}>"]   # no BODY=8BITMIME, no SMTPUTF8
        utf8 = subject.startswith(b"SMTPUTF8")
        assert re.search(rb"^Received: from client\.test \(\[127\.0\.0\.1\]\) by \S+ with "
                         + (rb"UTF8SMTP;" if utf8 else rb"ESMTP;"), m.data, re.M), m.data
    [block] = recipient_blocks(ndr)
    assert block["Status"] == "5.6.7" and "SMTPUTF8" in block["Diagnostic-Code"]
    assert UTF8_ADDRESS in block["Final-Recipient"]

    received = events(env, "--event-id", "RECEIVE", "--source", "SMTP")
    subjects = [e["MessageSubject"] for e in received]
    assert len(received) == 5 and "no BODY" in subjects and "BODY=8BITMIME" in subjects
    assert any(s.startswith("Caf") and "invalid UTF-8" in s for s in subjects), subjects
