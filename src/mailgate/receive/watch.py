"""Wake-ups for a watched folder, from Linux inotify.

Only a wake-up: the event is set when something is created in, moved into, closed after
writing in, or changes mode in the folder, and the caller rescans. The scan stays
authoritative (inotify misses files written by NFS/SMB clients), so without inotify the
caller simply polls. The events themselves are drained and dropped: at thousands of files
per second, decoding each one would cost more than the rescan it triggers.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


class FolderWatch:
    """Sets `event` whenever the folder changes, until closed."""

    def __init__(self, path: Path, event: asyncio.Event) -> None:
        self.path = path
        self.event = event
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> bool:
        """Start watching; False when inotify is not available (the caller polls)."""
        if _LIBC is None:
            return False
        fd = _LIBC.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.warning("inotify unavailable (%s); polling only",
                        os.strerror(ctypes.get_errno()))
            return False
        if _LIBC.inotify_add_watch(fd, os.fsencode(self.path), MASK) < 0:
            log.warning("cannot watch %s (%s); polling only", self.path,
                        os.strerror(ctypes.get_errno()))
            os.close(fd)
            return False
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)
        return True

    def _readable(self) -> None:
        assert self._fd is not None
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass
        except OSError as exc:
            log.warning("inotify read failed (%s); polling only", exc)
            self.close()
        self.event.set()

    def close(self) -> None:
        if self._fd is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
