"""CHUNKING (RFC 3030, BDAT) on a Receive connector, against a running node with raw
sockets: the chunks make the message byte for byte (no dot transparency), a chunk's bytes
are never read as commands whatever the answer, and DATA's checks apply."""

from __future__ import annotations

import socket

from tests.conftest import wait_for
from tests.delivered import mailbox_files
from tests.e2e.test_smtp_receive import smtp  # noqa: F401 - the fixture
from tests.smtp import ALICE, Smtp, chat, delivered_ids, message, read_reply


def _bdat(s: socket.socket, chunk: bytes, last: bool = False) -> bytes:
    s.sendall(f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode() + chunk)
    return read_reply(s)


def _transaction(s: socket.socket) -> None:
    assert b"CHUNKING" in chat(s, b"EHLO client.test")
    assert chat(s, b"MAIL FROM:<bob@fabrikam.test>").startswith(b"250")
    assert chat(s, f"RCPT TO:<{ALICE}>".encode()).startswith(b"250")


def test_chunks_make_the_message_byte_for_byte(smtp: Smtp) -> None:
    """Three chunks, pipelined in one write, split mid-line: three answers (250 for each,
    250 2.6.0 for LAST) and a message whose lines "." and ".dot" arrive as they were sent."""
    body = message("chunked", "X-Extra: 1\r\n") + b".dot line\r\n.\r\nafter the dot\r\n"
    parts = [body[:17], body[17:60], body[60:]]
    s = smtp.raw()
    _transaction(s)
    s.sendall(b"".join(f"BDAT {len(p)}{' LAST' if i == 2 else ''}\r\n".encode() + p
                       for i, p in enumerate(parts)))
    replies = [read_reply(s) for _ in parts]
    assert replies[0] == b"250 2.0.0 17 octets received\r\n", replies
    assert replies[1].startswith(b"250 2.0.0 43 octets") and replies[2].startswith(b"250 2.6.0")
    assert chat(s, b"QUIT").startswith(b"221")
    s.close()
    [path] = wait_for(lambda: mailbox_files(smtp.env), what="the chunked message")
    stored = path.read_bytes()
    assert stored.endswith(body.replace(b"\r\n", b"\n")) or stored.endswith(body), stored


def test_a_refused_chunk_is_read_not_executed(smtp: Smtp) -> None:
    """BDAT before MAIL gets 503, but its bytes (which look like a whole transaction) are
    consumed: none of them runs as a command and nothing is delivered."""
    s = smtp.raw()
    assert chat(s, b"EHLO client.test").startswith(b"250")
    sneaky = (b"MAIL FROM:<evil@fabrikam.test>\r\nRCPT TO:<" + ALICE.encode()
              + b">\r\nDATA\r\n" + message("smuggled") + b".\r\n")
    assert _bdat(s, sneaky).startswith(b"503 5.5.1")
    assert chat(s, b"NOOP").startswith(b"250")
    _transaction(s)
    assert _bdat(s, message("real"), last=True).startswith(b"250 2.6.0")
    s.close()
    wait_for(lambda: delivered_ids(smtp.env) == ["real"], what="the real message only")


def test_an_oversize_chunk_fails_the_sequence_and_the_session_goes_on(smtp: Smtp) -> None:
    """MaxMessageSize 64 KB: a 70,000-octet chunk is read and answered 552 5.3.4; the LAST
    chunk of that sequence gets 552 too, and a new transaction works."""
    smtp.env.cli("receive-connector", "set", "Default", "--max-message-size", "64KB")
    wait_for(lambda: _size_is(smtp, 65536), what="the new size limit")
    s = smtp.raw()
    _transaction(s)
    assert _bdat(s, (b"y" * 998 + b"\r\n") * 70).startswith(b"552 5.3.4")
    assert _bdat(s, b"end\r\n", last=True).startswith(b"552 5.3.4")
    _transaction(s)
    assert _bdat(s, message("small"), last=True).startswith(b"250 2.6.0")
    s.close()
    wait_for(lambda: delivered_ids(smtp.env) == ["small"], what="the small message")


def _size_is(smtp: Smtp, size: int) -> bool:
    s = smtp.raw()
    try:
        return f"SIZE {size}".encode() in chat(s, b"EHLO client.test")
    finally:
        s.close()


def test_data_checks_apply_to_chunks(smtp: Smtp) -> None:
    """A bare LF in a chunk refuses the message at LAST (550 5.6.0); DATA after BDAT is
    503; RSET drops the chunks so far; BDAT 0 LAST ends a message; bad syntax is 501."""
    s = smtp.raw()
    _transaction(s)
    assert _bdat(s, b"Subject: x\r\n\r\nbare\nlf\r\n").startswith(b"250 2.0.0")
    assert chat(s, b"DATA").startswith(b"503 5.5.1")
    assert _bdat(s, b"", last=True).startswith(b"550 5.6.0")
    _transaction(s)
    assert _bdat(s, b"Subject: dropped\r\n").startswith(b"250")
    assert chat(s, b"RSET").startswith(b"250")
    _transaction(s)
    assert _bdat(s, message("zero-last")).startswith(b"250 2.0.0")
    assert _bdat(s, b"", last=True).startswith(b"250 2.6.0")
    assert chat(s, b"BDAT ten").startswith(b"501 5.5.4")
    assert chat(s, b"BDAT 5 FIRST").startswith(b"501 5.5.4")
    s.close()
    wait_for(lambda: delivered_ids(smtp.env) == ["zero-last"], what="the message")
