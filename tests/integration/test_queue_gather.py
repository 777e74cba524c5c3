"""A steady trickle of messages into a queue is delivered in batches, and the first message
after a quiet spell is delivered at once.

After a claim that did not fill a batch, the queue manager's drainer waits `gather` seconds
before it claims again, so one claim, one Drop-directory sync and one completion serve many
messages (the SMTP benchmark spends half its time on delivery without this). Real SQLite
store and real QueueManager; the deliverer records each batch it is given.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator

import pytest

from mailgate.clock import FakeClock
from mailgate.directory import OrganizationCache
from mailgate.organization import Organization
from mailgate.queue.manager import QueueManager
from mailgate.store import ClaimedDelivery, DeliveryResult, QueueInfo
from mailgate.store.sqlite import SqliteStore
from tests.integration.test_store_sqlite import T0, message

TRICKLE = 40


class RecordingDeliverers:
    """Delivers every claimed batch at once and records its size and time."""

    def __init__(self) -> None:
        self.batches: list[tuple[float, int]] = []

    @staticmethod
    def handles(delivery_type: str) -> bool:
        return True

    @staticmethod
    def limits(queue: QueueInfo, org: Organization) -> tuple[int, int] | None:
        return None

    async def deliver(self, info: QueueInfo, claimed: list[ClaimedDelivery],
                      org: Organization) -> list[DeliveryResult]:
        self.batches.append((time.monotonic(), len(claimed)))
        return [DeliveryResult(d.id, d.message_id, delivered=[r.id for r in d.recipients])
                for d in claimed]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "mailgate.db", node="n1", clock=FakeClock(T0))
    try:
        yield s
    finally:
        await s.close()


async def trickle(store: SqliteStore, gather: float) -> tuple[RecordingDeliverers, float]:
    """One message, a pause, then TRICKLE messages 5 ms apart, each followed by a wake-up
    of the queue manager (as the SMTP and Pickup receivers do). Returns the deliverer and
    how long the first message took to be delivered."""
    deliverers = RecordingDeliverers()
    qm = QueueManager(store, OrganizationCache(store, "n1"), deliverers,  # type: ignore[arg-type]
                      store.clock, "n1/test", per_queue=1, tick=0.5, gather=gather)
    run = asyncio.create_task(qm.run())
    try:
        await asyncio.sleep(0.1)
        start = time.monotonic()
        await store.submit([message()])
        qm.wake()
        while not deliverers.batches and time.monotonic() - start < 5:
            await asyncio.sleep(0.002)
        first = deliverers.batches[0][0] - start if deliverers.batches else float("inf")
        for _ in range(TRICKLE):
            await asyncio.sleep(0.005)
            await store.submit([message()])
            qm.wake()
        deadline = time.monotonic() + 10
        while sum(n for _, n in deliverers.batches) < TRICKLE + 1:
            assert time.monotonic() < deadline, deliverers.batches
            await asyncio.sleep(0.01)
        return deliverers, first
    finally:
        qm._stopping = True
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_a_trickle_is_delivered_in_batches(store: SqliteStore) -> None:
    deliverers, first = await trickle(store, gather=0.1)
    sizes = [n for _, n in deliverers.batches]
    assert sum(sizes) == TRICKLE + 1                 # every message, once
    assert sizes[0] == 1 and first < 0.5             # the first one at once, alone
    # 40 messages over about 0.3 s, a claim at most every 0.1 s after a partial one.
    assert len(sizes) <= 8, sizes


async def test_without_gathering_the_same_trickle_goes_in_many_small_batches(
        store: SqliteStore) -> None:
    """The control: what the wait saves."""
    deliverers, _ = await trickle(store, gather=0.0)
    sizes = [n for _, n in deliverers.batches]
    assert sum(sizes) == TRICKLE + 1
    assert len(sizes) > 8, sizes
