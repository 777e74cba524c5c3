"""Small asyncio helpers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mailgate.store import StoreError


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` passes; True if it was set.

    Unlike `asyncio.wait_for(event.wait(), timeout)` on Python 3.11 (CPython gh-86296),
    a cancellation that arrives together with the event is never swallowed."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()


def log_failure(log: logging.Logger, message: str, exc: BaseException) -> None:
    """Log a failed pass of a service loop that will be retried: one line for the
    system's trouble (a store or OS error: out of descriptors, a failing disk), which
    would otherwise repeat a traceback every second; a traceback for anything else."""
    if isinstance(exc, (StoreError, OSError)):
        log.error("%s: %s", message, exc)
    else:
        log.error("%s", message, exc_info=exc)


async def cancelled(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has stopped."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
