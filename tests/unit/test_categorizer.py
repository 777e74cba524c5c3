"""Recipient resolution and routing (PRODUCT §4.3–4.4, reference §1.6–1.7, §8.4 IMCEA)."""

from __future__ import annotations

from mailgate.categorizer import (
    DNS_DELIVERY,
    FOREIGN_DELIVERY,
    MAILBOX_DELIVERY,
    SMART_HOST_DELIVERY,
    UNREACHABLE,
    Failed,
    Routed,
    categorize,
    group_deliveries,
    size_limited,
)
from mailgate.core.address_space import AddressSpace
from mailgate.organization import (
    AcceptedDomain,
    ForeignConnector,
    Mailbox,
    Organization,
    TransportService,
)
from mailgate.receive.submit import Inbound, InboundRecipient, Submitter
from mailgate.smtp_connectors import SendConnector
from mailgate.store import QueueKey


def org(*, connectors: list[ForeignConnector] | None = None,
        domains: list[AcceptedDomain] | None = None) -> Organization:
    return Organization(
        1,
        domains or [AcceptedDomain("d1", "contoso.test", "contoso.test", "Authoritative", True),
                    AcceptedDomain("d2", "relay.test", "relay.test", "InternalRelay", False)],
        [Mailbox("m1", "alice", "alice@contoso.test", ("FAX:+15550001", "smtp:al@contoso.test"))],
        connectors if connectors is not None else [
            ForeignConnector("c1", "Fax", (AddressSpace.parse("FAX:*;1"),))],
        TransportService("n1"))


def route(o: Organization, text: str, size: int = 100) -> Routed:
    result = categorize(o, "n1", text, size)
    assert isinstance(result, Routed), result
    return result


def fail(o: Organization, text: str, size: int = 100) -> Failed:
    result = categorize(o, "n1", text, size)
    assert isinstance(result, Failed), result
    return result


def test_mailbox_by_primary_address_case_insensitively() -> None:
    r = route(org(), "Alice@CONTOSO.test")
    assert r.queue.delivery_type == MAILBOX_DELIVERY
    assert r.recipient.address == "alice@contoso.test"
    assert r.recipient.mailbox == "m1"


def test_secondary_smtp_proxy_is_rewritten_and_kept_as_orcpt() -> None:
    r = route(org(), "al@contoso.test")
    assert r.recipient.address == "alice@contoso.test"
    assert r.recipient.original == "al@contoso.test"
    assert r.recipient.orcpt == "rfc822;al@contoso.test"


def test_imcea_fax_in_default_domain_goes_to_the_fax_connector() -> None:
    r = route(org(), "IMCEAFAX-+2B15551234@contoso.test")
    assert r.queue.delivery_type == FOREIGN_DELIVERY
    assert r.queue.next_hop_domain == "FAX"
    assert r.queue.next_hop_connector == "c1"
    assert r.recipient.address == "FAX:+15551234"
    assert r.recipient.original == "IMCEAFAX-+2B15551234@contoso.test"
    # ORCPT is RFC 3461 xtext: the "+" of the IMCEA escape is itself escaped.
    assert r.recipient.orcpt == "rfc822;IMCEAFAX-+2B2B15551234@contoso.test"


def test_imcea_matching_a_mailbox_proxy_goes_to_the_mailbox() -> None:
    r = route(org(), "imceafax-+2B15550001@contoso.test")
    assert r.queue.delivery_type == MAILBOX_DELIVERY
    assert r.recipient.address == "alice@contoso.test"


def test_imcea_outside_the_default_domain_is_not_decoded() -> None:
    # relay.test is accepted but not the default: the address stays an SMTP address and,
    # with no connector for it, waits in Unreachable.
    r = route(org(), "IMCEAFAX-+2B15551234@relay.test")
    assert r.queue == UNREACHABLE
    assert r.recipient.address == "IMCEAFAX-+2B15551234@relay.test"


def test_imcea_smtp_and_x500_types_are_refused() -> None:
    for text in ("IMCEASMTP-bob+40fabrikam+2Etest@contoso.test",
                 "IMCEAX500-+2FO+3DContoso@contoso.test"):
        f = fail(org(), text)
        assert f.status.enhanced == "5.1.1"


