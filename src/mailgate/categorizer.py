"""The categorizer: resolves each envelope recipient against the organization and routes it
to a next hop (PRODUCT §4.3–4.4, reference §1.6–1.7).

Resolution order for a recipient:
1. an SMTP address in the *default* accepted domain whose local part is IMCEA-encapsulated
   is decoded to its native `TYPE:value` (SMTP and X500 types are refused, 5.1.1);
2. an address (of any type) that is a mailbox's proxy address goes to that mailbox, rewritten
   to the primary SMTP address with the original kept (ORCPT);
3. an SMTP address in an authoritative accepted domain that is no mailbox: NDR 5.1.1;
4. everything else is routed by connector address spaces (Foreign, Delivery Agent and Send
   connectors together): no connector → Unreachable (SMTP) or NDR 5.1.2 (other types); too
   large for every matching connector → NDR 5.3.4.

Queues (NextHopSolutionKey): a Foreign connector's `NonSmtpGatewayDelivery` and a Delivery
Agent connector's `DeliveryAgent` queue per matched space; a Send connector routing through
DNS has one `DnsConnectorDelivery` queue per recipient domain (NextHopDomain = the domain,
lower-case), one routing through smart hosts one `SmartHostConnectorDelivery` queue
(NextHopDomain = its smart hosts as shown, `relay.example.net,[10.0.0.1]`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.core import status
from mailgate.core.address import (
    REFUSED_IMCEA_TYPES,
    AddressError,
    imcea_decode,
    parse_recipient_address,
    xtext,
)
from mailgate.core.routing import Connector, ConnectorChoice, NoConnector, select_connector
from mailgate.core.status import Status
from mailgate.organization import ZERO_GUID, DeliveryAgentConnector, Organization
from mailgate.smtp_connectors import SendConnector
from mailgate.store import (
    POISON_QUEUE,
    SUBMISSION_QUEUE,
    UNREACHABLE_QUEUE,
    NewDelivery,
    NewRecipient,
    QueueKey,
)

MAILBOX_DELIVERY = "SmtpDeliveryToMailbox"
FOREIGN_DELIVERY = "NonSmtpGatewayDelivery"
AGENT_DELIVERY = "DeliveryAgent"
DNS_DELIVERY = "DnsConnectorDelivery"
SMART_HOST_DELIVERY = "SmartHostConnectorDelivery"
MAILBOX_NEXT_HOP = "mailboxes"
UNREACHABLE = UNREACHABLE_QUEUE
SUBMISSION = SUBMISSION_QUEUE
POISON = POISON_QUEUE


@dataclass(frozen=True)
class Routed:
    queue: QueueKey
    recipient: NewRecipient


@dataclass(frozen=True)
class Failed:
    address: str
    status: Status


def categorize(org: Organization, node: str, text: str, size: int,
               orcpt: str | None = None, notify: str | None = None) -> Routed | Failed:
    """Resolve and route one envelope recipient given as received (`text`)."""
    try:
        address = parse_recipient_address(text)
    except AddressError as exc:
        return Failed(text, status.S550_UNKNOWN_RECIPIENT.with_text(str(exc)))
    original: str | None = None
    if address.is_smtp:
        domain = address.value.rpartition("@")[2]
        default = org.default_domain
        if default is not None and domain.lower() == default.domain_name.lower():
            try:
                decoded = imcea_decode(address.smtp_address)
            except AddressError as exc:
                return Failed(text, status.S550_UNKNOWN_RECIPIENT.with_text(str(exc)))
            if decoded is not None:
                if decoded.type in REFUSED_IMCEA_TYPES:
                    return Failed(text, status.S550_IMCEA_TYPE_REFUSED)
                original, address = address.value, decoded
    mailbox = org.mailbox_for(address)
    if mailbox is not None:
        primary = mailbox.primary_smtp_address
        if original is None and address.key != parse_recipient_address(primary).key:
            original = str(address)
        if orcpt is None and original is not None and _is_smtp_text(original):
            orcpt = f"rfc822;{xtext(original)}"
        return Routed(QueueKey(MAILBOX_DELIVERY, MAILBOX_NEXT_HOP, ZERO_GUID),
                      NewRecipient(primary, original, orcpt, notify, mailbox.guid))
    if address.is_smtp:
        domain = address.value.rpartition("@")[2]
        accepted = org.accepted_domain(domain)
        if accepted is not None and accepted.domain_type == "Authoritative":
            return Failed(str(address), status.S550_UNKNOWN_RECIPIENT)
    if orcpt is None and original is not None:
        orcpt = f"rfc822;{xtext(original)}"
    choice = select_connector([*org.foreign_connectors, *org.delivery_agent_connectors,
                               *org.send_connectors], address, size, node)
    if isinstance(choice, ConnectorChoice):
        return Routed(next_hop(choice, address.value),
                      NewRecipient(str(address), original, orcpt, notify))
    if isinstance(choice, NoConnector):
        if address.is_smtp:
            return Routed(UNREACHABLE, NewRecipient(str(address), original, orcpt, notify))
        return Failed(str(address), status.S550_NO_CONNECTOR)
    return Failed(str(address), status.S552_TOO_LARGE)


def size_limited(org: Organization, size: int) -> bool:
    """Whether a message of `size` bytes is too large for some connector: only then can
    its size change where a recipient is routed (see routing.select_connector)."""
    connectors: list[Connector] = [*org.foreign_connectors, *org.delivery_agent_connectors,
                                   *org.send_connectors]
    return any(c.max_message_size is not None and size > c.max_message_size
               for c in connectors)


def next_hop(choice: ConnectorChoice, value: str) -> QueueKey:
    """The queue of a recipient (`value`: its address without type) routed by `choice`."""
    conn = choice.connector
    guid = getattr(conn, "guid", ZERO_GUID)
    if isinstance(conn, SendConnector):
        if conn.smart_hosts:
            return QueueKey(SMART_HOST_DELIVERY, conn.smart_host_list, guid)
        return QueueKey(DNS_DELIVERY, value.rpartition("@")[2].lower(), guid)
    space = choice.space
    hop = space.space if space.type == "SMTP" else space.type
    kind = AGENT_DELIVERY if isinstance(conn, DeliveryAgentConnector) else FOREIGN_DELIVERY
    return QueueKey(kind, hop, guid)


def _is_smtp_text(text: str) -> bool:
    try:
        return parse_recipient_address(text).is_smtp
    except AddressError:
        return False


def group_deliveries(routed: list[Routed]) -> list[NewDelivery]:
    """Bifurcation: one delivery per next hop, recipients in their original order."""
    groups: dict[QueueKey, list[NewRecipient]] = {}
    for r in routed:
        groups.setdefault(r.queue, []).append(r.recipient)
    return [NewDelivery(q, rs) for q, rs in groups.items()]
