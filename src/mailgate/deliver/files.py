"""The one place where mailgate makes files durable: create exclusively under a hidden
temporary name, write, fsync, rename into place, fsync the folder.

A consumer that reads only final names never sees a partial file, and a hostile symlink
planted at a temporary or final name is never followed (O_EXCL|O_NOFOLLOW, rename replaces
the link itself).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mailgate.ids import random_hex8

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_temp(folder: Path, stem: str, chunks: Iterable[bytes], mode: int = 0o640,
               sync: bool = True) -> tuple[Path, int]:
    """Write `chunks` to a new hidden file in `folder`, fsync it, return (path, size).

    With `sync=False` the caller makes a whole batch durable at once (`sync_filesystem`)
    before renaming any of its files into place."""
    for _ in range(5):
        tmp = folder / f".{stem}.{random_hex8()}.tmp"
        try:
            fd = os.open(tmp, _FLAGS, mode)
            break
        except FileExistsError:
            continue  # someone planted this name; never reuse or follow it
    else:
        raise FileExistsError(f"cannot create a temporary file in {folder}")
    size = 0
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                n = os.write(fd, view)
                view = view[n:]
                size += n
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    return tmp, size


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_regular_file(path: Path) -> bool:
    """True for a regular file that is not a symlink (a planted link never counts)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode)


def prepend(head: bytes, rest: Iterable[bytes]) -> Iterator[bytes]:
    """Chunks of `head` followed by `rest`."""
    yield head
    yield from rest


_TEMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


def sweep_temps(folder: Path, older_than: float = 60.0) -> int:
    """Delete temporary files of ours (see `write_temp`) left in `folder` by a crash.

    Only hidden `*.<8 hex>.tmp` regular files older than `older_than` seconds are removed,
    so a write in progress (by this or another node) is never touched."""
    removed = 0
    limit = time.time() - older_than
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if not _TEMP.match(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_mtime < limit:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNCFS = _load_syncfs() if sys.platform.startswith("linux") else None


def can_sync_filesystem() -> bool:
    return _SYNCFS is not None


def sync_filesystem(folder: Path) -> None:
    """Make every file written on `folder`'s filesystem durable with one syncfs(2): it
    writes back all dirty data and metadata of that filesystem and waits for it (ext4 also
    flushes the device cache). One call for a batch of files instead of an fsync each."""
    if _SYNCFS is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
