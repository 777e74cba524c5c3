"""Queue viewing (Get-Queue). Suspend/resume/retry and message commands come with the
queue engine; they will live here too."""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.admin import AdminError
from mailgate.categorizer import POISON, SUBMISSION, UNREACHABLE
from mailgate.store import QueueInfo, Store

PERSISTENT = {SUBMISSION.next_hop_domain: "Submission",
              UNREACHABLE.next_hop_domain: "Unreachable",
              POISON.next_hop_domain: "Poison"}


@dataclass
class QueueView:
    """A queue as Get-Queue shows it: its Identity and the queue's state."""

    identity: str
    queue: QueueInfo

    @classmethod
    def of(cls, q: QueueInfo) -> QueueView:
        short = PERSISTENT.get(q.next_hop_domain) if q.delivery_type in (
            "Undefined", "Unreachable") else None
        return cls(f"{q.node}\\{short or q.id}", q)

    @property
    def delivery_type(self) -> str:
        return self.queue.delivery_type

    @property
    def next_hop_domain(self) -> str:
        return self.queue.next_hop_domain

    @property
    def message_count(self) -> int:
        return self.queue.message_count


def _matches(view: QueueView, identity: str, node: str) -> bool:
    server, _, name = identity.rpartition("\\")
    if server and server.casefold() != view.identity.split("\\")[0].casefold():
        return False
    if name == "*":
        return True
    short = view.identity.split("\\", 1)[1]
    return name.casefold() in (short.casefold(), view.next_hop_domain.casefold())


async def get_queues(store: Store, identity: str | None = None) -> list[QueueView]:
    views = [QueueView.of(q) for q in await store.list_queues(store.node)]
    if not any(v.delivery_type == "Undefined" and v.next_hop_domain == "Submission"
               for v in views):
        views.insert(0, QueueView(f"{store.node}\\Submission", QueueInfo(
            0, store.node, "Undefined", "Submission", SUBMISSION.next_hop_connector, "Ready",
            0, None, 0, None, None, None)))
    if identity:
        found = [v for v in views if _matches(v, identity, store.node)]
        if not found:
            raise AdminError(f"queue '{identity}' was not found")
        return found
    # Exchange hides the Unreachable and Poison queues when they are empty, and idle
    # delivery queues disappear after QueueMaxIdleTime; empty delivery queues are kept
    # here so that a queue in Retry stays visible.
    return [v for v in views if not (v.identity.endswith(("\\Unreachable", "\\Poison"))
                                     and v.message_count == 0)]
