"""The queue manager's drainers, against a real SQLite store and a real QueueManager; the
deliverer is a stand-in (a slow next hop cannot be had on demand).

- Leases: a delivery attempt longer than the lease keeps its lease (the drainer renews
  it), so no one takes the message over and sends it twice.
- Gathering: a steady trickle of messages into a queue is delivered in batches, and the
  first message after a quiet spell at once. After a claim that did not fill a batch the
  drainer waits `gather` seconds before it claims again, so one claim, one Drop-directory
  sync and one completion serve many messages (the SMTP benchmark spent half its time on
  delivery without this).
- A failing store: when the node's own store cannot be read for a moment (out of file
  descriptors), a drainer stops without putting its queue in Retry and without losing an
  exception; delivery goes on when the store answers.
"""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import AsyncIterator, TypeVar

import pytest

from mailgate.clock import FakeClock
from mailgate.directory import OrganizationCache
from mailgate.organization import Organization
from mailgate.queue.manager import QueueManager
from mailgate.store import ClaimedDelivery, DeliveryResult, QueueInfo, StoreError
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


S = TypeVar("S", bound=SqliteStore)


async def _opened(kind: type[S], tmp_path: Path) -> AsyncIterator[S]:
    s = kind(tmp_path / "mailgate.db", node="n1", clock=FakeClock(T0))
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async for s in _opened(SqliteStore, tmp_path):
        yield s


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


async def _delivered(deliverers: RecordingDeliverers, count: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while sum(n for _, n in deliverers.batches) < count:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


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
        assert await _delivered(deliverers, TRICKLE + 1, within=10), deliverers.batches
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


# -- wake-ups from SMTP sessions ----------------------------------------------------------

class CommitAfterEmptyClaim(SqliteStore):
    """The real store, where a message is committed (and the queue manager woken for its
    queue, as an SMTP session does) just after a drainer's claim found nothing, while that
    drainer is still running: the race a skipped scheduling pass must survive."""

    manager: QueueManager | None = None
    injected = False

    async def claim(self, queue_id: int, limit: int, owner: str, lease: float,
                    now: float) -> list[ClaimedDelivery]:
        claimed = await super().claim(queue_id, limit, owner, lease, now)
        if not claimed and not self.injected and self.manager is not None:
            self.injected = True
            late = message()
            await self.submit([late])
            self.manager.wake(late.queue_keys())
        return claimed


async def test_a_wake_for_a_busy_queue_is_left_to_its_drainer_and_nothing_waits_for_the_tick(
        tmp_path: Path) -> None:
    """SMTP sessions wake the queue manager for the queues of each committed message; a
    queue that already has all its drainers is left to them (no scheduling pass, which is
    a store read per message). The scheduler's tick is 30 s here, so every delivery below
    comes from a wake-up: the first message's (the queue had no drainer), and the one
    committed after the drainer's last, empty claim (its end wakes the scheduler)."""
    async for store in _opened(CommitAfterEmptyClaim, tmp_path):
        deliverers = RecordingDeliverers()
        qm = QueueManager(store, OrganizationCache(store, "n1"),
                          deliverers, store.clock, "n1/test",  # type: ignore[arg-type]
                          per_queue=1, tick=30, gather=0)
        store.manager = qm
        run = asyncio.create_task(qm.run())
        try:
            await asyncio.sleep(0.1)     # the first pass (at start) found nothing
            first = message()
            await store.submit([first])
            qm.wake(first.queue_keys())
            assert await _delivered(deliverers, 2, within=5), deliverers.batches
            assert store.injected
            assert [n for _, n in deliverers.batches] == [1, 1]
        finally:
            qm._stopping = True
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)


# -- the store failing under a drainer ----------------------------------------------------

class FlakyStore(SqliteStore):
    """The real store, whose claims and queue lookups fail while `failures` is positive, as
    they do when the node is out of file descriptors and the store cannot open the
    database (seen in the T31 end-to-end test when a drainer's gathering pause ended
    mid-flood)."""

    failures = 0
    failed = 0

    def _fail(self) -> None:
        if self.failures:
            self.failures -= 1
            self.failed += 1
            raise StoreError(f"cannot open the store {self.path}: unable to open database file")

    async def queue(self, queue_id: int) -> QueueInfo:
        self._fail()
        return await super().queue(queue_id)

    async def claim(self, queue_id: int, limit: int, owner: str, lease: float,
                    now: float) -> list[ClaimedDelivery]:
        self._fail()
        return await super().claim(queue_id, limit, owner, lease, now)


@pytest.fixture
async def flaky(tmp_path: Path) -> AsyncIterator[FlakyStore]:
    async for s in _opened(FlakyStore, tmp_path):
        yield s


async def _after_a_failing_store(store: FlakyStore, failures: int
                                 ) -> tuple[RecordingDeliverers, QueueInfo, list[str]]:
    """Delivers one message, makes the store fail `failures` claims or queue lookups just as
    the drainer's gathering pause ends, lets the store recover, then submits a second message.
    Returns the deliverer, the queue's state before the second message, and what the
    event loop reported (e.g. a task's exception that nobody retrieved)."""
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
    deliverers = RecordingDeliverers()
    qm = QueueManager(store, OrganizationCache(store, "n1"), deliverers,  # type: ignore[arg-type]
                      store.clock, "n1/test", per_queue=1, tick=0.05, gather=0.2)
    run = asyncio.create_task(qm.run())
    try:
        await store.submit([message()])
        qm.wake()
        assert await _delivered(deliverers, 1, within=5)
        store.failures = failures      # the drainer claims again after 0.2 s
        deadline = time.monotonic() + 5
        while store.failures and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert store.failed == failures
        await asyncio.sleep(0.2)       # the scheduler's next ticks
        state = await store.queue(await queue_id(store, FAX))
        await store.submit([message()])
        qm.wake()
        await _delivered(deliverers, 2, within=3)
        gc.collect()                   # a dropped task reports its lost exception now
        return deliverers, state, reported
    finally:
        qm._stopping = True
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        loop.set_exception_handler(None)


async def test_a_store_failure_in_a_drainer_does_not_put_the_queue_in_retry(
        flaky: FlakyStore) -> None:
    """The store fails once under the drainer: that is the node's trouble, not the next
    hop's. The queue is not put in Retry (which would hold its mail for the retry interval,
    5 minutes here), and the next message is delivered at once."""
    deliverers, state, reported = await _after_a_failing_store(flaky, failures=1)
    assert state.status != "Retry" and state.next_retry_time is None, state
    assert sum(n for _, n in deliverers.batches) == 2, deliverers.batches
    assert reported == []


async def test_a_store_failing_for_a_while_ends_the_drainer_cleanly(
        flaky: FlakyStore) -> None:
    """The store fails for a while, the drainer's claim and its own bookkeeping's lookup: the drainer ends without leaving an exception nobody retrieves, the
    scheduler starts another once the store answers, and delivery goes on."""
    deliverers, state, reported = await _after_a_failing_store(flaky, failures=2)
    assert state.status != "Retry", state
    assert sum(n for _, n in deliverers.batches) == 2, deliverers.batches
    assert reported == []
