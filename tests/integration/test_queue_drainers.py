"""The queue manager's drainers, against a real SQLite store and a real QueueManager; the
deliverer is a stand-in (a slow next hop cannot be had on demand).

- Leases: a delivery attempt longer than the lease keeps its lease (the drainer renews
  it), so no one takes the message over and sends it twice.
- Gathering: a steady trickle of messages into a queue is delivered in batches, and the
  first message after a quiet spell at once. After a claim that did not fill a batch the
  drainer waits `gather` seconds before it claims again, so one claim, one Drop-directory
  sync and one completion serve many messages (the SMTP benchmark spent half its time on
  delivery without this).
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
from tests.integration.test_store_sqlite import FAX, T0, Db, message, queue_id


class AnyQueue:
    """A deliverer stand-in's part that takes every queue with the manager's defaults."""

    @staticmethod
    def handles(delivery_type: str) -> bool:
        return True

    @staticmethod
    def limits(queue: QueueInfo, org: Organization) -> tuple[int, int] | None:
        return None


class HeldDeliverers(AnyQueue):
    """Delivers each claimed batch only when `finish` is set; counts the attempts."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finish = asyncio.Event()
        self.attempts: list[list[int]] = []

    async def deliver(self, info: QueueInfo, claimed: list[ClaimedDelivery],
                      org: Organization) -> list[DeliveryResult]:
        self.attempts.append([d.id for d in claimed])
        self.started.set()
        await self.finish.wait()
        return [DeliveryResult(d.id, d.message_id, delivered=[r.id for r in d.recipients])
                for d in claimed]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "mailgate.db", node="n1", clock=FakeClock(T0))
    try:
        yield s
    finally:
        await s.close()


async def test_a_delivery_longer_than_its_lease_is_not_taken_over(store: SqliteStore,
                                                                   tmp_path: Path) -> None:
    """Lease 300 s: while the attempt runs, the clock passes 500 s; the queue manager has
    renewed the lease meanwhile, so another claimer gets nothing, and the message is
    delivered once."""
    clock = store.clock
    assert isinstance(clock, FakeClock)
    [mid] = await store.submit([message()])
    deliverers = HeldDeliverers()
    qm = QueueManager(store, OrganizationCache(store, "n1"), deliverers,  # type: ignore[arg-type]
                      clock, "n1/test", lease=300, renew_every=0.05, per_queue=1, tick=0.05)
    run = asyncio.create_task(qm.run())
    try:
        await asyncio.wait_for(deliverers.started.wait(), 10)
        clock.advance(250)
        await asyncio.sleep(0.3)   # a few renewals: lease until T0 + 250 + 300
        clock.advance(250)         # the first lease (T0 + 300) has run out
        qid = await queue_id(store, FAX)
        assert await store.claim(qid, 10, "someone-else", 60, clock.now()) == []
        until = Db(tmp_path / "mailgate.db").one(
            "SELECT lease_until FROM deliveries WHERE message_id = ?", (mid,))
        assert until == pytest.approx(T0 + 550)
        deliverers.finish.set()
        for _ in range(200):
            if Db(tmp_path / "mailgate.db").one("SELECT COUNT(*) FROM messages") == 0:
                break
            await asyncio.sleep(0.05)
        assert Db(tmp_path / "mailgate.db").one("SELECT COUNT(*) FROM messages") == 0
        assert len(deliverers.attempts) == 1
    finally:
        qm._stopping = True
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_renewal_never_takes_back_a_lease_someone_else_holds(store: SqliteStore,
                                                                    tmp_path: Path) -> None:
    """renew only extends deliveries the owner still holds as Active."""
    await store.submit([message()])
    clock = store.clock
    qid = await queue_id(store, FAX)
    [d] = await store.claim(qid, 10, "owner-a", 60, clock.now())
    assert await store.renew([d.id], "owner-b", clock.now() + 999) == 0
    assert await store.renew([d.id], "owner-a", clock.now() + 120) == 1
    assert Db(tmp_path / "mailgate.db").one(
        "SELECT lease_owner || ' ' || lease_until FROM deliveries WHERE id = ?",
        (d.id,)) == f"owner-a {clock.now() + 120}"


# -- gathering a trickle into batches ----------------------------------------------------

TRICKLE = 40


class RecordingDeliverers(AnyQueue):
    """Delivers every claimed batch at once and records its size and time."""

    def __init__(self) -> None:
        self.batches: list[tuple[float, int]] = []

    async def deliver(self, info: QueueInfo, claimed: list[ClaimedDelivery],
                      org: Organization) -> list[DeliveryResult]:
        self.batches.append((time.monotonic(), len(claimed)))
        return [DeliveryResult(d.id, d.message_id, delivered=[r.id for r in d.recipients])
                for d in claimed]


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
