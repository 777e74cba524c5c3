"""DeliveryAgent queues: a claimed batch is one agent session (reference §3, PRODUCT §4.7).

The queue manager runs MaxConcurrentConnections drainers on such a queue, each claiming up
to MaxMessagesPerConnection messages; for each batch a session is opened, every message is
delivered as items of at most the agent's recipient limit, and the session is closed. A
connection that cannot be opened puts the queue in Retry with the agent's reason; per
recipient, delivered / deferred (Retry, at the agent's retry time if it gave one) / failed
(NDR) are recorded with DELIVER (source AGENT), DEFER and FAIL tracking events. An agent
that raises or times out on a message defers it and counts toward PoisonThreshold, as a
node failure does; at the threshold the message goes to the Poison queue.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from mailgate import tracking
from mailgate.core.status import Status
from mailgate.deliver.agents.api import NextHop
from mailgate.deliver.agents.registry import AgentError, AgentInfo, find, resolve_settings
from mailgate.deliver.agents.session import (
    ITEM_TIMEOUT,
    TIMEOUT_GRACE,
    AgentUnavailable,
    Session,
)
from mailgate.dsn import RELAYED
from mailgate.organization import DeliveryAgentConnector, Organization
from mailgate.store import ClaimedDelivery, DeliveryResult, QueueInfo

if TYPE_CHECKING:
    from mailgate.queue.delivery import Deliverers


class AgentQueues:
    def __init__(self, deliverers: Deliverers) -> None:
        self.d = deliverers
        self._agents: dict[str, AgentInfo] = {}

    def connector(self, queue: QueueInfo, org: Organization) -> DeliveryAgentConnector | None:
        return next((c for c in org.delivery_agent_connectors
                     if c.guid == queue.next_hop_connector), None)

    def _agent(self, protocol: str) -> AgentInfo:
        info = self._agents.get(protocol)
        if info is None:
            info = self._agents[protocol] = find(protocol)
        return info

    async def deliver(self, queue: QueueInfo, claimed: list[ClaimedDelivery],
                      org: Organization) -> list[DeliveryResult]:
        from mailgate.queue.delivery import QueueFailure

        c = self.connector(queue, org)
        usable = c is not None and c.enabled and c.hosted_on(self.d.store.node)
        keep = []
        for d in claimed:
            if usable and c is not None and (c.max_message_size is None
                                             or d.size <= c.max_message_size):
                keep.append(d)
            else:
                await self.d.reroute(d, org)
        if not keep or c is None:
            return []
        try:
            info = self._agent(c.delivery_protocol)
            settings = resolve_settings(info, dict(c.settings), os.environ)
            assert info.agent is not None
            limit_for = getattr(info.agent, "recipient_limit_for", None)
            limit = limit_for(settings) if callable(limit_for) else info.recipient_limit
            # An agent with its own `timeout` setting gets a little longer from the session,
            # so that its own, more precise reason is the one recorded.
            timeout = (float(settings["timeout"]) + TIMEOUT_GRACE
                       if isinstance(settings.get("timeout"), int) else ITEM_TIMEOUT)
            session = Session(info.agent(), NextHop(c.name, queue.next_hop_domain, settings),
                              limit, timeout)
            await session.open()
        except AgentError as exc:
            raise QueueFailure(f"451 4.4.0 {exc}", [], keep) from None
        except AgentUnavailable as exc:
            raise QueueFailure(str(exc), [], keep) from None
        try:
            results = []
            for d in keep:
                outcome, raised = await session.deliver(d, functools.partial(self.d.content, d))
                res = self.d.outcome_result(
                    org, d, outcome, tracking.AGENT, c.name,
                    RELAYED, Status(250, "2.0.0", f"handed to the {c.name} delivery agent"))
                if raised and res.deferred:
                    self._count_failure(org, d, res)
                results.append(res)
            return results
        finally:
            await session.close()

    def _count_failure(self, org: Organization, d: ClaimedDelivery,
                       res: DeliveryResult) -> None:
        """An agent that raised or hung counts like a node failure toward the poison
        threshold; at the threshold the message goes to the Poison queue."""
        ts = org.transport
        res.failures = 1
        if ts.poison_message_detection_enabled and d.crash_count + 1 >= ts.poison_threshold:
            res.poison = True
            res.tracking.append(self.d.event(
                d, tracking.POISONMESSAGE, tracking.AGENT, [r.address for r in d.recipients],
                ["moved to the Poison queue: the agent failed on it "
                 f"{d.crash_count + 1} times"] * len(d.recipients)))
