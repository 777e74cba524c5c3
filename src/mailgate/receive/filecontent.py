"""Reading a claimed submission file (Pickup, Replay): its header block, then its body.

Contract: the file is read through the claim's descriptor with `pread` (the claimed name may
change under us; the descriptor does not). A small file (the usual case) is read once and
kept in memory until its message is committed; a large one is read in chunks, once now (for
the content hash and the body size) and again when the store writes it. The body is
streamed with CRLF line endings from `body_offset` on; the hash covers the file as it is on
disk, so a claimed file that survives a crash is recognised by it.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from mailgate.receive.pickup_parse import normalise_line_endings, read_header_block

READ_CHUNK = 1024 * 1024
SMALL_FILE = 64 * 1024


@dataclass
class Head:
    """The header block of a file: every header line (see `read_header_block`), where the
    body starts, and the whole file when it is small."""

    head: bytes
    body_offset: int
    small: bytes | None


@dataclass
class Body:
    digest: str          # SHA-256 of the whole file, hex
    data: bytes | None   # the CRLF body when the file is small, else None (streamed)
    size: int            # the body's size with CRLF line endings


def read_head(fd: int, size: int, max_header_size: int) -> Head:
    """Read the header block of the file open as `fd` whose fstat size is `size`; raises
    PickupError for a header over `max_header_size`."""
    small = os.pread(fd, SMALL_FILE + 1, 0) if size <= SMALL_FILE else None
    if small is not None and len(small) > SMALL_FILE:
        small = None  # grew since fstat: treat as large
    f: BinaryIO
    with (io.BytesIO(small) if small is not None else open(fd, "rb", closefd=False)) as f:
        f.seek(0)
        head, body_offset = read_header_block(f, max_header_size)
    return Head(head, body_offset, small)


def read_body(fd: int, head: Head) -> Body:
    """The content hash and the CRLF body (kept only for a small file)."""
    if head.small is not None:
        data = b"".join(normalise_line_endings([head.small[head.body_offset:]]))
        return Body(hashlib.sha256(head.small).hexdigest(), data, len(data))
    digest, size = _digest(fd, head.body_offset)
    return Body(digest, None, size)


def content(fd: int, header: bytes, body: Body,
            body_offset: int) -> Callable[[], Iterator[bytes]]:
    """What the store writes: `header` (already rewritten, ending with the empty line), then
    the body. Callable more than once (the store may retry a batch)."""
    data = body.data

    def chunks() -> Iterator[bytes]:
        yield header
        if data is not None:
            yield data
        else:
            yield from normalise_line_endings(read_from(fd, body_offset))
    return chunks


def read_from(fd: int, offset: int) -> Iterator[bytes]:
    while True:
        chunk = os.pread(fd, READ_CHUNK, offset)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


def _digest(fd: int, body_offset: int) -> tuple[str, int]:
    """One pass over a large file: the hash of all of it and the size of its body once line
    endings are normalised."""
    h = hashlib.sha256()

    def body() -> Iterator[bytes]:
        offset = 0
        for chunk in read_from(fd, 0):
            h.update(chunk)
            if offset + len(chunk) > body_offset:
                yield chunk[max(0, body_offset - offset):]
            offset += len(chunk)

    size = sum(len(piece) for piece in normalise_line_endings(body()))
    return h.hexdigest(), size
