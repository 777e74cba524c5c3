"""The DATA phase of an SMTP transaction: read the message up to `CRLF.CRLF` (or, with
BDAT chunks, as sent), spooled (in memory up to 1 MiB, then in a temporary file under the
node's data folder), with the receive connector's limits checked as the bytes arrive.

Contract (PRODUCT §5, reliability §2.1–2.4):

- The data ends only at `CRLF . CRLF`. A line that ends in a bare LF, or has a CR that is
  not followed by LF, makes the whole message refused (550 5.6.0) once its end is read: no
  bare line ending is ever stored or passed on, so `LF . LF` and similar can never smuggle
  a second message. NUL characters are refused the same way (550 5.6.0).
- A line longer than 1000 octets (after removing a transparency dot) is refused
  (554 5.6.0); more than `limit` bytes: 552 5.3.4; a header over `max_header`: 552 5.3.4;
  more than `max_hops` Received fields: 554 5.4.0. Reading goes on to the end of the data
  with nothing more kept, so memory stays bounded and the session stays usable. A spool
  that cannot be written (disk full) gives 452 4.3.1 (451 4.3.0 for other I/O errors).
- `progress(n)` is called as bytes arrive: the server extends its deadline from it (a slow
  but steady upload is not cut off; a trickle is).
"""

from __future__ import annotations

import asyncio
import errno
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator

from mailgate.core import status
from mailgate.core.status import Status

SPOOL_IN_MEMORY = 1024 * 1024
CHUNK = 1024 * 1024
MAX_LINE = 1000  # octets including CRLF (RFC 5321 4.5.3.1.6)


@dataclass
class ReceivedData:
    """What the DATA phase read: the message (without our Received line) or the error."""

    error: Status | None = None
    size: int = 0
    header: bytes = b""
    hops: int = 0
    spool: IO[bytes] | None = field(default=None, repr=False)

    def chunks(self) -> Iterator[bytes]:
        """The message bytes from the spool, in chunks (may be read more than once)."""
        assert self.spool is not None
        self.spool.seek(0)
        while chunk := self.spool.read(CHUNK):
            yield chunk

    def close(self) -> None:
        if self.spool is not None:
            discard(self.spool)
            self.spool = None


def discard(spool: IO[bytes]) -> None:
    """Close a spool whose content is not wanted (closing flushes: on a full disk that
    fails, and the temporary file is gone either way)."""
    try:
        spool.close()
    except OSError:
        pass


READ_SIZE = 64 * 1024
# A line this long (terminator included) without its end is dropped as it arrives, so a
# 100 MB line costs no memory; it is refused as too long (the stream's limit in aiosmtpd).
MAX_KEPT_LINE = 1001


class _Message:
    """The per-line rules of the DATA phase, applied in order; the first error wins.
    `dot_stuffed`: DATA's transparency (a final dot, leading dots doubled); BDAT chunks
    (RFC 3030) carry the message as it is."""

    def __init__(self, limit: int | None, max_header: int, max_hops: int,
                 spool: IO[bytes], dot_stuffed: bool = True) -> None:
        self.limit, self.max_header, self.max_hops = limit, max_header, max_hops
        self.spool = spool
        self.dot_stuffed = dot_stuffed
        self.error: Status | None = None
        self.in_header = True
        self.header = bytearray()
        self.hops = 0
        self.size = 0
        self.after_crlf = True   # the 354 reply's CRLF counts for an empty message

    def long_line_ended(self, tail: bytes) -> None:
        """An over-long line (dropped) ended with `tail`, its last two bytes."""
        # Whether it ended in CRLF decides if a "." line after it is the end of the data.
        self.after_crlf = tail == b"\r\n"
        self.error = self.error or status.S554_LINE_TOO_LONG

    def line(self, line: bytes) -> bool:
        """Take one line (ending in LF); True when it is the final dot."""
        if line == b".\r\n" and self.after_crlf and self.dot_stuffed:
            return True
        self.after_crlf = line.endswith(b"\r\n")
        if not self.after_crlf or b"\r" in line[:-2]:
            # Only CRLF.CRLF ends the data: `LF.CRLF` after this line must not (T17).
            self.after_crlf = False
            self.error = self.error or status.S550_BARE_EOL_DATA
            return False
        if line.startswith(b".") and self.dot_stuffed:
            line = line[1:]
        if len(line) > MAX_LINE:
            self.error = self.error or status.S554_LINE_TOO_LONG
        if b"\x00" in line:
            self.error = self.error or status.S550_NUL
        self.size += len(line)
        if self.limit is not None and self.size > self.limit:
            self.error = self.error or status.S552_SIZE
        if self.in_header:
            if line == b"\r\n":
                self.in_header = False
            else:
                if line[:9].lower() == b"received:":
                    self.hops += 1
                    if self.hops > self.max_hops:
                        self.error = self.error or status.S554_HOPS
                if len(self.header) + len(line) > self.max_header:
                    self.error = self.error or status.S552_HEADER_SIZE
                else:
                    self.header += line
        if self.error is None:
            try:
                self.spool.write(line)
            except OSError as exc:   # the spool's disk is full or failing: a 4xx, not a crash
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                self.error = status.S452_STORE_FULL if full else status.S451_STORE_ERROR
        return False

    def body(self, data: bytes, start: int) -> tuple[int, int | None]:
        """Take the complete lines of `data[start:]` at once, up to the final dot if it is
        there, when they are plain body lines (no bare CR or LF, no NUL, none too long):
        the same outcome as line by line, for a fraction of the cost. Returns the offset
        taken up to and, once the final dot is found, the offset just after it; (start,
        None) when the lines must go one by one (the caller does that)."""
        if not self.after_crlf:
            return start, None
        if not self.dot_stuffed:
            marker = -1
        elif data.startswith(b".\r\n", start):
            return start + 3, start + 3
        else:
            marker = data.find(b"\r\n.\r\n", start)
        if marker >= 0:
            stop, after = marker + 2, marker + 5
        else:
            stop, after = data.rfind(b"\n", start) + 1, None
            if stop <= start:
                return start, None
        region = data[start:stop]
        lines = region.count(b"\r\n")
        if (region.count(b"\n") != lines or region.count(b"\r") != lines
                or b"\x00" in region or (len(region) > MAX_LINE - 2 and max(
                    map(len, region.split(b"\r\n"))) > MAX_LINE - 2)):
            return start, None
        if self.dot_stuffed:
            if region.startswith(b"."):
                region = region[1:]
            region = region.replace(b"\r\n.", b"\r\n")   # dot-unstuffing (RFC 5321 4.5.2)
        self.size += len(region)
        if self.limit is not None and self.size > self.limit:
            self.error = status.S552_SIZE
        else:
            try:
                self.spool.write(region)
            except OSError as exc:
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                self.error = status.S452_STORE_FULL if full else status.S451_STORE_ERROR
        return stop, after

    def result(self) -> ReceivedData:
        out = ReceivedData(size=self.size, header=bytes(self.header), hops=self.hops)
        if self.error is not None:
            discard(self.spool)
            out.error = self.error
        else:
            out.spool = self.spool
        return out


