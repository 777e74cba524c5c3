"""Leases of claimed deliveries: a delivery attempt longer than the lease keeps its lease
(the queue manager renews it), so no one takes the message over and sends it twice.

Real SQLite store and real QueueManager; the deliverer is a stand-in that holds the
attempt open until the test lets it finish (a slow next hop cannot be had on demand).
"""

from __future__ import annotations

import asyncio
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


class HeldDeliverers:
    """Delivers each claimed batch only when `finish` is set; counts the attempts."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finish = asyncio.Event()
        self.attempts: list[list[int]] = []

    @staticmethod
    def handles(delivery_type: str) -> bool:
        return True

    @staticmethod
    def limits(queue: QueueInfo, org: Organization) -> tuple[int, int] | None:
        return None

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
