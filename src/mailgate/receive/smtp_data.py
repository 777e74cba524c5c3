"""The DATA phase of an SMTP transaction: read the message up to `CRLF.CRLF`, spooled (in
memory up to 1 MiB, then in a temporary file under the node's data folder), with the
receive connector's limits checked as the bytes arrive.

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


async def read_data(reader: asyncio.StreamReader, *, limit: int | None, max_header: int,
                    max_hops: int, spool_dir: Path,
                    progress: Callable[[int], None]) -> ReceivedData:
    out = ReceivedData()
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY, mode="w+b",
                                                     dir=str(spool_dir))
    error: Status | None = None
    in_header = True
    header = bytearray()
    size = 0
    after_crlf = True   # the 354 reply's CRLF counts for an empty message
    while True:
        try:
            # The base class's readuntil: the server's reader refuses bare line endings in
            # command lines; here they are found below, line by line.
            line = await asyncio.StreamReader.readuntil(reader, b"\n")
        except asyncio.LimitOverrunError as exc:
            # A line longer than the stream's limit: dropped in pieces up to its end, and
            # the message refused. Whether it ended in CRLF decides if a "." line after it
            # is the end of the data.
            end = await _skip_long_line(reader, exc.consumed, progress)
            after_crlf = end == b"\r\n"
            error = error or status.S554_LINE_TOO_LONG
            continue
        progress(len(line))
        if line == b".\r\n" and after_crlf:
            break
        after_crlf = line.endswith(b"\r\n")
        if not after_crlf or b"\r" in line[:-2]:
            # Only CRLF.CRLF ends the data: `LF.CRLF` after this line must not (T17).
            after_crlf = False
            error = error or status.S550_BARE_EOL_DATA
            continue
        if line.startswith(b"."):
            line = line[1:]
        if len(line) > MAX_LINE:
            error = error or status.S554_LINE_TOO_LONG
        if b"\x00" in line:
            error = error or status.S550_NUL
        size += len(line)
        if limit is not None and size > limit:
            error = error or status.S552_SIZE
        if in_header:
            if line == b"\r\n":
                in_header = False
            else:
                if line[:9].lower() == b"received:":
                    out.hops += 1
                    if out.hops > max_hops:
                        error = error or status.S554_HOPS
                if len(header) + len(line) > max_header:
                    error = error or status.S552_HEADER_SIZE
                else:
                    header += line
        if error is None:
            try:
                spool.write(line)
            except OSError as exc:   # the spool's disk is full or failing: a 4xx, not a crash
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                error = status.S452_STORE_FULL if full else status.S451_STORE_ERROR
    out.size = size
    out.header = bytes(header)
    if error is not None:
        discard(spool)
        out.error = error
    else:
        out.spool = spool
    return out


async def _skip_long_line(reader: asyncio.StreamReader, consumed: int,
                          progress: Callable[[int], None]) -> bytes:
    """Read and drop the rest of an over-long line; return its last two bytes."""
    last = b""
    while True:
        piece = await reader.readexactly(consumed)
        progress(len(piece))
        last = (last + piece)[-2:]
        try:
            piece = await asyncio.StreamReader.readuntil(reader, b"\n")
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed
            continue
        progress(len(piece))
        return (last + piece)[-2:]

