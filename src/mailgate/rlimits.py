"""Process limits a node needs.

Every SMTP connection holds a file descriptor, and Exchange's default MaxInboundConnection
is 5000, far above the soft limit of 1024 open files that most systems start a process
with. So a node raises its soft limit to the hard limit when it starts; the hard limit
stays the administrator's (systemd's LimitNOFILE=, ulimit -Hn).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from typing import Any

log = logging.getLogger(__name__)


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit stays unlimited (lowering it could not be undone); the soft
    # limit then goes to Linux's usual per-process maximum (fs.nr_open).
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target,
                        exc)
    return soft


class DescriptorExhaustion:
    """An event loop exception handler: asyncio logs a traceback for every accept() that
    fails with EMFILE (up to a hundred a second under a flood). This logs one line every
    ten seconds instead, with what to do; other errors go to the default handler."""

    INTERVAL = 10.0

    def __init__(self) -> None:
        self._logged = -self.INTERVAL

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            now = time.monotonic()
            if now - self._logged >= self.INTERVAL:
                self._logged = now
                soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                log.error("out of file descriptors (%s, limit %d): new SMTP connections wait "
                          "until others close; raise the open files limit or lower "
                          "MaxInboundConnection", exc.strerror, soft)
            return
        loop.default_exception_handler(context)
