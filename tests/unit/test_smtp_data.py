"""The DATA phase reads whatever has arrived, not line by line: the message must come out
the same however the bytes are split into packets, and bytes sent after the final dot
(pipelined commands) must stay in the stream for the session.

A real asyncio.StreamReader is fed the bytes, split at every position.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.core import status
from mailgate.core.status import Status
from mailgate.receive.smtp_data import MAX_KEPT_LINE, ReceivedData, _Message, read_data


async def _read(pieces: list[bytes], tmp_path: Path, limit: int | None = None,
                max_header: int = 10_000) -> tuple[ReceivedData, bytes]:
    """read_data over a real StreamReader fed `pieces` one at a time; also what is left
    in the stream after the data."""
    reader = asyncio.StreamReader(limit=1001)
    task = asyncio.create_task(read_data(reader, limit=limit, max_header=max_header,
                                         max_hops=3, spool_dir=tmp_path,
                                         progress=lambda n: None))
    for piece in pieces:
        reader.feed_data(piece)
        await asyncio.sleep(0)
    data = await asyncio.wait_for(task, 5)
    reader.feed_eof()
    return data, await reader.read()


def _body(data: ReceivedData) -> bytes:
    try:
        return b"".join(data.chunks()) if data.error is None else b""
    finally:
        data.close()


STREAM = (b"Subject: split\r\nReceived: from a\r\n\r\n..dotted\r\n.x\r\nline\r\n"
          b".\r\nMAIL FROM:<next@x.test>\r\nRCPT TO:<b@x.test>\r\n")
MESSAGE = b"Subject: split\r\nReceived: from a\r\n\r\n.dotted\r\nx\r\nline\r\n"
AFTER = b"MAIL FROM:<next@x.test>\r\nRCPT TO:<b@x.test>\r\n"


async def test_any_split_gives_the_same_message_and_leaves_the_next_commands(
        tmp_path: Path) -> None:
    """Split in two at every offset (and byte by byte): same message, same header and hop
    count, dots unstuffed, and the pipelined commands still unread."""
    splits = [[STREAM[:i], STREAM[i:]] for i in range(1, len(STREAM))]
    splits.append([bytes([b]) for b in STREAM])
    for pieces in splits:
        data, rest = await _read(pieces, tmp_path)
        assert (data.error, data.hops) == (None, 1), pieces
        assert data.header == b"Subject: split\r\nReceived: from a\r\n"
        assert data.size == len(MESSAGE)
        assert _body(data) == MESSAGE, pieces
        assert rest == AFTER, pieces


async def test_an_empty_message_ends_at_the_first_dot(tmp_path: Path) -> None:
    """The 354 reply's CRLF counts: a first line "." ends an empty message."""
    data, rest = await _read([b".\r\nQUIT\r\n"], tmp_path)
    assert (data.error, data.size, _body(data), rest) == (None, 0, b"", b"QUIT\r\n")


