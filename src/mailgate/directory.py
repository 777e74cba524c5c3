"""Reading the organization out of the store, and keeping a node's snapshot current.

The CLI changes directory objects while nodes run; every write bumps the store's
configuration version, and `OrganizationCache` reloads its snapshot when it sees a new
version (checked at most every `interval` seconds), so changes apply without a restart.
"""

from __future__ import annotations

import time

from mailgate.organization import (
    AcceptedDomain,
    DeliveryAgentConnector,
    ForeignConnector,
    Mailbox,
    Organization,
    TransportService,
)
from mailgate.smtp_connectors import ReceiveConnector, SendConnector
from mailgate.store import DirectoryObject, Store


def organization_from(objects: list[DirectoryObject], version: int, node: str) -> Organization:
    domains: list[AcceptedDomain] = []
    mailboxes: list[Mailbox] = []
    connectors: list[ForeignConnector] = []
    agents: list[DeliveryAgentConnector] = []
    receive: list[ReceiveConnector] = []
    send: list[SendConnector] = []
    transport = TransportService(node=node)
    for obj in objects:
        if obj.kind == AcceptedDomain.KIND:
            domains.append(AcceptedDomain.from_data(obj.guid, obj.name, obj.data))
        elif obj.kind == Mailbox.KIND:
            mailboxes.append(Mailbox.from_data(obj.guid, obj.name, obj.data))
        elif obj.kind == ForeignConnector.KIND:
            connectors.append(ForeignConnector.from_data(obj.guid, obj.name, obj.data))
        elif obj.kind == DeliveryAgentConnector.KIND:
            agents.append(DeliveryAgentConnector.from_data(obj.guid, obj.name, obj.data))
        elif obj.kind == ReceiveConnector.KIND:
            receive.append(ReceiveConnector.from_data(obj.guid, obj.name, obj.data))
        elif obj.kind == SendConnector.KIND:
            send.append(SendConnector.from_data(obj.guid, obj.name, obj.data))
        elif obj.kind == TransportService.KIND and obj.name.casefold() == node.casefold():
            transport = TransportService.from_data(node, obj.data)
    return Organization(version, domains, mailboxes, connectors, transport, agents, receive,
                        send)


async def load_organization(store: Store, node: str) -> Organization:
    version = await store.config_version()
    return organization_from(await store.list_objects(), version, node)


class OrganizationCache:
    """A node's current view of the organization."""

    def __init__(self, store: Store, node: str, interval: float = 0.25) -> None:
        self._store = store
        self._node = node
        self._interval = interval
        self._org: Organization | None = None
        self._checked = 0.0

    async def get(self, fresh: bool = False) -> Organization:
        """The current snapshot; with `fresh`, the store's version is checked now."""
        now = time.monotonic()
        if self._org is None or fresh or now - self._checked >= self._interval:
            self._checked = now
            version = await self._store.config_version()
            if self._org is None or version != self._org.version:
                self._org = organization_from(await self._store.list_objects(), version,
                                              self._node)
        return self._org
