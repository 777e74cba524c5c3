"""Deliverers per DeliveryType: what the queue manager calls to hand claimed messages off.

- SmtpDeliveryToMailbox: Maildir delivery, one file per recipient.
- NonSmtpGatewayDelivery: the Foreign connector's Drop directory, one file per message.
- DeliveryAgent: a Delivery Agent connector's agent (queue/agent_delivery.py).
- DnsConnectorDelivery, SmartHostConnectorDelivery: a Send connector's SMTP next hop
  (queue/smtp_delivery.py), through MX records or smart hosts.

A deliverer returns one `DeliveryResult` per delivery (delivered / failed / deferred per
recipient, with tracking events and NDRs); rerouted deliveries are done with. A failure of
the next hop itself raises `QueueFailure` with what was finished before it and what was not
(the queue goes to Retry).

Messages whose connector was removed, disabled, moved to another node or made too small
since they were queued are routed again (reference §1.6 "rerouting after configuration
changes").
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Iterator

from mailgate import tracking
from mailgate.categorizer import AGENT_DELIVERY, FOREIGN_DELIVERY, MAILBOX_DELIVERY
from mailgate.clock import Clock, iso
from mailgate.core import status
from mailgate.deliver.agents.api import RecipientResult
from mailgate.deliver.drop import DropDirectory
from mailgate.deliver.mx import Resolver
from mailgate.deliver.maildir import MaildirStore
from mailgate.core.status import Status
from mailgate.dsn import DELIVERED, RELAYED, FailedRecipient, wants
from mailgate.organization import ForeignConnector, Organization
from mailgate.queue.agent_delivery import AgentQueues
from mailgate.queue.confirmation import Confirmations
from mailgate.queue.notices import message_header
from mailgate.queue.smtp_delivery import SmtpQueues
from mailgate.receive.submit import Inbound, InboundRecipient, Submitter
from mailgate.store import ClaimedDelivery, DeliveryResult, QueueInfo, Store, TrackingEvent

class QueueFailure(Exception):
    """The next hop failed: the queue goes to Retry. `results` were finished before it."""

    def __init__(self, last_error: str, results: list[DeliveryResult],
                 unfinished: list[ClaimedDelivery],
                 events: list[TrackingEvent] | None = None) -> None:
        super().__init__(last_error)
        self.last_error = last_error
        self.results = results
        self.unfinished = unfinished
        self.events = events or []


class Deliverers:
    def __init__(self, store: Store, submitter: Submitter, clock: Clock, data_dir: Path,
                 hostname: str, resolver: Resolver | None = None) -> None:
        """`resolver`: DNS for Send connectors (default: dnspython on ExternalDnsServers
        or the system's configuration)."""
        self.store = store
        self.submitter = submitter
        self.clock = clock
        self.data_dir = data_dir
        self.hostname = hostname
        self.maildirs = MaildirStore(data_dir / "mailboxes", hostname)
        self._drops: dict[tuple[str, Path], DropDirectory] = {}
        self.agents = AgentQueues(self)
        self.confirmations = Confirmations(self)
        self.smtp = SmtpQueues(self, resolver)

    @staticmethod
    def handles(delivery_type: str) -> bool:
        return (delivery_type in (MAILBOX_DELIVERY, FOREIGN_DELIVERY, AGENT_DELIVERY)
                or SmtpQueues.handles(delivery_type))

    def limits(self, queue: QueueInfo, org: Organization) -> tuple[int, int] | None:
        """(sessions per queue, messages per session) where the next hop sets them
        (a Delivery Agent connector's MaxConcurrentConnections and
        MaxMessagesPerConnection, a Send connector's SmtpMaxMessagesPerConnection); None
        for the queue manager's defaults."""
        if SmtpQueues.handles(queue.delivery_type):
            return self.smtp.limits(queue, org)
        if queue.delivery_type != AGENT_DELIVERY:
            return None
        c = self.agents.connector(queue, org)
        return (c.max_concurrent_connections, c.max_messages_per_connection) if c else None

    async def deliver(self, queue: QueueInfo, claimed: list[ClaimedDelivery],
                      org: Organization) -> list[DeliveryResult]:
        if queue.delivery_type == MAILBOX_DELIVERY:
            return await asyncio.to_thread(self._to_mailboxes, claimed, org)
        if queue.delivery_type == FOREIGN_DELIVERY:
            return await self._to_drop(queue, claimed, org)
        if queue.delivery_type == AGENT_DELIVERY:
            return await self.agents.deliver(queue, claimed, org)
        if SmtpQueues.handles(queue.delivery_type):
            return await self.smtp.deliver(queue, claimed, org)
        raise QueueFailure(f"451 4.4.0 no deliverer for DeliveryType {queue.delivery_type}",
                           [], claimed)

    # -- helpers -------------------------------------------------------------------------

    def content(self, d: ClaimedDelivery) -> Iterator[bytes]:
        """The message bytes: from the claim for a small message, else from the store."""
        if d.content is not None:
            return iter((d.content,))
        return self.store.iter_content(d.message_id)

    def inbound(self, d: ClaimedDelivery) -> Inbound:
        return Inbound(sender=d.from_address,
                       recipients=[InboundRecipient(r.original or r.address, r.orcpt, r.notify)
                                   for r in d.recipients],
                       content=lambda: self.store.iter_content(d.message_id), size=d.size,
                       header=message_header(self.store, d.message_id), source="QUEUE",
                       message_id=d.internet_message_id, subject=d.subject, ret=d.ret,
                       envid=d.envid, is_dsn=d.is_dsn, date_received=d.date_received)

    def event(self, d: ClaimedDelivery, event_id: str, source: str, recipients: list[str],
               statuses: list[str], **extra: object) -> TrackingEvent:
        """A tracking event about `d`; `extra` fields (connector_id, ...) may also replace
        the defaults (server_hostname: this node, for a SEND event the remote host)."""
        fields: dict[str, object] = dict(
            message_id=d.internet_message_id, internal_message_id=d.message_id,
            recipients=recipients, recipient_status=statuses, sender=d.from_address or "<>",
            return_path=d.from_address or "<>", subject=d.subject, total_bytes=d.size,
            server_hostname=self.hostname, message_info=iso(d.date_received))
        fields.update(extra)
        return tracking.event(event_id, source, **fields)

    # -- mailboxes -----------------------------------------------------------------------

    def _to_mailboxes(self, claimed: list[ClaimedDelivery],
                      org: Organization) -> list[DeliveryResult]:
        mailboxes = {m.guid: m for m in org.mailboxes}
        results: list[DeliveryResult] = []
        touched: list[Path] = []
        now = self.clock.now()
        for d in claimed:
            res = DeliveryResult(d.id, d.message_id)
            failed: list[FailedRecipient] = []
            for r in d.recipients:
                mbx = mailboxes.get(r.mailbox or "")
                if mbx is None:
                    st = status.S550_UNKNOWN_RECIPIENT.with_text(
                        "RESOLVER.ADR.RecipNotFound; the mailbox no longer exists")
                    res.failed.append((r.id, str(st)))
                    failed.append(FailedRecipient(r.address, st, r.orcpt, r.notify))
                    continue
                try:
                    name, maildir = self.maildirs.deliver(
                        d, r, mbx.primary_smtp_address, self.content(d))
                except OSError as exc:
                    res.deferred.append((r.id, f"{status.S451_LOCAL_ERROR.code} "
                                               f"{status.S451_LOCAL_ERROR.enhanced} cannot "
                                               f"write to the mailbox: {exc.strerror or exc}"))
                    continue
                touched.append(maildir)
                res.delivered.append(r.id)
                res.tracking.append(self.event(d, tracking.DELIVER, tracking.STOREDRIVER,
                                                [r.address], [str(status.S250_DELIVERED)],
                                                source_context=name))
            self.success_dsn(org, d, res, DELIVERED, status.S250_DELIVERED, now)
            if res.deferred:
                res.next_attempt = now + org.transport.message_retry_interval
                res.tracking.append(self.event(
                    d, tracking.DEFER, tracking.STOREDRIVER,
                    [r.address for r in d.recipients if r.id in {i for i, _ in res.deferred}],
                    [e for _, e in res.deferred]))
            if failed:
                res.tracking.append(self.event(d, tracking.FAIL, tracking.STOREDRIVER,
                                                [f.address for f in failed],
                                                [str(f.status) for f in failed]))
                ndr = self.submitter.ndr(org, self.inbound(d), failed, now)
                if ndr is not None:
                    res.new_messages.append(ndr)
            results.append(res)
        # The renames into new/ are durable before anything is reported delivered.
        self.maildirs.sync(touched)
        return results

    # -- Drop directories ----------------------------------------------------------------

    def drop(self, connector: ForeignConnector, org: Organization) -> DropDirectory:
        root = org.transport.resolve(self.data_dir, org.transport.root_drop_directory_path)
        assert root is not None
        path = connector.drop_path(root)
        key = (connector.guid, path)
        drop = self._drops.get(key)
        if drop is None:
            drop = self._drops[key] = DropDirectory(path, connector.drop_directory_quota)
        drop.quota = connector.drop_directory_quota
        return drop

    async def _to_drop(self, queue: QueueInfo, claimed: list[ClaimedDelivery],
                       org: Organization) -> list[DeliveryResult]:
        connector = next((c for c in org.foreign_connectors
                          if c.guid == queue.next_hop_connector), None)
        usable = (connector is not None and connector.enabled
                  and connector.hosted_on(self.store.node))
        keep: list[ClaimedDelivery] = []
        for d in claimed:
            too_big = (connector is not None and connector.max_message_size is not None
                       and d.size > connector.max_message_size)
            if usable and not too_big:
                keep.append(d)
            else:
                await self.reroute(d, org)
        if not keep or connector is None:
            return []
        drop = self.drop(connector, org)
        outcomes, error = await asyncio.to_thread(drop.deliver, keep, self.content)
        results = []
        for o in outcomes:
            d = o.delivery
            if connector.delivery_confirmation:
                results.append(self.confirmations.handed_off(connector, d, o.file_name))
                continue
            res = DeliveryResult(d.id, d.message_id, delivered=[r.id for r in d.recipients])
            res.tracking.append(self.event(
                d, tracking.DELIVER, tracking.GATEWAY, [r.address for r in d.recipients],
                [str(status.S250_RELAYED)] * len(d.recipients),
                connector_id=connector.name, source_context=o.file_name))
            if connector.relay_dsn_required:
                self.success_dsn(org, d, res, RELAYED, status.S250_RELAYED.with_text(
                    f"relayed to the {connector.name} connector's Drop directory"),
                    self.clock.now())
            results.append(res)
        if error is not None:
            done = {o.delivery.id for o in outcomes}
            unfinished = [d for d in keep if d.id not in done]
            raise QueueFailure(error.last_error, results, unfinished, self.deferred_all(
                unfinished, tracking.GATEWAY, error.last_error, connector.name))
        return results

    def deferred_all(self, items: list[ClaimedDelivery], source: str, error: str,
                     connector_id: str) -> list[TrackingEvent]:
        """A DEFER event per delivery, every recipient with the same `error`: a next hop
        that failed as a whole (its queue goes to Retry)."""
        return [self.event(d, tracking.DEFER, source, [r.address for r in d.recipients],
                           [error] * len(d.recipients), connector_id=connector_id)
                for d in items]

    def outcome_result(self, org: Organization, d: ClaimedDelivery,
                       outcome: dict[int, RecipientResult], source: str, connector: str,
                       success_action: str | None, success: Status, *,
                       event_id: str = tracking.DELIVER, remote_mta: str | None = None,
                       delivered: dict[str, object] | None = None) -> DeliveryResult:
        """The DeliveryResult of per-recipient outcomes (recipient id → result) from a next
        hop that answers per recipient (a delivery agent, a gateway's confirmation, an SMTP
        next hop): `event_id` (DELIVER, or SEND for SMTP; with the `delivered` fields) /
        DEFER / FAIL events from `source`, a DSN (`success_action`, None: none) for
        delivered recipients that asked for one, an NDR for the failed ones (with
        `remote_mta` when the next hop refused them); deferred recipients are retried at
        the earliest retry time given, else after MessageRetryInterval."""
        now = self.clock.now()
        res = DeliveryResult(d.id, d.message_id)
        failed: list[FailedRecipient] = []
        retry_at: list[float] = []
        by_id = {r.id: r for r in d.recipients}
        for rid, result in outcome.items():
            r = by_id[rid]
            if result.outcome == "delivered":
                res.delivered.append(rid)
            elif result.outcome == "failed":
                res.failed.append((rid, result.status))
                failed.append(FailedRecipient(r.address, Status.parse(result.status), r.orcpt,
                                              r.notify, remote_mta=remote_mta))
            else:
                res.deferred.append((rid, result.status))
                if result.retry_at is not None:
                    retry_at.append(result.retry_at)
        if res.delivered:
            res.tracking.append(self.event(d, event_id, source,
                                           [by_id[i].address for i in res.delivered],
                                           [outcome[i].status for i in res.delivered],
                                           connector_id=connector, **(delivered or {})))
            if success_action is not None:
                self.success_dsn(org, d, res, success_action, success, now)
        if res.deferred:
            res.next_attempt = (max(min(retry_at), now) if retry_at
                                else now + org.transport.message_retry_interval)
            res.tracking.append(self.event(d, tracking.DEFER, source,
                                           [by_id[i].address for i, _ in res.deferred],
                                           [s for _, s in res.deferred], connector_id=connector))
        if failed:
            res.tracking.append(self.event(d, tracking.FAIL, source,
                                           [f.address for f in failed],
                                           [str(f.status) for f in failed],
                                           connector_id=connector))
            ndr = self.submitter.ndr(org, self.inbound(d), failed, now)
            if ndr is not None:
                res.new_messages.append(ndr)
        return res

    def success_dsn(self, org: Organization, d: ClaimedDelivery, res: DeliveryResult,
                     action: str, st: Status, now: float) -> None:
        """A DSN for the delivered recipients that asked for one (NOTIFY=SUCCESS)."""
        asked = [r for r in d.recipients if r.notify and r.id in res.delivered
                 and wants(r.notify, action)]
        if not asked:
            return
        notice = self.submitter.notice(
            org, self.inbound(d),
            [FailedRecipient(r.address, st, r.orcpt, r.notify, action) for r in asked], now)
        if notice is not None:
            res.new_messages.append(notice)

    async def reroute(self, d: ClaimedDelivery, org: Organization) -> None:
        """Route a queued message's recipients again and move it to the new queues."""
        inbound = self.inbound(d)
        prepared = self.submitter.prepare(org, inbound, self.clock.now())
        await self.store.reroute(d.id, d.message_id, prepared.deliveries,
                                 prepared.tracking, prepared.related)
