"""Queue commands (Get-Queue, Suspend-Queue, Resume-Queue, Retry-Queue), shared by the CLI
and the REST API.

Identities as in Exchange (reference §4.5): `<node>\\<queue>` or `<queue>`, where the queue
is its integer, its NextHopDomain, or Submission / Unreachable / Poison; `*` is every
queue. Rules (reference §4.6): an identity must name exactly one queue (several need
--filter); only Active or Retry queues (and Unreachable) can be suspended; resuming leaves
each message's own status alone; Retry-Queue is for queues in Retry and, with --resubmit,
sends the queue's messages back to the categorizer (required for Unreachable; never the
Poison queue as a whole).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailgate.admin import AdminError
from mailgate.categorizer import POISON, SUBMISSION, UNREACHABLE
from mailgate.core import opath
from mailgate.store import QueueInfo, QueueState, Store

PERSISTENT = {SUBMISSION.next_hop_domain: "Submission",
              UNREACHABLE.next_hop_domain: "Unreachable",
              POISON.next_hop_domain: "Poison"}

QUEUE_SCHEMA: opath.Schema = {
    "Identity": "string", "DeliveryType": "enum", "Status": "enum", "MessageCount": "int",
    "NextHopDomain": "string", "NextHopConnector": "string", "NextHopCategory": "enum",
    "LastError": "string", "RetryCount": "int", "FirstRetryTime": "datetime",
    "LastRetryTime": "datetime", "NextRetryTime": "datetime",
}
_INTERNAL = ("SmtpDeliveryToMailbox", "Undefined", "Unreachable")


@dataclass
class QueueView:
    """A queue as Get-Queue shows it: its Identity and the queue's state."""

    identity: str
    queue: QueueInfo

    @classmethod
    def of(cls, q: QueueInfo) -> QueueView:
        return cls(f"{q.node}\\{cls.short_name(q)}", q)

    @staticmethod
    def short_name(q: QueueInfo) -> str:
        short = PERSISTENT.get(q.next_hop_domain) if q.delivery_type in (
            "Undefined", "Unreachable") else None
        return short or str(q.id)

    @property
    def persistent(self) -> str | None:
        """Submission, Unreachable or Poison; None for a delivery queue."""
        name = self.identity.split("\\", 1)[1]
        return name if name in PERSISTENT.values() else None

    @property
    def delivery_type(self) -> str:
        return self.queue.delivery_type

    @property
    def next_hop_domain(self) -> str:
        return self.queue.next_hop_domain

    @property
    def message_count(self) -> int:
        return self.queue.message_count

    def properties(self) -> dict[str, Any]:
        q = self.queue
        return {"Identity": self.identity, "DeliveryType": q.delivery_type, "Status": q.status,
                "MessageCount": q.message_count, "NextHopDomain": q.next_hop_domain,
                "NextHopConnector": q.next_hop_connector,
                "NextHopCategory": "Internal" if q.delivery_type in _INTERNAL else "External",
                "LastError": q.last_error, "RetryCount": q.retry_count,
                "FirstRetryTime": q.first_retry_time, "LastRetryTime": q.last_retry_time,
                "NextRetryTime": q.next_retry_time}


def queue_matches(view: QueueView, identity: str) -> bool:
    """Whether a queue identity (`<node>\\<queue>`, `<queue>`, `*`) names this queue."""
    server, _, name = identity.rpartition("\\")
    if server and server.casefold() != view.identity.split("\\")[0].casefold():
        return False
    if name == "*":
        return True
    short = view.identity.split("\\", 1)[1]
    return name.casefold() in (short.casefold(), view.next_hop_domain.casefold())


async def _all(store: Store) -> list[QueueView]:
    views = [QueueView.of(q) for q in await store.list_queues(store.node)]
    if not any(v.persistent == "Submission" for v in views):
        views.insert(0, QueueView(f"{store.node}\\Submission", QueueInfo(
            0, store.node, "Undefined", "Submission", SUBMISSION.next_hop_connector, "Ready",
            0, None, 0, None, None, None)))
    return views


def parse_filter(text: str) -> opath.Filter:
    try:
        return opath.parse(text, QUEUE_SCHEMA)
    except opath.FilterError as exc:
        raise AdminError(str(exc)) from None


