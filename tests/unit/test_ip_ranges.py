"""Receive connector bindings, remote IP ranges and the choice of the connector for a
client (Exchange: the most specific RemoteIPRanges entry on the binding wins)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.core.ip_ranges import (
    IPRangeError,
    ambiguous,
    best_connector,
    bindings_overlap,
    parse_binding,
    parse_ip,
    parse_range,
    same_coverage,
)
from mailgate.smtp_connectors import ReceiveConnector


def rc(name: str, bindings: tuple[str, ...] = ("0.0.0.0:25",),
       ranges: tuple[str, ...] = ("0.0.0.0/0", "::/0"), enabled: bool = True,
       servers: tuple[str, ...] = ()) -> ReceiveConnector:
    return ReceiveConnector(f"guid-{name}", name, bindings=bindings, remote_ip_ranges=ranges,
                            enabled=enabled, source_transport_servers=servers)


def best(connectors: list[ReceiveConnector], local: str, port: int, remote: str,
         node: str | None = None) -> str | None:
    c = best_connector(connectors, local, port, remote, node=node)
    return None if c is None else c.name


# -- ranges -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, normal, size", [
    ("192.168.1.10", "192.168.1.10", 1),
    (" 10.0.0.0/8 ", "10.0.0.0/8", 2**24),
    ("10.1.2.3/8", "10.0.0.0/8", 2**24),              # host bits dropped
    ("10.0.0.0/255.0.0.0", "10.0.0.0/8", 2**24),      # Exchange's mask form
    ("10.0.0.1-10.0.0.9", "10.0.0.1-10.0.0.9", 9),
    ("10.0.0.5 - 10.0.0.5", "10.0.0.5", 1),
    ("0.0.0.0/0", "0.0.0.0/0", 2**32),
    ("2001:DB8::1", "2001:db8::1", 1),
    ("2001:db8::/32", "2001:db8::/32", 2**96),
    ("2001:db8::1-2001:db8::ff", "2001:db8::1-2001:db8::ff", 255),
    ("::/0", "::/0", 2**128),
])
def test_range_forms_are_parsed_and_normalised(text: str, normal: str, size: int) -> None:
    r = parse_range(text)
    assert str(r) == normal
    assert r.specificity == size
    assert str(parse_range(str(r))) == normal   # what is stored reads back the same


@pytest.mark.parametrize("text", [
    "", " ", "10.0.0", "10.0.0.256", "10.0.0.0/33", "10.0.0.9-10.0.0.1", "10.0.0.1-::1",
    "10.0.0.1-", "-10.0.0.1", "host.example", "10.0.0.0/8/8", "2001:db8::/129",
    "fe80::1%eth0", "10.0.0.1\n10.0.0.2", "10.0.0.0/-1", "10.0.0.1\t-10.0.0.2", "１０.0.0.1",
])
def test_bad_ranges_are_refused_with_one_line(text: str) -> None:
    with pytest.raises(IPRangeError) as err:
        parse_range(text)
    assert "\n" not in str(err.value)


def test_range_contains_both_ends_and_nothing_outside() -> None:
    r = parse_range("10.0.0.5-10.0.0.9")
    assert [r.contains(f"10.0.0.{i}") for i in (4, 5, 9, 10)] == [False, True, True, False]
    assert not r.contains("2001:db8::5")
    assert not r.contains("not an address")


def test_ipv4_mapped_addresses_match_ipv4_ranges() -> None:
    assert parse_range("127.0.0.0/8").contains("::ffff:127.0.0.1")
    assert parse_range("127.0.0.1").contains(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert not parse_range("10.0.0.0/8").contains("::ffff:127.0.0.1")
    # and an IPv4 client matches a range written in the mapped form
    assert parse_range("::ffff:0:0/96").contains("192.0.2.1")
    assert parse_ip("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert parse_ip("[2001:db8::1]") == ipaddress.ip_address("2001:db8::1")


@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_cidr_contains_exactly_its_network(ip: ipaddress.IPv4Address, prefix: int) -> None:
    r = parse_range(f"{ip}/{prefix}")
    net = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    assert r.contains(ip)
    assert r.specificity == net.num_addresses
    assert r.contains(net.network_address) and r.contains(net.broadcast_address)
    if int(net.broadcast_address) < 2**32 - 1:
        assert not r.contains(ipaddress.IPv4Address(int(net.broadcast_address) + 1))


def test_same_coverage_compares_addresses_not_text() -> None:
    assert same_coverage(["10.0.0.0/31"], ["10.0.0.0-10.0.0.1"])
    assert same_coverage(["10.0.0.0", "10.0.0.1"], ["10.0.0.0/31"])
    assert same_coverage(["0.0.0.0/0"], ["0.0.0.0-255.255.255.255"])
    assert not same_coverage(["10.0.0.0/8"], ["10.0.0.0/9"])
    assert not same_coverage(["0.0.0.0/0"], ["0.0.0.0/0", "::/0"])


# -- bindings -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, normal", [
    ("0.0.0.0:25", "0.0.0.0:25"), ("192.168.1.5:587", "192.168.1.5:587"),
    ("[::]:25", "[::]:25"), ("[2001:DB8::5]:2525", "[2001:db8::5]:2525"),
    (" 127.0.0.1:65535 ", "127.0.0.1:65535"), ("10.0.0.1:1", "10.0.0.1:1"),
])
def test_binding_forms(text: str, normal: str) -> None:
    assert str(parse_binding(text)) == normal


@pytest.mark.parametrize("text", [
    "0.0.0.0", "0.0.0.0:0", "0.0.0.0:65536", "0.0.0.0:-1", "0.0.0.0:25x", ":25", "::1:25",
    "[::1]", "[::1]25", "host.example:25", "10.0.0.300:25", "0.0.0.0:", "[::]:00000025",
    "", "0.0.0.0:２５",
])
def test_bad_bindings_are_refused(text: str) -> None:
    with pytest.raises(IPRangeError) as err:
        parse_binding(text)
    assert "\n" not in str(err.value)


def test_bindings_overlap_on_same_port_and_same_or_wildcard_address() -> None:
    assert bindings_overlap(["0.0.0.0:25"], ["10.0.0.1:25"])
    assert bindings_overlap(["10.0.0.1:25"], ["10.0.0.1:25"])
    assert bindings_overlap(["[::]:25"], ["[2001:db8::1]:25"])
    assert not bindings_overlap(["0.0.0.0:25"], ["0.0.0.0:587"])
    assert not bindings_overlap(["10.0.0.1:25"], ["10.0.0.2:25"])
    assert not bindings_overlap(["0.0.0.0:25"], ["[::]:25"])    # listeners are V6ONLY


def test_ambiguous_needs_a_shared_binding_and_the_same_clients() -> None:
    assert ambiguous(["0.0.0.0:25"], ["0.0.0.0/0"], ["10.0.0.1:25"], ["0.0.0.0/0", "::/0"])
    assert not ambiguous(["0.0.0.0:25"], ["0.0.0.0/0"], ["0.0.0.0:25"], ["10.0.0.0/8"])
    assert not ambiguous(["0.0.0.0:25"], ["0.0.0.0/0"], ["0.0.0.0:587"], ["0.0.0.0/0"])
    # Only IPv6 ranges on an IPv4 binding: no IPv4 client for either, no ambiguity.
    assert not ambiguous(["0.0.0.0:25"], ["::/0"], ["0.0.0.0:25"], ["::/0"])


# -- choosing the connector ---------------------------------------------------------------


def test_most_specific_remote_range_wins() -> None:
    conns = [rc("Default"), rc("Relay", ranges=("10.0.0.0/8",)),
             rc("Scanner", ranges=("10.0.0.5",))]
    assert best(conns, "10.0.0.1", 25, "10.0.0.5") == "Scanner"
    assert best(conns, "10.0.0.1", 25, "10.0.0.6") == "Relay"
    assert best(conns, "10.0.0.1", 25, "192.0.2.1") == "Default"


def test_a_connector_is_judged_by_its_most_specific_matching_range() -> None:
    conns = [rc("Wide", ranges=("0.0.0.0/0", "192.0.2.7")), rc("Net", ranges=("192.0.2.0/24",))]
    assert best(conns, "192.0.2.1", 25, "192.0.2.7") == "Wide"
    assert best(conns, "192.0.2.1", 25, "192.0.2.8") == "Net"


def test_binding_must_match_address_and_port() -> None:
    conns = [rc("Submission", bindings=("0.0.0.0:587",)),
             rc("Internal", bindings=("10.0.0.1:25",))]
    assert best(conns, "10.0.0.1", 587, "192.0.2.1") == "Submission"
    assert best(conns, "10.0.0.1", 25, "192.0.2.1") == "Internal"
    assert best(conns, "10.0.0.2", 25, "192.0.2.1") is None
    assert best(conns, "10.0.0.1", 26, "192.0.2.1") is None


def test_no_connector_when_no_range_contains_the_client() -> None:
    assert best([rc("Lan", ranges=("10.0.0.0/8",))], "10.0.0.1", 25, "192.0.2.1") is None
    assert best([], "10.0.0.1", 25, "10.0.0.2") is None


def test_disabled_connectors_and_other_nodes_are_ignored() -> None:
    conns = [rc("Default"), rc("Off", ranges=("10.0.0.5",), enabled=False),
             rc("Elsewhere", ranges=("10.0.0.0/24",), servers=("n2",))]
    assert best(conns, "10.0.0.1", 25, "10.0.0.5", node="n1") == "Default"
    assert best(conns, "10.0.0.1", 25, "10.0.0.5", node="N2") == "Elsewhere"
    assert best(conns, "10.0.0.1", 25, "10.0.0.5") == "Elsewhere"


def test_tie_goes_to_the_exact_binding_then_the_lowest_name() -> None:
    conns = [rc("A-wild", ranges=("10.0.0.0/8",)),
             rc("Z-exact", bindings=("10.0.0.1:25",), ranges=("10.0.0.0/8",))]
    assert best(conns, "10.0.0.1", 25, "10.0.0.9") == "Z-exact"
    assert best(conns, "10.0.0.2", 25, "10.0.0.9") == "A-wild"
    conns = [rc("beta", ranges=("10.0.0.0/8",)), rc("Alpha", ranges=("10.0.0.0-10.255.255.255",))]
    assert best(conns, "10.0.0.1", 25, "10.0.0.9") == "Alpha"
    assert best(list(reversed(conns)), "10.0.0.1", 25, "10.0.0.9") == "Alpha"


def test_ipv4_mapped_remote_and_local_addresses() -> None:
    # A dual-stack socket reports ::ffff:127.0.0.1; it must match 127.0.0.0/8.
    conns = [rc("Loopback", bindings=("127.0.0.1:2525",), ranges=("127.0.0.0/8",)),
             rc("Any", bindings=("0.0.0.0:2525",), ranges=("0.0.0.0/0",))]
    assert best(conns, "::ffff:127.0.0.1", 2525, "::ffff:127.0.0.1") == "Loopback"
    assert best(conns, "127.0.0.1", 2525, "::ffff:192.0.2.1") == "Any"


def test_ipv6_clients() -> None:
    conns = [rc("V6", bindings=("[::]:25",), ranges=("::/0",)),
             rc("Doc", bindings=("[::]:25",), ranges=("2001:db8::/32",)),
             rc("V4", bindings=("0.0.0.0:25",), ranges=("0.0.0.0/0",))]
    assert best(conns, "2001:db8::25", 25, "2001:db8::1") == "Doc"
    assert best(conns, "2001:db8::25", 25, "2001:dead::1") == "V6"
    assert best(conns, "192.0.2.25", 25, "192.0.2.1") == "V4"
    assert best(conns, "fe80::1%eth0", 25, "fe80::2%eth0") == "V6"


def test_bad_input_and_bad_stored_values_never_raise() -> None:
    broken = ReceiveConnector("g", "Broken", bindings=("nonsense", "0.0.0.0:25"),
                              remote_ip_ranges=("garbage", "10.0.0.0/8"))
    assert best([broken], "10.0.0.1", 25, "10.0.0.2") == "Broken"
    assert best([broken], "not-an-ip", 25, "10.0.0.2") is None
    assert best([broken], "10.0.0.1", 25, "") is None
