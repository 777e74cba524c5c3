"""Submission: the common path of every receive source (Pickup now; Replay and SMTP later).

Given an envelope and the message bytes, categorize every recipient, split the message per
next hop (bifurcation), and build what the store persists in one transaction: the message
with its deliveries, the NDR for recipients that failed routing, and the tracking events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from mailgate import tracking
from mailgate.categorizer import Failed, Routed, categorize, group_deliveries, size_limited
from mailgate.dsn import (FAILED, MAX_ATTACH, FailedRecipient, build_dsn, ndr_required,
                          subject_for, wants)
from mailgate.organization import Organization
from mailgate.store import NewMessage, TrackingEvent


@dataclass
class InboundRecipient:
    address: str
    orcpt: str | None = None
    notify: str | None = None
    # The categorizer's answer when the recipient was accepted (SMTP RCPT, size not yet
    # known) and the organization version it came from: reused at submission when that
    # version is current and no connector's size limit is below the message's size.
    route: Routed | None = None
    route_version: int = -1


@dataclass
class Inbound:
    """A received message before categorization."""

    sender: str                      # '' is the null reverse-path
    recipients: list[InboundRecipient]
    content: Callable[[], Iterable[bytes]]
    size: int
    header: bytes                    # the message header, for NDRs
    source: str
    source_context: str | None = None
    message_id: str | None = None
    subject: str | None = None
    ret: str | None = None
    envid: str | None = None
    is_dsn: bool = False
    source_key: str | None = None
    date_received: float = 0.0
    receive_events: list[TrackingEvent] = field(default_factory=list)


class Submitter:
    """Turns an Inbound into the NewMessage (with related NDR) to store."""

    def __init__(self, node: str, hostname: str) -> None:
        self.node = node
        self.hostname = hostname

    def prepare(self, org: Organization, inbound: Inbound, now: float) -> NewMessage:
        routed: list[Routed] = []
        failed: list[Failed] = []
        failed_params: list[InboundRecipient] = []
        size_free = not size_limited(org, inbound.size)
        for r in inbound.recipients:
            if r.route is not None and r.route_version == org.version and size_free:
                result: Routed | Failed = r.route
            else:
                result = categorize(org, self.node, r.address, inbound.size, r.orcpt, r.notify)
            if isinstance(result, Routed):
                routed.append(result)
            else:
                failed.append(result)
                failed_params.append(r)
        events = list(inbound.receive_events)
        common = dict(message_id=inbound.message_id, sender=inbound.sender or "<>",
                      return_path=inbound.sender or "<>", subject=inbound.subject,
                      server_hostname=self.hostname, timestamp=now)
        if routed:
            events.append(tracking.event(
                tracking.SUBMIT, tracking.ROUTING,
                recipients=[r.recipient.address for r in routed],
                recipient_status=[f"{r.queue.delivery_type};{r.queue.next_hop_domain}"
                                  for r in routed], **common))
        related: list[NewMessage] = []
        if failed:
            events.append(tracking.event(
                tracking.FAIL, tracking.ROUTING, recipients=[f.address for f in failed],
                recipient_status=[str(f.status) for f in failed], **common))
            ndr = self.ndr(org, inbound, [FailedRecipient(f.address, f.status, r.orcpt, r.notify)
                                          for f, r in zip(failed, failed_params)], now)
            if ndr is not None:
                related.append(ndr)
        return NewMessage(
            from_address=inbound.sender, content=inbound.content,
            deliveries=group_deliveries(routed), tracking=events,
            internet_message_id=inbound.message_id, subject=inbound.subject,
            date_received=inbound.date_received or now, source=inbound.source,
            source_context=inbound.source_context, ret=inbound.ret, envid=inbound.envid,
            is_dsn=inbound.is_dsn, source_key=inbound.source_key, related=related)

    def ndr(self, org: Organization, inbound: Inbound, recipients: list[FailedRecipient],
            now: float, arrival: float | None = None) -> NewMessage | None:
        """The NDR for `recipients` (Action failed), routed to the sender; None when none
        may be sent."""
        return self.notice(org, inbound, recipients, now, arrival)

    def notice(self, org: Organization, inbound: Inbound, recipients: list[FailedRecipient],
               now: float, arrival: float | None = None,
               will_retry_until: float | None = None) -> NewMessage | None:
        """The DSN about `recipients` (their Action), routed to the sender, for the
        recipients whose NOTIFY asks for it; None when there is nobody to report on or no
        DSN may be sent (to <>, about a DSN)."""
        if not ndr_required(inbound.sender, inbound.is_dsn):
            return None
        recipients = [r for r in recipients if wants(r.notify, r.action)]
        if not recipients:
            return None
        action = recipients[0].action
        domain = org.default_domain.domain_name if org.default_domain else self.hostname
        data, message_id = build_dsn(
            reporting_mta=self.hostname, sender=inbound.sender,
            original_message_id=inbound.message_id, original_subject=inbound.subject,
            original_headers=inbound.header, recipients=recipients, now=now, domain=domain,
            arrival=arrival or inbound.date_received or now, envid=inbound.envid,
            original=inbound.content() if inbound.size <= MAX_ATTACH else None,
            original_size=inbound.size, ret=inbound.ret, will_retry_until=will_retry_until)
        head = data.split(b"\r\n\r\n", 1)[0]
        dsn_event = tracking.event(
            tracking.DSN, tracking.SOURCE_DSN, message_id=message_id,
            recipients=[inbound.sender], reference=inbound.message_id, sender="<>",
            return_path="<>", server_hostname=self.hostname, timestamp=now,
            recipient_status=[f"{'NDR' if action == FAILED else action.capitalize() + ' DSN'}"
                              f" for " + ";".join(r.address for r in recipients)])
        report = Inbound(sender="", recipients=[InboundRecipient(inbound.sender)],
                         content=lambda: [data], size=len(data), header=head,
                         source="DSN", message_id=message_id,
                         subject=subject_for(action, inbound.subject),
                         is_dsn=True, receive_events=[dsn_event])
        return self.prepare(org, report, now)