async def get_queues(store: Store, identity: str | None = None,
                     filter: str | None = None, result_size: int | None = 1000
                     ) -> list[QueueView]:
    if identity and filter:
        raise AdminError("give a queue identity or --filter, not both")
    views = await _all(store)
    if identity:
        found = [v for v in views if queue_matches(v, identity)]
        if not found:
            raise AdminError(f"queue '{identity}' was not found")
        return found[:result_size]
    if filter:
        f = parse_filter(filter)
        return [v for v in views if f.matches(v.properties())][:result_size]
    # Exchange hides the Unreachable and Poison queues when they are empty, and idle
    # delivery queues disappear after QueueMaxIdleTime; empty delivery queues are kept
    # here so that a queue in Retry stays visible.
    return [v for v in views if not (v.persistent in ("Unreachable", "Poison")
                                     and v.message_count == 0)][:result_size]


async def select_queues(store: Store, identity: str | None, filter: str | None
                        ) -> list[QueueView]:
    """The queues a command acts on: one by identity (an error if it names several), or
    every queue matching --filter."""
    if bool(identity) == bool(filter):
        raise AdminError("give exactly one of a queue identity or --filter")
    views = await get_queues(store, identity, filter, None)
    if identity and len(views) > 1:
        raise AdminError(f"'{identity}' matches {len(views)} queues "
                         f"({', '.join(v.identity for v in views)}); use --filter to act "
                         f"on several")
    return views


async def suspend_queues(store: Store, identity: str | None = None,
                         filter: str | None = None) -> list[QueueView]:
    out = []
    for v in await select_queues(store, identity, filter):
        q = v.queue
        if v.persistent in ("Submission", "Poison"):
            raise AdminError(f"queue {v.identity} cannot be suspended"
                             + (": mailgate categorizes messages as they are received"
                                if v.persistent == "Submission" else
                                ": its messages are already suspended"))
        if q.status == "Suspended":
            if identity:
                raise AdminError(f"queue {v.identity} is already suspended")
            continue
        if q.status not in ("Active", "Retry") and v.persistent != "Unreachable":
            if identity:
                raise AdminError(f"queue {v.identity} is {q.status}; only queues in Active "
                                 f"or Retry status can be suspended")
            continue
        await store.set_queue_state(q.id, QueueState(
            "Suspended", q.last_error, q.retry_count, q.first_retry_time, q.last_retry_time,
            q.next_retry_time), force=True)
        out.append(v)
    return await _refresh(store, out)


async def resume_queues(store: Store, identity: str | None = None,
                        filter: str | None = None) -> list[QueueView]:
    out = []
    for v in await select_queues(store, identity, filter):
        q = v.queue
        if q.status != "Suspended":
            if identity:
                raise AdminError(f"queue {v.identity} is not suspended ({q.status})")
            continue
        # Resumed queues try at once; their messages keep their own status.
        await store.set_queue_state(q.id, QueueState("Ready", q.last_error), force=True)
        out.append(v)
    return await _refresh(store, out)


async def retry_queues(store: Store, now: float, identity: str | None = None,
                       filter: str | None = None, resubmit: bool = False
                       ) -> list[QueueView]:
    """Retry-Queue: an attempt now for queues in Retry; with `resubmit`, their messages go
    back to the categorizer (done by the caller with `resubmit_messages`)."""
    out = []
    for v in await select_queues(store, identity, filter):
        q = v.queue
        if v.persistent == "Poison":
            raise AdminError("the Poison queue cannot be retried or resubmitted as a whole;"
                             " resume its messages one by one")
        if v.persistent == "Unreachable" and not resubmit:
            raise AdminError("the Unreachable queue can only be retried with --resubmit true")
        if v.persistent is None and q.status != "Retry" and not resubmit:
            if identity:
                raise AdminError(f"queue {v.identity} is {q.status}; Retry-Queue is for "
                                 f"queues in Retry status")
            continue
        if q.status == "Retry":
            await store.set_queue_state(q.id, QueueState(
                "Retry", q.last_error, q.retry_count, q.first_retry_time, q.last_retry_time,
                now))
        out.append(v)
    return out


async def _refresh(store: Store, views: list[QueueView]) -> list[QueueView]:
    return [QueueView.of(await store.queue(v.queue.id)) for v in views]