class MessageLines:
    """Splits the bytes of a message, as they arrive in pieces, into the lines that
    _Message checks: plain body lines a region at a time, others one by one, an over-long
    line dropped as it comes (so a 100 MB line costs no memory)."""

    def __init__(self, spool_dir: Path, *, limit: int | None, max_header: int,
                 max_hops: int, dot_stuffed: bool = True) -> None:
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY, mode="w+b",
                                                         dir=str(spool_dir))
        self.message = _Message(limit, max_header, max_hops, spool, dot_stuffed)
        self._carry = b""       # the start of a line whose end has not arrived
        self._skipping = False  # inside an over-long line, dropped up to its end
        self._tail = b""        # the last two bytes of the dropped line so far

    def feed(self, chunk: bytes) -> bytes | None:
        """Take the next bytes. With DATA's final dot among them: the bytes after it (the
        client's next commands), else None."""
        message = self.message
        data = self._carry + chunk if self._carry else chunk
        start = 0
        whole = True   # the body's lines may go at once, until that is declined
        while True:
            if whole and not (message.in_header or self._skipping or message.error):
                taken, after = message.body(data, start)
                if after is not None:
                    return data[after:]
                whole = taken != start
                start = taken
            end = data.find(b"\n", start)
            if end < 0:
                break
            end += 1
            if self._skipping:
                self._skipping = False
                message.long_line_ended((self._tail + data[start:end])[-2:])
            elif end - start > MAX_KEPT_LINE:
                # Dropped whole, as if it had come in pieces: the outcome must not depend on
                # how the line was split into packets.
                message.long_line_ended(data[end - 2:end])
            elif message.line(data[start:end]):
                return data[end:]
            start = end
        self._carry = data[start:]
        if self._skipping:
            self._tail, self._carry = (self._tail + self._carry)[-2:], b""
        elif len(self._carry) > MAX_KEPT_LINE:
            self._skipping, self._tail, self._carry = True, self._carry[-2:], b""
        return None

    def finish(self) -> ReceivedData:
        """The message (BDAT LAST): a last line without its CRLF gets one."""
        if self._skipping:
            self.message.long_line_ended(b"\r\n")
        elif self._carry:
            self.message.line(self._carry + b"\r\n")
        self._carry = b""
        return self.message.result()

    def abandon(self) -> None:
        discard(self.message.spool)


async def read_data(reader: asyncio.StreamReader, *, limit: int | None, max_header: int,
                    max_hops: int, spool_dir: Path,
                    progress: Callable[[int], None]) -> ReceivedData:
    """Read the data up to its final dot. Bytes the client sent after it (pipelined
    commands) are put back in front of `reader` for the session to read."""
    lines = MessageLines(spool_dir, limit=limit, max_header=max_header, max_hops=max_hops)
    while True:
        # Whatever has arrived, not one line per await (readuntil per line cost more).
        try:
            chunk = await reader.read(READ_SIZE)
        except BaseException:   # the session is cancelled: the spool goes with it
            lines.abandon()
            raise
        if not chunk:
            lines.abandon()
            raise asyncio.IncompleteReadError(b"", None)
        progress(len(chunk))
        rest = lines.feed(chunk)
        if rest is not None:
            if rest:
                push_back(reader, rest)
            return lines.message.result()


def push_back(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put bytes read past the end of the data back in front of the reader's buffer.
    asyncio has no public unread; StreamReader keeps its buffer in the bytearray
    `_buffer` (so in every CPython since 3.4)."""
    reader._buffer[0:0] = data  # type: ignore[attr-defined]