def test_unknown_recipient_in_authoritative_domain_is_5_1_1() -> None:
    assert fail(org(), "nobody@contoso.test").status.enhanced == "5.1.1"


def test_unknown_recipient_in_internal_relay_domain_is_routed_not_failed() -> None:
    assert route(org(), "nobody@relay.test").queue == UNREACHABLE


def test_external_smtp_recipient_without_connector_goes_to_unreachable() -> None:
    assert route(org(), "bob@fabrikam.test").queue == UNREACHABLE


def test_non_smtp_recipient_without_connector_is_5_1_2() -> None:
    assert fail(org(connectors=[]), "IMCEAFAX-+2B1555@contoso.test").status.enhanced == "5.1.2"
    assert fail(org(), "IMCEASMS-+2B1555@contoso.test").status.enhanced == "5.1.2"


def test_too_large_for_every_connector_is_5_3_4() -> None:
    small = ForeignConnector("c1", "Fax", (AddressSpace.parse("FAX:*;1"),), max_message_size=10)
    assert fail(org(connectors=[small]), "IMCEAFAX-+2B1555@contoso.test",
                size=11).status.enhanced == "5.3.4"


def test_smtp_address_space_on_foreign_connector() -> None:
    c = ForeignConnector("c2", "FaxDomain", (AddressSpace.parse("fax.contoso.test;1"),))
    r = route(org(connectors=[c]), "15551234@fax.contoso.test")
    assert r.queue.delivery_type == FOREIGN_DELIVERY
    assert r.queue.next_hop_domain == "fax.contoso.test"


def test_invalid_address_fails_cleanly() -> None:
    assert fail(org(), "not an address").status.enhanced == "5.1.1"


def test_bifurcation_one_delivery_per_next_hop() -> None:
    o = org()
    routed = [route(o, a) for a in ("alice@contoso.test", "IMCEAFAX-+2B1@contoso.test",
                                    "IMCEAFAX-+2B2@contoso.test", "bob@fabrikam.test")]
    deliveries = group_deliveries(routed)
    assert [(d.queue.delivery_type, [r.address for r in d.recipients]) for d in deliveries] == [
        (MAILBOX_DELIVERY, ["alice@contoso.test"]),
        (FOREIGN_DELIVERY, ["FAX:+1", "FAX:+2"]),
        ("Unreachable", ["bob@fabrikam.test"]),
    ]


def send_org(*send: SendConnector, foreign: list[ForeignConnector] | None = None
             ) -> Organization:
    o = org(connectors=foreign)
    o.send_connectors = list(send)
    return o


def test_send_connector_through_dns_has_a_queue_per_recipient_domain() -> None:
    internet = SendConnector("s1", "Internet", (AddressSpace.parse("*"),))
    o = send_org(internet)
    r = route(o, "Bob@Fabrikam.TEST")
    assert r.queue == QueueKey(DNS_DELIVERY, "fabrikam.test", "s1")
    assert r.recipient.address == "Bob@Fabrikam.TEST"
    assert route(o, "ann@tailspin.test").queue == QueueKey(DNS_DELIVERY, "tailspin.test", "s1")
    # Local and foreign recipients are not affected; internal-relay domains go out.
    assert route(o, "alice@contoso.test").queue.delivery_type == MAILBOX_DELIVERY
    assert route(o, "IMCEAFAX-+2B1@contoso.test").queue.delivery_type == FOREIGN_DELIVERY
    assert route(o, "x@relay.test").queue == QueueKey(DNS_DELIVERY, "relay.test", "s1")
    assert fail(o, "nobody@contoso.test").status.enhanced == "5.1.1"


