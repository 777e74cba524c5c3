"""One delivery agent session: open a connection, deliver each claimed message (split into
items of at most the agent's recipient limit), close.

Contract with the queue manager: `open` raises `AgentUnavailable` when the agent cannot
open a connection (the queue goes to Retry with that text); `deliver` never raises for an
item: an exception or a timeout of the agent defers the item's recipients with the reason.
Sync agents run in worker threads; a sync agent that hangs past the timeout leaves its
thread behind, but the node goes on.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable, Iterator

from mailgate.deliver.agents.api import Item, ItemRecipient, NextHop, RecipientResult
from mailgate.store import ClaimedDelivery, ClaimedRecipient

ITEM_TIMEOUT = 300.0
TIMEOUT_GRACE = 5.0   # beyond an agent's own `timeout` setting


class AgentUnavailable(Exception):
    pass


async def _call(fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await asyncio.wait_for(fn(*args), timeout)
    result = await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout)
    if inspect.isawaitable(result):
        return await asyncio.wait_for(result, timeout)
    return result


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "the agent did not answer in time"
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Session:
    def __init__(self, agent: Any, next_hop: NextHop, recipient_limit: int | None,
                 timeout: float = ITEM_TIMEOUT) -> None:
        self.agent = agent
        self.next_hop = next_hop
        self.recipient_limit = recipient_limit
        self.timeout = timeout
        self.connection: Any = None

    async def open(self) -> None:
        try:
            self.connection = await _call(self.agent.open_connection, self.next_hop,
                                          timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - any agent failure is the queue's LastError
            raise AgentUnavailable(
                f"451 4.4.0 the {self.next_hop.connector} agent cannot connect: "
                f"{_reason(exc)}") from exc

    async def close(self) -> None:
        try:
            await _call(self.connection.close, timeout=self.timeout)
        except Exception:  # noqa: BLE001 - results are in; a failing close changes nothing
            pass

    async def deliver(self, d: ClaimedDelivery, content: Callable[[], Iterator[bytes]]
                      ) -> tuple[dict[int, RecipientResult], bool]:
        """Results per recipient id of the delivery, and whether the agent raised or timed
        out on any of its items (which counts toward the poison threshold)."""
        out: dict[int, RecipientResult] = {}
        raised = False
        size = self.recipient_limit or len(d.recipients) or 1
        for start in range(0, len(d.recipients), size):
            part = d.recipients[start:start + size]
            results, failed = await self._item(d, part, content)
            out.update(results)
            raised = raised or failed
        return out, raised

    async def _item(self, d: ClaimedDelivery, part: list[ClaimedRecipient],
                    content: Callable[[], Iterator[bytes]]
                    ) -> tuple[dict[int, RecipientResult], bool]:
        item = Item(d.message_id, d.internet_message_id, d.from_address,
                    tuple(ItemRecipient(r.address, r.notify, r.orcpt) for r in part),
                    d.envid, d.size, d.date_received, content)
        try:
            results = await _call(self.connection.deliver, item, timeout=self.timeout)
            by_address = {r.address.casefold(): r for r in results}
        except Exception as exc:  # noqa: BLE001 - an agent's failure defers the item
            reason = _reason(exc)
            return {r.id: RecipientResult(r.address, "deferred", f"451 4.4.0 {reason}")
                    for r in part}, True
        return {r.id: by_address.get(r.address.casefold()) or RecipientResult(
                    r.address, "deferred", "451 4.4.0 the agent gave no result for it")
                for r in part}, False
