"""Message commands (Get-, Suspend-, Resume-, Remove-, Export-, Redirect-Message), shared by
the CLI and the REST API.

Identities as in Exchange (reference §4.5): `<node>\\<queue>\\<message>`, `<queue>\\<message>`,
`<message>` or `<node>\\*\\<message>`, where the message integer is the same in every queue
that holds a copy. An identity must name exactly one message in one queue; acting on
several takes --filter. Transition rules (reference §4.3, §4.6): an in-flight message is
suspended or removed when its attempt ends (PendingSuspend / PendingRemove); messages in
the Poison queue cannot be suspended, and resuming one sends it back to the categorizer;
Export-Message needs a suspended message and writes the Replay format (the Drop file
format), so the file can go into a Replay directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailgate.admin import AdminError
from mailgate.admin.queues import QueueView, queue_matches
from mailgate.clock import Clock
from mailgate.core import opath
from mailgate.deliver.drop import replay_envelope
from mailgate.deliver.files import fsync_dir
from mailgate.organization import Organization
from mailgate.queue.notices import Notices
from mailgate.receive.submit import Submitter
from mailgate.store import AWAITING_CONFIRMATION, MessageInfo, MessageQuery, QueueInfo, Store

MESSAGE_SCHEMA: opath.Schema = {
    "Status": "enum", "FromAddress": "string", "Subject": "string", "Size": "int",
    "DateReceived": "datetime", "ExpirationTime": "datetime", "InternetMessageId": "string",
    "LastError": "string", "RetryCount": "int", "MessageSourceName": "string",
    "Queue": "string", "Recipients": "list",
}


@dataclass
class MessageView:
    """A message in one queue, as Get-Message shows it."""

    identity: str
    queue: str
    message: MessageInfo
    expiration_time: float

    def properties(self) -> dict[str, Any]:
        m = self.message
        return {"Identity": self.identity, "Queue": self.queue, "Status": m.status,
                "FromAddress": m.from_address, "Subject": m.subject, "Size": m.size,
                "DateReceived": m.date_received, "ExpirationTime": self.expiration_time,
                "InternetMessageId": m.internet_message_id, "LastError": m.last_error,
                "RetryCount": m.retry_count, "MessageSourceName": m.source,
                "Recipients": [r.address for r in m.recipients]}


class MessageService:
    def __init__(self, store: Store, org: Organization, clock: Clock, hostname: str) -> None:
        self.store = store
        self.org = org
        self.clock = clock
        self.submitter = Submitter(store.node, hostname)
        self.notices = Notices(store, self.submitter, clock, hostname)

    # -- finding messages ----------------------------------------------------------------

    async def _queues(self) -> dict[int, QueueInfo]:
        return {q.id: q for q in await self.store.list_queues(self.store.node)}

    def _view(self, m: MessageInfo, queues: dict[int, QueueInfo]) -> MessageView:
        q = QueueView.of(queues[m.queue_id])
        return MessageView(f"{q.identity}\\{m.message_id}", q.identity, m,
                           m.date_received + self.org.transport.message_expiration_timeout)

    async def _views(self, messages: list[MessageInfo], queues: dict[int, QueueInfo]
                     ) -> list[MessageView]:
        if any(m.queue_id not in queues for m in messages):
            # A queue created after `queues` was read (a new next hop's first message, or
            # the Poison or Unreachable queue): read them again.
            queues = await self._queues()
        return [self._view(m, queues) for m in messages]

    async def _queue_ids(self, queue: str, queues: dict[int, QueueInfo]) -> list[int]:
        found = [qid for qid, q in queues.items() if queue_matches(QueueView.of(q), queue)]
        if not found and queue.rpartition("\\")[2] != "*":
            raise AdminError(f"queue '{queue}' was not found")
        return found

    async def get(self, identity: str | None = None, queue: str | None = None,
                  filter: str | None = None, result_size: int | None = 1000
                  ) -> list[MessageView]:
        if sum(bool(x) for x in (identity, queue, filter)) > 1:
            raise AdminError("give only one of a message identity, --queue or --filter")
        queues = await self._queues()
        query = MessageQuery(limit=result_size,
                             expiration_timeout=self.org.transport.message_expiration_timeout)
        if identity:
            parts = identity.split("\\")
            if len(parts) > 3 or not parts[-1].isdigit():
                raise AdminError(f"'{identity}' is not a message identity (<node>\\<queue>\\"
                                 f"<message number>, <queue>\\<message number> or <message "
                                 f"number>)")
            if len(parts) == 3 and parts[0].casefold() != self.store.node.casefold():
                raise AdminError(f"message '{identity}' was not found (node {parts[0]} is "
                                 f"not this node, {self.store.node})")
            query.message_ids = [int(parts[-1])]
            if len(parts) >= 2 and parts[-2] != "*":
                query.queue_ids = await self._queue_ids(parts[-2], queues)
        elif queue:
            query.queue_ids = await self._queue_ids(queue, queues)
        elif filter:
            try:
                query.filter = opath.parse(filter, MESSAGE_SCHEMA)
            except opath.FilterError as exc:
                raise AdminError(str(exc)) from None
        found = await self._views(await self.store.list_messages(query), queues)
        if identity and not found:
            raise AdminError(f"message '{identity}' was not found")
        return found

    async def select(self, identity: str | None, filter: str | None) -> list[MessageView]:
        """The messages a command acts on: one by identity, or all matching --filter."""
        if bool(identity) == bool(filter):
            raise AdminError("give exactly one of a message identity or --filter")
        views = await self.get(identity=identity, filter=filter, result_size=None)
        if identity and len(views) > 1:
            raise AdminError(f"'{identity}' matches {len(views)} messages "
                             f"({', '.join(v.identity for v in views)}); give the queue too, "
                             f"or use --filter")
        return views

    # -- actions -------------------------------------------------------------------------

    async def suspend(self, identity: str | None = None, filter: str | None = None
                      ) -> list[MessageView]:
        views = await self.select(identity, filter)
        poison = [v for v in views if v.queue.endswith("\\Poison")]
        if poison and identity:
            raise AdminError(f"message {poison[0].identity} is in the Poison queue, where "
                             f"messages are always suspended")
        ids = [v.message.delivery_id for v in views if v not in poison]
        await self.store.suspend_deliveries(ids)
        return await self._again(views)

    async def resume(self, identity: str | None = None, filter: str | None = None
                     ) -> list[MessageView]:
        views = await self.select(identity, filter)
        poison = [v for v in views if v.queue.endswith("\\Poison")]
        others = [v for v in views if v not in poison]
        if identity and others and others[0].message.status not in ("Suspended",
                                                                    "PendingSuspend"):
            raise AdminError(f"message {others[0].identity} is {others[0].message.status}; "
                             f"only suspended messages can be resumed")
        await self.store.resume_deliveries(
            [v.message.delivery_id for v in others
             if v.message.status in ("Suspended", "PendingSuspend")], self.clock.now())
        # Resuming a poison message resubmits it (reference §4.6).
        await self.resubmit(poison, event="released from the Poison queue")
        return await self._again(views)

    async def remove(self, identity: str | None = None, filter: str | None = None,
                     with_ndr: bool = True) -> list[MessageView]:
        views = await self.select(identity, filter)
        results = [self.notices.removal(self.org, v.message, with_ndr) for v in views]
        await self.store.finish_idle(results, "RemoveWithNdr" if with_ndr else "Remove")
        return await self._again(views)

    async def resubmit(self, views: list[MessageView], event: str = "resubmitted"
                       ) -> int:
        """Send messages back to the categorizer (Retry-Queue -Resubmit, Redirect-Message on
        one node, resuming a poison message): they are routed with today's configuration."""
        return await self.notices.resubmit(
            self.org, [v.message for v in views],
            f"{event} by an administrator")

    async def resubmit_queue(self, q: QueueInfo) -> int:
        """Resubmit every Ready or Retry message of a queue (Retry-Queue -Resubmit)."""
        messages = await self.store.list_messages(MessageQuery(
            queue_ids=[q.id], statuses=["Ready", "Retry"], limit=None))
        return await self.resubmit([self._view(m, {q.id: q}) for m in messages])

    async def redirect(self, identity: str | None = None, filter: str | None = None
                       ) -> list[MessageView]:
        """Route messages again with the current configuration; returns those that were
        (messages being delivered right now, or handed off and awaiting their gateway's
        confirmation, are left alone)."""
        views = [v for v in await self.select(identity, filter)
                 if v.message.status not in ("Active", "PendingSuspend", "PendingRemove",
                                             AWAITING_CONFIRMATION)]
        await self.resubmit(views, event="redirected")
        return views

    async def export(self, identity: str, folder: Path) -> Path:
        """Write a suspended message in the Replay format to `folder`: its envelope (the
        recipients still to be delivered) and its bytes exactly as queued."""
        [v] = await self.select(identity, None)
        m = v.message
        if m.status != "Suspended":
            raise AdminError(f"message {v.identity} is {m.status}; suspend it before "
                             f"exporting it (message suspend {v.identity})")
        if not folder.is_dir():
            raise AdminError(f"{folder} is not a folder")
        waiting = [r for r in m.recipients if r.status in ("Ready", "Retry")]
        target = folder / f"{self.store.node}-{m.message_id}-{m.delivery_id}.eml"
        tmp = folder / f".{target.name}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, replay_envelope(m.from_address, m.ret, m.envid, waiting))
                for chunk in self.store.iter_content(m.message_id):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if os.path.lexists(target):
                raise FileExistsError(target)
            os.rename(tmp, target)
            fsync_dir(folder)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise AdminError(f"cannot write {target}: {exc.strerror or exc}") from None
        return target

    async def _again(self, views: list[MessageView]) -> list[MessageView]:
        """The messages' state after an action (those still queued)."""
        if not views:
            return []
        queues = await self._queues()
        fresh = await self.store.list_messages(MessageQuery(
            delivery_ids=[v.message.delivery_id for v in views], limit=None))
        return await self._views(fresh, queues)
