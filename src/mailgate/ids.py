"""Unique ids without a system call each.

`os.urandom`/`secrets`/`uuid4` read the kernel's random source on every call; at thousands
of messages a second that is measurable. These ids need to be unique, not secret (no name
derived from them is trusted: files are created with O_EXCL|O_NOFOLLOW and checked with
lstat), so they come from a per-process random prefix, a counter, the clock, and Python's
PRNG (seeded from the kernel once).
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
import uuid

_PREFIX = os.urandom(8).hex()
_counter = itertools.count()
_lock = threading.Lock()
_rng = random.Random(os.urandom(16))


def unique_hex32() -> str:
    """32 hex digits, unique across processes and restarts (random prefix + counter)."""
    return f"{_PREFIX}{next(_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


def time_ordered_hex16() -> str:
    """16 hex digits that sort by creation time (µs) and are unique within this process."""
    return f"{time.time_ns() // 1000 & 0xFFFFFFFFFFFFF:013x}{next(_counter) & 0xFFF:03x}"


def random_hex8() -> str:
    with _lock:
        return f"{_rng.getrandbits(32):08x}"


def message_id_uuid() -> str:
    """A version-4 UUID for Message-IDs."""
    with _lock:
        return str(uuid.UUID(int=_rng.getrandbits(128), version=4))
