"""Send connector queues (DnsConnectorDelivery, SmartHostConnectorDelivery): a claimed batch
is one SMTP connection (PRODUCT §2, issue #4).

The queue manager runs up to `CONNECTIONS_PER_QUEUE` drainers on such a queue, each
claiming up to the connector's SmtpMaxMessagesPerConnection messages; for each batch the
next hop is looked up (the queue's domain through MX, else the connector's smart hosts;
DNS servers from ExternalDnsServers, or the injected resolver) and every message is sent
over one `SmtpClient` connection (RSET between messages), which is then closed.

Outcomes:

- per recipient, from the next hop's replies: delivered (SEND event, source SMTP, with the
  connector's name, the remote host as server-hostname and `host[address]:port` as
  source-context), deferred (DEFER; the message waits in Retry for MessageRetryInterval),
  failed (FAIL and an NDR with the remote host as Remote-MTA);
- a next hop that takes DSN parameters reports success itself; one that does not gets
  NOTIFY=SUCCESS recipients an `Action: relayed` DSN from mailgate (RFC 3461 §4.1);
- no target reachable (connect, greeting, EHLO, TLS or AUTH failed on every one), DNS not
  answering, or a password variable missing: the queue goes to Retry with LastError (the
  messages not yet sent get a DEFER event);
- a domain with null MX (RFC 7505) or that does not exist: every recipient fails (NDR);
- a next hop that is this node itself: only the next hops preferred over it are tried,
  and when there are none every recipient fails with 554 5.4.6 (deliver/loops.py).

Messages whose connector was removed, disabled, moved to another node, made too small, or
switched between DNS and smart hosts (or given other smart hosts) are routed again.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, AsyncIterator, Callable

from mailgate import tracking
from mailgate.categorizer import DNS_DELIVERY, SMART_HOST_DELIVERY
from mailgate.core.status import Status
from mailgate.deliver.agents.api import RecipientResult
from mailgate.deliver.loops import before_self, loop_status, own_endpoints
from mailgate.deliver.mx import (
    DnsResolver,
    DnsTemporary,
    Resolver,
    Target,
    Unroutable,
    host_targets,
    mx_targets,
)
from mailgate.deliver.smtp_client import (
    ClientPolicy,
    NoConnection,
    OutMessage,
    OutRecipient,
    Sent,
    SmtpClient,
)
from mailgate.dsn import RELAYED
from mailgate.organization import Organization
from mailgate.smtp_connectors import SendConnector
from mailgate.store import ClaimedDelivery, DeliveryResult, QueueInfo, TrackingEvent

if TYPE_CHECKING:
    from mailgate.queue.delivery import Deliverers

CONNECTIONS_PER_QUEUE = 3


class SmtpQueues:
    def __init__(self, deliverers: Deliverers, resolver: Resolver | None = None) -> None:
        self.d = deliverers
        self.injected = resolver
        self._resolvers: dict[tuple[str, ...], DnsResolver] = {}

    @staticmethod
    def handles(delivery_type: str) -> bool:
        return delivery_type in (DNS_DELIVERY, SMART_HOST_DELIVERY)

    def connector(self, queue: QueueInfo, org: Organization) -> SendConnector | None:
        return next((c for c in org.send_connectors if c.guid == queue.next_hop_connector),
                    None)

    def limits(self, queue: QueueInfo, org: Organization) -> tuple[int, int] | None:
        c = self.connector(queue, org)
        return (CONNECTIONS_PER_QUEUE, c.smtp_max_messages_per_connection) if c else None

    def resolver(self, org: Organization) -> Resolver:
        if self.injected is not None:
            return self.injected
        servers = tuple(org.transport.external_dns_servers)
        found = self._resolvers.get(servers)
        if found is None:
            found = self._resolvers[servers] = DnsResolver.from_setting(servers)
        return found

    def _serves(self, queue: QueueInfo, c: SendConnector | None, d: ClaimedDelivery) -> bool:
        if c is None or not c.enabled or not c.hosted_on(self.d.store.node):
            return False
        if c.max_message_size is not None and d.size > c.max_message_size:
            return False
        if queue.delivery_type == DNS_DELIVERY:
            return not c.smart_hosts
        return bool(c.smart_hosts) and queue.next_hop_domain == c.smart_host_list

    async def deliver(self, queue: QueueInfo, claimed: list[ClaimedDelivery],
                      org: Organization) -> list[DeliveryResult]:
        from mailgate.queue.delivery import QueueFailure

        c = self.connector(queue, org)
        keep = []
        for d in claimed:
            if self._serves(queue, c, d):
                keep.append(d)
            else:
                await self.d.reroute(d, org)
        if not keep or c is None:
            return []

        def deferred(error: str, items: list[ClaimedDelivery]) -> list[TrackingEvent]:
            return self.d.deferred_all(items, tracking.SMTP, error, c.name)

        try:
            if queue.delivery_type == DNS_DELIVERY:
                targets = await mx_targets(self.resolver(org), queue.next_hop_domain, c.port)
            else:
                targets = await host_targets(self.resolver(org), c.smart_hosts, c.port)
        except Unroutable as exc:
            return [self._all_failed(org, d, c, exc.status) for d in keep]
        except DnsTemporary as exc:
            error = f"451 4.4.3 {exc}"
            raise QueueFailure(error, [], keep, deferred(error, keep)) from None
        targets, own = before_self(targets, own_endpoints(org, self.d.store.node))
        if not targets:
            assert own is not None
            st = loop_status(queue.next_hop_domain, own)
            return [self._all_failed(org, d, c, st) for d in keep]
        password = None
        if c.smart_host_auth_mechanism != "None":
            password = os.environ.get(c.auth_password_env or "")
            if password is None:
                error = (f"451 4.7.0 the environment variable {c.auth_password_env} "
                         f"(AuthPasswordEnv of the Send connector {c.name}) is not set for "
                         f"this node")
                raise QueueFailure(error, [], keep, deferred(error, keep))
        client = SmtpClient(targets, ClientPolicy(
            ehlo_name=c.fqdn or self.d.hostname, tls=c.tls, tls_auth_level=c.tls_auth_level,
            tls_domain=c.tls_domain, tls_ca_file=c.tls_ca_file, auth=c.smart_host_auth_mechanism,
            user=c.auth_user, password=password, timeout=c.connection_inactivity_timeout))
        results: list[DeliveryResult] = []
        try:
            for i, d in enumerate(keep):
                try:
                    sent = await client.send(self._message(d))
                except NoConnection as exc:
                    rest = keep[i:]
                    raise QueueFailure(exc.last_error, results, rest,
                                       deferred(exc.last_error, rest)) from None
                results.append(self._result(org, d, c, sent))
        finally:
            await client.close()
        return results

    def _message(self, d: ClaimedDelivery) -> OutMessage:
        return OutMessage(d.from_address,
                          tuple(OutRecipient(r.id, r.address, r.notify, r.orcpt)
                                for r in d.recipients),
                          d.size, self._chunks(d), d.ret, d.envid)

    def _chunks(self, d: ClaimedDelivery) -> Callable[[], AsyncIterator[bytes]]:
        """The stored bytes, read in a worker thread one chunk at a time."""
        async def chunks() -> AsyncIterator[bytes]:
            source = self.d.content(d)
            while True:
                chunk = await asyncio.to_thread(next, source, None)
                if chunk is None:
                    return
                yield chunk
        return chunks

    def _result(self, org: Organization, d: ClaimedDelivery, c: SendConnector,
                sent: Sent) -> DeliveryResult:
        target: Target = sent.target
        return self.d.outcome_result(
            org, d, sent.results, tracking.SMTP, c.name,
            None if sent.dsn else RELAYED,
            Status(250, "2.0.0", f"relayed to {target}, which does not send delivery "
                                 f"notifications"),
            event_id=tracking.SEND, remote_mta=target.host,
            delivered=dict(server_hostname=target.host, source_context=str(target)))

    def _all_failed(self, org: Organization, d: ClaimedDelivery, c: SendConnector,
                    st: Status) -> DeliveryResult:
        outcome = {r.id: RecipientResult(r.address, "failed", str(st)) for r in d.recipients}
        return self.d.outcome_result(org, d, outcome, tracking.SMTP, c.name, None, st)
