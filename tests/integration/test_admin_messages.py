"""Get-Message (admin/messages.py) against a real SQLite store.

- A message in a queue that was created after the service read the list of queues (a new
  next hop's first message, or the Poison queue) is shown with its queue. Before, the
  command failed with a KeyError: seen in `make test`, when the CLI ran while the node
  was delivering.
"""

from __future__ import annotations

from pathlib import Path

from mailgate.admin.messages import MessageService
from mailgate.clock import FakeClock
from mailgate.directory import load_organization
from mailgate.store import MessageInfo, MessageQuery
from mailgate.store.sqlite import SqliteStore
from tests.integration.test_store_sqlite import SMS, T0, message


class QueueAppearing(SqliteStore):
    """Stores a message for a new queue (SMS) between the service's reading of the queues
    and its reading of the messages."""

    appeared = False

    async def list_messages(self, query: MessageQuery) -> list[MessageInfo]:
        if not self.appeared:
            self.appeared = True
            await self.submit([message(queues=(SMS,), recipients=("SMS:+15550100",))])
        return await super().list_messages(query)


async def test_a_message_in_a_queue_created_meanwhile_is_shown(tmp_path: Path) -> None:
    store = QueueAppearing(tmp_path / "mailgate.db", node="n1", clock=FakeClock(T0))
    try:
        await store.submit([message()])
        org = await load_organization(store, "n1")
        found = await MessageService(store, org, store.clock, "n1.test").get()
        assert sorted(v.queue for v in found) == ["n1\\1", "n1\\2"]
        assert all(v.identity.startswith(v.queue + "\\") for v in found)
    finally:
        await store.close()
