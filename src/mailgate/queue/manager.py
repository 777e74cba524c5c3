"""The queue manager (Postfix's qmgr): finds delivery queues with work, claims messages
under a lease, hands them to the queue's deliverer and records the per-recipient outcome.

Connection failures (a Drop directory missing, over quota, failing) put the whole queue
in Retry with LastError and a next retry time from the transport settings: first
TransientFailureRetryCount attempts TransientFailureRetryInterval apart, then every
OutboundConnectionFailureRetryInterval. Expiry, delay DSNs and finished removals run as
periodic maintenance (queue/notices.py); after a restart, messages that were being
delivered when the node died are counted, and at PoisonThreshold go to the Poison queue.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Awaitable, Iterable

from mailgate.aio import cancelled, log_failure, wait_event
from mailgate.clock import Clock
from mailgate.directory import OrganizationCache
from mailgate.organization import Organization
from mailgate.queue.delivery import Deliverers, QueueFailure
from mailgate.queue.notices import Notices
from mailgate.store import (UNREACHABLE_QUEUE, MessageQuery, QueueInfo, QueueKey, QueueState,
                            Store, StoreError)

log = logging.getLogger(__name__)

ACTIVE = "Active"
READY = "Ready"
RETRY = "Retry"
SUSPENDED = "Suspended"


@dataclass
class _QueueRun:
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    wanted: int = 0     # drainers the last scheduling pass wanted for the queue


class QueueManager:
    def __init__(self, store: Store, orgs: OrganizationCache, deliverers: Deliverers,
                 clock: Clock, owner: str, *, batch: int = 100, lease: float = 300.0,
                 per_queue: int = 3, tick: float = 0.5, notices: Notices | None = None,
                 maintenance: float = 30.0, renew_every: float | None = None,
                 gather: float = 0.1) -> None:
        self.store = store
        self.orgs = orgs
        self.deliverers = deliverers
        self.clock = clock
        self.owner = owner
        self.batch = batch
        self.lease = lease
        # Renewed well before it runs out (in real seconds; the lease counts in the clock's).
        self.renew_every = renew_every if renew_every is not None else lease / 3
        self.per_queue = per_queue
        # After a claim that did not fill a batch, a drainer waits this long (real
        # seconds) before claiming again: a steady trickle of messages then goes in batches
        # (one claim, one Drop-directory sync, one completion for many messages), not
        # one by one. The first message after a quiet spell is claimed at once.
        self.gather = gather
        self.tick = tick
        self._wake = asyncio.Event()
        self._runs: dict[int, _QueueRun] = {}
        self._known: dict[int, QueueInfo] = {}
        self._by_key: dict[QueueKey, int] = {}
        self._stopping = False
        self.notices = notices
        self.maintenance = maintenance
        self._maintain_at = 0.0
        self._version = -1

    def wake(self, queues: Iterable[QueueKey] | None = None) -> None:
        """Schedule now. `queues`: the queues that just got work, when the caller knows.
        If each already has all the drainers it wants, they claim the work themselves (a
        drainer claims until nothing is left) and the scheduling pass, a store read, is
        skipped: under a flood of SMTP sessions that is one read per message saved."""
        if queues is not None and all(self._drained(key) for key in queues):
            return
        self._wake.set()

    def _drained(self, key: QueueKey) -> bool:
        qid = self._by_key.get(key)
        run = self._runs.get(qid) if qid is not None else None
        return run is not None and 0 < run.wanted <= len(run.tasks)

    async def run(self) -> None:
        await self._recover()
        try:
            while not self._stopping:
                await wait_event(self._wake, self.tick)
                self._wake.clear()
                try:
                    await self._maintain()
                    await self._schedule()
                except Exception as exc:  # noqa: BLE001 - the scheduler must survive and retry
                    log_failure(log, "queue scheduling failed, retrying in 1 s", exc)
                    await asyncio.sleep(1.0)
        finally:
            await self.stop()

    async def _recover(self) -> None:
        """Deliveries claimed when the node last died go back to their queues; a message
        that was being delivered at PoisonThreshold deaths goes to the Poison queue."""
        recovered = await self.store.recover(self.store.node)
        if not recovered:
            return
        log.info("recovered %d deliveries claimed before a restart", len(recovered))
        ts = (await self.orgs.get()).transport
        if not ts.poison_message_detection_enabled:
            return
        poisoned = [did for did, crashes in recovered if crashes >= ts.poison_threshold]
        if poisoned and self.notices is not None:
            found = await self.store.list_messages(MessageQuery(delivery_ids=poisoned,
                                                                limit=None))
            events = [self.notices.poison_event(m) for m in found]
            await self.store.poison(poisoned, events)
            log.warning("%d message(s) moved to the Poison queue after %d node failures "
                        "while they were being delivered", len(poisoned), ts.poison_threshold)

    async def _maintain(self) -> None:
        """Expiry, delay DSNs and finished removals, at most every `maintenance` seconds
        of the (injected) clock: cheap indexed queries, nothing when nothing is due."""
        if self.notices is None:
            return
        org = await self.orgs.get()
        if org.version != self._version:
            # Routing may have changed: what could not be routed may be routable now, and
            # a connector fixed by the administrator (a new Drop directory, a larger quota)
            # is tried at once rather than at its next retry time.
            first = self._version == -1
            self._version = org.version
            await self._resubmit_unreachable(org)
            if not first:
                await self._retry_now()
        now = self.clock.now()
        if now < self._maintain_at:
            return
        self._maintain_at = now + self.maintenance
        await self.notices.finish_removals(org)
        expired = await self.notices.expire(org)
        delayed = await self.notices.notify_delays(org)
        if expired or delayed:
            log.info("queue maintenance: %d message(s) expired, %d delay DSN(s)", expired,
                     delayed)

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for run in self._runs.values() for t in run.tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _resubmit_unreachable(self, org: Organization) -> None:
        assert self.notices is not None
        for q in await self.store.list_queues(self.store.node):
            if q.delivery_type != UNREACHABLE_QUEUE.delivery_type or q.status == SUSPENDED \
                    or not q.message_count:
                continue
            waiting = await self.store.list_messages(MessageQuery(
                queue_ids=[q.id], statuses=["Ready", "Retry"], limit=None))
            moved = await self.notices.resubmit(org, waiting,
                                                "routing configuration changed")
            if moved:
                log.info("resubmitted %d message(s) from the Unreachable queue", moved)

    async def _retry_now(self) -> None:
        now = self.clock.now()
        for q in await self.store.list_queues(self.store.node):
            if q.status == RETRY and q.next_retry_time is not None and q.next_retry_time > now:
                await self.store.set_queue_state(q.id, QueueState(
                    RETRY, q.last_error, q.retry_count, q.first_retry_time, q.last_retry_time,
                    now))

    async def _limits(self, info: QueueInfo, org: Organization | None = None
                      ) -> tuple[int, int]:
        """(drainers, claim batch) for a queue: its next hop's limits, else the defaults."""
        org = org or await self.orgs.get()
        return self.deliverers.limits(info, org) or (self.per_queue, self.batch)

    async def _queue(self, queue_id: int) -> QueueInfo:
        """The queue's identity (delivery type, next hop), read once: it never changes.
        Its state (status, retry times, count) in the returned info is as of that read."""
        info = self._known.get(queue_id)
        if info is None:
            info = self._known[queue_id] = await self.store.queue(queue_id)
            self._by_key[QueueKey(info.delivery_type, info.next_hop_domain,
                                  info.next_hop_connector)] = queue_id
        return info

    async def _schedule(self) -> None:
        for qid in await self.store.ready_queues(self.clock.now()):
            info = await self._queue(qid)
            if not self.deliverers.handles(info.delivery_type):
                continue
            run = self._runs.setdefault(qid, _QueueRun())
            run.wanted, _ = await self._limits(info)
            while len(run.tasks) < run.wanted:
                task = asyncio.create_task(self._drain(qid), name=f"queue-{qid}")
                run.tasks.add(task)
                task.add_done_callback(run.tasks.discard)
                # A drainer that found nothing more may have claimed just before new work
                # was committed, whose wake() saw it still running: look again.
                task.add_done_callback(lambda _: self._wake.set())

    async def _drain(self, queue_id: int) -> None:
        partial = False
        try:
            # Read once: claim() itself gives nothing once the queue is Suspended, and the
            # state is read again where it matters (entering Retry).
            info = await self.store.queue(queue_id)
            if info.status == SUSPENDED:
                return
            while not self._stopping:
                if partial and self.gather:
                    await asyncio.sleep(self.gather)
                org = await self.orgs.get()
                _, batch = await self._limits(info, org)
                claimed = await self.store.claim(queue_id, batch, self.owner, self.lease,
                                                 self.clock.now())
                if not claimed:
                    return
                partial = len(claimed) < batch
                if info.status != ACTIVE:
                    await self.store.set_queue_state(info.id, QueueState(ACTIVE))
                    info = replace(info, status=ACTIVE)
                renewer = asyncio.create_task(self._renew([d.id for d in claimed]),
                                              name=f"lease-{queue_id}")
                try:
                    results = await self.deliverers.deliver(info, claimed, org)
                except QueueFailure as failure:
                    await self.store.complete(failure.results)
                    await self.store.release([d.id for d in failure.unfinished],
                                             failure.last_error)
                    if failure.events:
                        await self.store.add_tracking(failure.events)
                    await self._enter_retry(await self.store.queue(queue_id), org,
                                            failure.last_error)
                    return
                finally:
                    await cancelled(renewer)
                await self.store.complete(results)
        except asyncio.CancelledError:
            raise
        except StoreError as exc:
            # The node's own store failed (out of descriptors, a failing disk): not the
            # next hop's fault, so the queue is not put in Retry. The drainer ends; the
            # scheduler starts another at its next tick once the store answers, and what
            # this one had claimed is taken over when its lease runs out.
            log_failure(log, f"delivery from queue {queue_id} stopped, the store failed", exc)
        except Exception:  # noqa: BLE001 - one queue's bug must not stop the node
            log.exception("delivery from queue %s failed", queue_id)
            await self._guarded(self._retry_after_bug(queue_id))
        finally:
            if not self._stopping:
                await self._guarded(self._settle(queue_id))

    async def _retry_after_bug(self, queue_id: int) -> None:
        info = await self.store.queue(queue_id)
        await self._enter_retry(info, await self.orgs.get(),
                                "451 4.3.0 internal error during delivery (see the node log)")

    @staticmethod
    async def _guarded(step: Awaitable[None]) -> None:
        """A drainer's last bookkeeping: a store failure here is logged, never left as the
        task's unretrieved exception. A queue left Active is still scheduled (only Retry
        and Suspended are not), and its next drainer sets its state."""
        try:
            await step
        except StoreError as exc:
            log_failure(log, "queue bookkeeping failed, the store failed", exc)

    async def _renew(self, delivery_ids: list[int]) -> None:
        """While a delivery attempt runs, keep its lease: an SMTP session or an agent may
        take longer than the lease (a slow link, a 10-minute inactivity timeout), and an
        expired lease would let the deliveries be claimed again and sent twice."""
        while True:
            await asyncio.sleep(self.renew_every)
            try:
                await self.store.renew(delivery_ids, self.owner, self.clock.now() + self.lease)
            except Exception:  # noqa: BLE001 - retried at the next interval
                log.exception("could not renew the lease of %d deliveries", len(delivery_ids))

    async def _settle(self, queue_id: int) -> None:
        """When the last drainer of a queue finishes, the queue is Ready again (if nothing
        put it in Retry or Suspended meanwhile)."""
        run = self._runs.get(queue_id)
        current = asyncio.current_task()
        if run is not None and any(t is not current and not t.done() for t in run.tasks):
            return
        info = await self.store.queue(queue_id)
        if info.status == ACTIVE:
            await self.store.set_queue_state(info.id, QueueState(READY))

    async def _enter_retry(self, info: QueueInfo, org: Organization, last_error: str) -> None:
        ts = org.transport
        now = self.clock.now()
        count = info.retry_count + 1
        interval = (ts.transient_failure_retry_interval
                    if count <= ts.transient_failure_retry_count
                    else ts.outbound_connection_failure_retry_interval)
        state = QueueState(RETRY, last_error, count,
                           info.first_retry_time if info.status == RETRY and info.first_retry_time
                           else now, now, now + interval)
        log.warning("queue %s\\%s in Retry until %.0f: %s", info.node, info.next_hop_domain,
                    state.next_retry_time, last_error)
        await self.store.set_queue_state(info.id, state)