@pytest.mark.parametrize("stream, error", [
    (b"a\nb\r\n.\r\n", status.S550_BARE_EOL_DATA),
    # A line with a bare CR does not count as ending in CRLF: the next "." is no end.
    (b"a\rb\r\n.\r\n\r\n.\r\n", status.S550_BARE_EOL_DATA),
    (b"a\x00b\r\n.\r\n", status.S550_NUL),
    (b"x" * 999 + b"\r\n.\r\n", status.S554_LINE_TOO_LONG),
    (b"Received: a\r\n" * 4 + b"\r\n.\r\n", status.S554_HOPS),
    # The first error wins: a bare LF before a long line.
    (b"a\nb\r\n" + b"y" * 5000 + b"\r\n.\r\n", status.S550_BARE_EOL_DATA),
])
async def test_bad_data_is_refused_whatever_the_split(tmp_path: Path, stream: bytes,
                                                      error: Status) -> None:
    for i in (1, 2, len(stream) // 2, len(stream) - 2):
        data, rest = await _read([stream[:i], stream[i:] + b"NOOP\r\n"], tmp_path)
        assert data.error == error, (i, data.error)
        assert rest == b"NOOP\r\n"


async def test_a_dot_after_a_bare_lf_does_not_end_the_data(tmp_path: Path) -> None:
    """T17: `LF . CRLF` is not the end; only CRLF.CRLF is (the message is then refused)."""
    data, rest = await _read([b"a\n.\r\nsmuggled\r\n.\r\n"], tmp_path)
    assert data.error == status.S550_BARE_EOL_DATA and rest == b""


async def test_a_huge_line_is_dropped_as_it_arrives(tmp_path: Path) -> None:
    """A 20 MB line in 64 KiB packets: refused as too long, and a dot line after it still
    ends the data when the long line ended in CRLF (and does not when it ended in LF)."""
    line = b"z" * (20 * 1024 * 1024)
    pieces = [line[i:i + 65536] for i in range(0, len(line), 65536)]
    data, rest = await _read([*pieces, b"\r\n.\r\nQUIT\r\n"], tmp_path)
    assert data.error == status.S554_LINE_TOO_LONG and rest == b"QUIT\r\n"
    data, rest = await _read([*pieces, b"\n.\r\nmore\r\n.\r\n"], tmp_path)
    assert data.error == status.S554_LINE_TOO_LONG and rest == b""


async def test_the_size_limit_counts_unstuffed_bytes(tmp_path: Path) -> None:
    """SIZE: 10 bytes of message pass a limit of 10; 11 do not."""
    data, _ = await _read([b"..234567\r\n.\r\n"], tmp_path, limit=10)
    assert data.error is None and _body(data) == b".234567\r\n"
    data, _ = await _read([b"12345678\r\n\r\n.\r\n"], tmp_path, limit=10)
    assert data.error == status.S552_SIZE


async def test_end_of_stream_inside_the_data_raises(tmp_path: Path) -> None:
    """A client that goes away mid-message: IncompleteReadError (nothing is stored)."""
    reader = asyncio.StreamReader(limit=1001)
    reader.feed_data(b"Subject: cut\r\n")
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await read_data(reader, limit=None, max_header=1000, max_hops=3, spool_dir=tmp_path,
                        progress=lambda n: None)


# -- the whole-region path gives what line by line gives --------------------------------

PIECES = [b"a", b"b", b".", b"..", b"\r\n", b"\r", b"\n", b"\x00", b"Received: x\r\n",
          b"\r\n.\r\n", b"z" * 600, b"y" * 998]


def _line_by_line(stream: bytes) -> tuple[Status | None, bytes, int, bytes, int, bytes]:
    """The rules applied one line at a time (never the whole-region path)."""
    spool = io.BytesIO()
    m = _Message(100_000, 4_000, 3, spool)
    pos = 0
    while True:
        end = stream.index(b"\n", pos) + 1
        line, pos = stream[pos:end], end
        if len(line) > MAX_KEPT_LINE:
            m.long_line_ended(line[-2:])
        elif m.line(line):
            break
    body = spool.getvalue() if m.error is None else b""
    return m.error, body, m.size, bytes(m.header), m.hops, stream[pos:]


@settings(max_examples=500, deadline=None)
@given(st.booleans(), st.lists(st.sampled_from(PIECES), max_size=40), st.data())
def test_whole_regions_and_single_lines_agree(tmp_path_factory: pytest.TempPathFactory,
                                             headed: bool, pieces: list[bytes],
                                             data: st.DataObject) -> None:
    """Any mix of plain and bad lines (in the header or, after a header, in the body),
    split into packets anywhere: read_data gives the same error, message, size, header,
    hop count and leftover as the rules line by line."""
    head = b"Subject: t\r\n\r\n" if headed else b""
    stream = head + b"".join(pieces) + b"\r\n\r\n.\r\nQUIT\r\n"
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=6))))
    packets = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    tmp = tmp_path_factory.mktemp("spool")
    got, rest = asyncio.run(_read(packets, tmp, limit=100_000, max_header=4_000))
    expected = _line_by_line(stream)
    assert (got.error, _body(got), got.size, got.header, got.hops, rest) == expected
