"""Named crash points for recovery tests (reliability catalogue T03, T39).

`MAILGATE_CRASH_AT=<point>[:<n>]` makes the process exit abruptly (as kill -9 would) the
n-th time (default 1st) it passes `<point>`. Unset, a crash point costs one dict lookup.
Points: pickup-after-claim, pickup-after-commit, drop-after-rename, maildir-after-rename.
"""

from __future__ import annotations

import os
import threading

_spec = os.environ.get("MAILGATE_CRASH_AT", "")
_point, _, _nth = _spec.partition(":")
_count = int(_nth) if _nth.isdigit() else 1
_lock = threading.Lock()
_hits = 0


def crash_point(name: str) -> None:
    global _hits
    if not _point or name != _point:
        return
    with _lock:
        _hits += 1
        if _hits >= _count:
            os._exit(137)
