"""The SMTP service of a node: one listening socket per distinct binding of the Receive
connectors hosted here, reconciled with the configuration every second (a new connector
listens, a removed one stops, without a restart), and the shared state the SMTP sessions
need: connection counts per connector and source, TLS contexts, the organization snapshot.

A binding that cannot be opened (address in use, no permission for a port below 1024) is
logged and tried again at the next reconciliation; the node keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from mailgate.categorizer import Failed, categorize
from mailgate.clock import Clock
from mailgate.core import status
from mailgate.core.address import AddressError, parse_recipient_address
from mailgate.core.ip_ranges import best_connector
from mailgate.core.status import Status
from mailgate.directory import OrganizationCache
from mailgate.organization import Mailbox, Organization
from mailgate.receive.backpressure import DiskSpace
from mailgate.receive.submit import InboundRecipient, Submitter
from mailgate.receive.tls_contexts import TlsContexts
from mailgate.smtp_connectors import ReceiveConnector, split_binding
from mailgate.store import NewMessage, QueueKey, Store

log = logging.getLogger(__name__)

RECONCILE = 1.0
TLS_RECHECK = 60.0   # seconds between checks for renewed certificate files


class SmtpService:
    def __init__(self, store: Store, orgs: OrganizationCache, submitter: Submitter,
                 clock: Clock, data_dir: Path, hostname: str,
                 on_submitted: Callable[[set[QueueKey]], None] | None = None,
                 disk: DiskSpace | None = None) -> None:
        self.store = store
        self.orgs = orgs
        self.submitter = submitter
        self.clock = clock
        self.data_dir = data_dir
        self.hostname = hostname
        self.spool_dir = data_dir / "tmp"
        self._on_submitted = on_submitted
        self._org: Organization | None = None
        self._servers: dict[str, asyncio.base_events.Server] = {}
        self._failed: dict[str, str] = {}
        self._per_connector: Counter[str] = Counter()
        self._per_source: Counter[tuple[str, str]] = Counter()
        self.tls = TlsContexts(data_dir / "tls", hostname, clock)
        self._tls_checked = time.monotonic()
        self.disk = disk or DiskSpace(data_dir)
        self.sessions: set[Any] = set()   # open MailgateSMTP connections
        self._chosen: dict[tuple[str, int, str], ReceiveConnector | None] = {}

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        try:
            while True:
                try:
                    await self.reconcile(await self.orgs.get())
                except Exception:  # noqa: BLE001 - keep serving with what is bound
                    log.exception("SMTP listener reconciliation failed")
                await asyncio.sleep(RECONCILE)
        finally:
            for server in self._servers.values():
                server.close()
            self._servers.clear()
            # Sessions are told, not just dropped; a message in DATA gets no 250 (T11).
            for session in list(self.sessions):
                session.shut_down()

    def bindings(self, org: Organization) -> set[str]:
        node = self.store.node
        return {b for c in org.receive_connectors if c.enabled and c.hosted_on(node)
                for b in c.bindings}

    async def reconcile(self, org: Organization) -> None:
        if self._org is None or org.version != self._org.version:
            self._chosen.clear()   # the choice of connector per client, for this version
            self.tls.forget_failures()
        self._org = org
        wanted = self.bindings(org)
        for binding in list(self._servers):
            if binding not in wanted:
                self._servers.pop(binding).close()
                log.info("SMTP: stopped listening on %s", binding)
        from mailgate.receive.smtp_server import MailgateSMTP

        in_use: set[tuple[str | None, str | None]] = set()
        for c in org.receive_connectors:
            if c.enabled and c.hosted_on(self.store.node) and "Tls" in c.auth_mechanism:
                in_use.add((c.tls_certificate, c.tls_key))
                if not self.tls.has((c.tls_certificate, c.tls_key)):
                    await asyncio.to_thread(self.tls_context, c)
        if time.monotonic() - self._tls_checked >= TLS_RECHECK:
            self._tls_checked = time.monotonic()
            await asyncio.to_thread(self.tls.refresh, in_use)

        loop = asyncio.get_running_loop()
        for binding in sorted(wanted - set(self._servers)):
            host, port = split_binding(binding)
            try:
                self._servers[binding] = await loop.create_server(
                    lambda: MailgateSMTP(self), host=host, port=port, reuse_address=True,
                    backlog=512)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                if self._failed.get(binding) != reason:
                    log.error("SMTP: cannot listen on %s: %s", binding, reason)
                self._failed[binding] = reason
                continue
            self._failed.pop(binding, None)
            log.info("SMTP: listening on %s", binding)

    # -- what sessions ask ---------------------------------------------------------------

    def organization(self) -> Organization:
        assert self._org is not None
        return self._org

    def connector_for(self, local_ip: str, local_port: int,
                      remote_ip: str) -> ReceiveConnector | None:
        if self._org is None:
            return None
        key = (local_ip, local_port, remote_ip)
        if key in self._chosen:
            return self._chosen[key]
        found = best_connector(self._org.receive_connectors, local_ip, local_port, remote_ip,
                               node=self.store.node)
        if len(self._chosen) > 10_000:   # many distinct clients: start over
            self._chosen.clear()
        self._chosen[key] = found
        return found

    def admit(self, c: ReceiveConnector, remote_ip: str) -> bool:
        """Count a new connection, unless it is over MaxInboundConnection(PerSource)."""
        if (self._per_connector[c.guid] >= c.max_inbound_connection
                or self._per_source[(c.guid, remote_ip)] >= c.max_inbound_connection_per_source):
            return False
        self._per_connector[c.guid] += 1
        self._per_source[(c.guid, remote_ip)] += 1
        return True

    def release(self, c: ReceiveConnector, remote_ip: str) -> None:
        self._per_connector[c.guid] -= 1
        self._per_source[(c.guid, remote_ip)] -= 1
        if self._per_source[(c.guid, remote_ip)] <= 0:
            del self._per_source[(c.guid, remote_ip)]

    def tls_context(self, c: ReceiveConnector) -> ssl.SSLContext | None:
        """The connector's server context (a generated self-signed certificate when it has
        none). Reconcile loads it in a worker thread before the connector's first client, so
        no session waits for a key to be made, and reloads renewed certificates."""
        return self.tls.get((c.tls_certificate, c.tls_key), c.name)

    def mailbox_for_login(self, user: str) -> Mailbox | None:
        org = self.organization()
        try:
            found = org.mailbox_for(parse_recipient_address(user))
        except AddressError:
            found = None
        if found is None:
            found = next((m for m in org.mailboxes if m.name.casefold() == user.casefold()),
                         None)
        return found

    def accept_recipient(self, c: ReceiveConnector, address: str, relay: bool,
                         orcpt: str | None = None, notify: str | None = None
                         ) -> Status | InboundRecipient:
        """Why a recipient is refused at RCPT, or the recipient to accept, carrying the
        categorizer's answer (the message's size is not known yet: see Submitter.prepare
        for when the answer is reused)."""
        org = self.organization()
        domain = address.rpartition("@")[2]
        if not relay and org.accepted_domain(domain) is None:
            return status.S550_NO_RELAY
        result = categorize(org, self.store.node, address, 0, orcpt, notify)
        if isinstance(result, Failed):
            return result.status
        return InboundRecipient(address, orcpt, notify, result, org.version)

    def submitted(self, message: NewMessage) -> None:
        """`message` is committed: its queues have work."""
        if self._on_submitted is not None:
            self._on_submitted(message.queue_keys())
