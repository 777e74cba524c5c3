"""Connector selection (reference §1.6, §8.4 "Connector selection ties")."""

from __future__ import annotations

from mailgate.core.address import parse_recipient_address
from mailgate.core.address_space import AddressSpace
from mailgate.core.routing import ConnectorChoice, NoConnector, TooLarge, select_connector
from mailgate.organization import ForeignConnector


def fc(name: str, *spaces: str, enabled: bool = True, max_size: int | None = None,
       servers: tuple[str, ...] = ()) -> ForeignConnector:
    return ForeignConnector(f"guid-{name}", name, tuple(AddressSpace.parse(s) for s in spaces),
                            servers, enabled=enabled, max_message_size=max_size)


def choose(connectors: list[ForeignConnector], address: str, size: int = 100,
           node: str = "n1") -> object:
    return select_connector(connectors, parse_recipient_address(address), size, node)


def name_of(choice: object) -> str:
    assert isinstance(choice, ConnectorChoice), choice
    return choice.connector.name


def test_most_specific_space_wins_over_cost() -> None:
    # Specificity is decided before cost: FAX:+44* (cost 50) beats FAX:* (cost 1).
    conns = [fc("All", "FAX:*;1"), fc("UK", "FAX:+44*;50")]
    assert name_of(choose(conns, "FAX:+441234")) == "UK"
    assert name_of(choose(conns, "FAX:+15551234")) == "All"


def test_literal_beats_prefix_pattern() -> None:
    conns = [fc("Prefix", "FAX:+4412*;1"), fc("Exact", "FAX:+441234;9")]
    assert name_of(choose(conns, "FAX:+441234")) == "Exact"


def test_lower_cost_breaks_a_specificity_tie() -> None:
    conns = [fc("Dear", "FAX:*;5"), fc("Cheap", "FAX:*;2")]
    assert name_of(choose(conns, "FAX:+1")) == "Cheap"


def test_name_breaks_a_cost_tie() -> None:
    conns = [fc("beta", "FAX:*;3"), fc("Alpha", "FAX:*;3")]
    assert name_of(choose(conns, "FAX:+1")) == "Alpha"


def test_smtp_domain_specificity_order() -> None:
    # julia@marketing.contoso.com: marketing.contoso.com > *.contoso.com > *.
    conns = [fc("Any", "*;1"), fc("Sub", "*.contoso.com;1"),
             fc("Exact", "marketing.contoso.com;1")]
    assert name_of(choose(conns, "julia@marketing.contoso.com")) == "Exact"
    assert name_of(choose(conns[:2], "julia@marketing.contoso.com")) == "Sub"
    assert name_of(choose(conns[:1], "julia@marketing.contoso.com")) == "Any"


def test_plain_domain_space_does_not_cover_subdomains() -> None:
    conns = [fc("Exact", "contoso.com")]
    assert isinstance(choose(conns, "a@sub.contoso.com"), NoConnector)
    assert name_of(choose(conns, "a@contoso.com")) == "Exact"


def test_disabled_connector_is_ignored() -> None:
    conns = [fc("Off", "FAX:+1*;1", enabled=False), fc("On", "FAX:*;1")]
    assert name_of(choose(conns, "FAX:+155")) == "On"


def test_connector_hosted_on_another_node_is_ignored() -> None:
    conns = [fc("Remote", "FAX:+1*;1", servers=("n2",)), fc("Local", "FAX:*;1", servers=("N1",))]
    assert name_of(choose(conns, "FAX:+155")) == "Local"


def test_too_small_connector_is_dropped_before_specificity() -> None:
    conns = [fc("Small", "FAX:+1*;1", max_size=1000), fc("Big", "FAX:*;1")]
    assert name_of(choose(conns, "FAX:+155", size=5000)) == "Big"


def test_too_large_for_every_matching_connector() -> None:
    conns = [fc("Small", "FAX:*;1", max_size=1000), fc("Zero", "FAX:+1*", max_size=0)]
    assert isinstance(choose(conns, "FAX:+155", size=5000), TooLarge)


def test_no_match_at_all() -> None:
    conns = [fc("Fax", "FAX:*;1")]
    assert isinstance(choose(conns, "SMS:+155"), NoConnector)
    assert isinstance(choose(conns, "bob@fabrikam.test"), NoConnector)


def test_address_space_type_is_case_insensitive() -> None:
    conns = [fc("Fax", "fax:*;1")]
    assert name_of(choose(conns, "FAX:+1")) == "Fax"
