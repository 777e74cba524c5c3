"""Clock protocol: every component that needs the time takes a Clock, never reads globals.

Tests inject a FakeClock and advance it; production uses SystemClock.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (UTC), as time.time()."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class FakeClock:
    """A clock that only moves when told to (for tests)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


def utc(ts: float) -> dt.datetime:
    """An aware UTC datetime for an epoch timestamp."""
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc)


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC text (Exchange tracking style) for an epoch timestamp, or None."""
    if ts is None:
        return None
    return utc(ts).isoformat(timespec="milliseconds").replace("+00:00", "Z")
