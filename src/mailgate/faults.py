"""Named crash points for recovery tests (reliability catalogue T03, T39).

`MAILGATE_CRASH_AT=<point>[:<n>]` makes the process exit abruptly (as kill -9 would) the
n-th time (default 1st) it passes `<point>`. Unset, a crash point costs one dict lookup.
Points: pickup-after-claim, pickup-after-commit, replay-after-claim, replay-after-commit,
drop-after-rename, maildir-after-rename, smtp-before-commit (end of DATA read, before
the store commit), smtp-after-commit (committed, before the 250 is sent).

`MAILGATE_CRASH_ON_SUBJECT=<text>` makes the Drop directory writer exit the same way
whenever it is about to write a message whose Subject contains `<text>`: a message that
kills the node every time (poison detection tests).
"""

from __future__ import annotations

import os
import threading

_spec = os.environ.get("MAILGATE_CRASH_AT", "")
_point, _, _nth = _spec.partition(":")
_count = int(_nth) if _nth.isdigit() else 1
_lock = threading.Lock()
_hits = 0
_subject = os.environ.get("MAILGATE_CRASH_ON_SUBJECT", "")


def crash_point(name: str) -> None:
    global _hits
    if not _point or name != _point:
        return
    with _lock:
        _hits += 1
        if _hits >= _count:
            os._exit(137)


def crash_on_subject(subject: str | None) -> None:
    if _subject and subject and _subject in subject:
        os._exit(137)