def test_send_connector_with_smart_hosts_has_one_queue() -> None:
    relay = SendConnector("s2", "Relay", (AddressSpace.parse("*.fabrikam.test"),),
                          smart_hosts=("relay.example.net", "[10.0.0.1]:2525"),
                          dns_routing_enabled=False)
    o = send_org(relay)
    expected = QueueKey(SMART_HOST_DELIVERY, "relay.example.net,[10.0.0.1]:2525", "s2")
    assert route(o, "bob@fabrikam.test").queue == expected
    assert route(o, "bob@sales.fabrikam.test").queue == expected
    assert route(o, "bob@tailspin.test").queue == UNREACHABLE


def test_send_foreign_and_agent_connectors_compete_by_specificity_cost_and_name() -> None:
    """Same rules for every connector kind (core/routing.select_connector)."""
    internet = SendConnector("s1", "Internet", (AddressSpace.parse("*;1"),))
    partner = SendConnector("s2", "Partner", (AddressSpace.parse("fabrikam.test;10"),),
                            smart_hosts=("relay.fabrikam.test",), dns_routing_enabled=False)
    cheap = SendConnector("s3", "Cheap", (AddressSpace.parse("fabrikam.test;2"),))
    fax = ForeignConnector("c2", "FaxDomain", (AddressSpace.parse("fax.fabrikam.test;1"),))
    o = send_org(internet, partner, foreign=[fax])
    assert route(o, "bob@fabrikam.test").queue.next_hop_connector == "s2"   # most specific
    assert route(o, "bob@fax.fabrikam.test").queue.delivery_type == FOREIGN_DELIVERY
    assert route(o, "bob@tailspin.test").queue.next_hop_connector == "s1"
    o = send_org(internet, partner, cheap)
    assert route(o, "bob@fabrikam.test").queue == QueueKey(DNS_DELIVERY, "fabrikam.test",
                                                           "s3")            # lower cost
    disabled = SendConnector("s4", "Off", (AddressSpace.parse("fabrikam.test"),),
                             enabled=False)
    elsewhere = SendConnector("s5", "Other", (AddressSpace.parse("fabrikam.test"),),
                              source_transport_servers=("n2",))
    small = SendConnector("s6", "Small", (AddressSpace.parse("fabrikam.test"),),
                          max_message_size=10)
    o = send_org(internet, disabled, elsewhere, small)
    assert route(o, "bob@fabrikam.test", size=100).queue.next_hop_connector == "s1"
    assert fail(send_org(small), "bob@fabrikam.test", size=100).status.enhanced == "5.3.4"


# -- the answer given at RCPT, reused at submission ----------------------------------------

def _inbound(recipient: InboundRecipient, size: int) -> Inbound:
    return Inbound(sender="bob@fabrikam.test", recipients=[recipient],
                   content=lambda: iter([b"Subject: x\r\n\r\nx\r\n"]), size=size,
                   header=b"Subject: x\r\n", source="SMTP")


def _queue_of(o: Organization, recipient: InboundRecipient, size: int) -> QueueKey | None:
    message = Submitter("n1", "mail.contoso.test").prepare(o, _inbound(recipient, size), 0.0)
    return message.deliveries[0].queue if message.deliveries else None


def test_the_rcpt_answer_is_reused_while_the_organization_and_size_allow() -> None:
    """A recipient carries the categorizer's answer from RCPT (size unknown then). It is
    used as is when the organization is the same version and no connector's size limit is
    below the message; otherwise the recipient is categorized again."""
    sized = org(connectors=[ForeignConnector("c1", "Fax", (AddressSpace.parse("FAX:*;1"),),
                                             max_message_size=1000)])
    marked = Routed(QueueKey(FOREIGN_DELIVERY, "MARKED", "c9"),
                    route(sized, "FAX:+15551234", 0).recipient)
    rcpt = InboundRecipient("FAX:+15551234", route=marked, route_version=sized.version)
    assert _queue_of(sized, rcpt, 500) == marked.queue               # reused
    fresh = QueueKey(FOREIGN_DELIVERY, "FAX", "c1")
    stale = InboundRecipient("FAX:+15551234", route=marked, route_version=sized.version - 1)
    assert _queue_of(sized, stale, 500) == fresh                     # another version
    assert _queue_of(sized, rcpt, 5000) is None                      # too large: NDR path
    assert size_limited(sized, 5000) and not size_limited(sized, 1000)
