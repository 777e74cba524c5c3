"""Receive connector addresses: local bindings (`IP:PORT`), remote IP ranges, and the choice
of the connector that applies to an SMTP client.

Exchange's rules (Set-ReceiveConnector -Bindings / -RemoteIPRanges):

- A binding is `IPv4:PORT` or `[IPv6]:PORT`; `0.0.0.0` and `[::]` are every local address
  of that family.
- A remote IP range is a single address (`192.168.1.10`), a CIDR network (`10.0.0.0/8`,
  also `10.0.0.0/255.0.0.0`), or a range of addresses (`10.0.0.1-10.0.0.9`), IPv4 or IPv6.
- For a client, among the enabled connectors whose binding took the connection, the one
  whose remote range contains the client's address *most specifically* (the smallest range)
  applies. Connectors that share a binding must therefore differ in their remote ranges.

Pure functions only: no I/O. The SMTP server calls `best_connector` for each connection.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence, Union

if TYPE_CHECKING:
    from mailgate.smtp_connectors import ReceiveConnector

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

__all__ = ["Binding", "IPRange", "IPRangeError", "ambiguous", "best_connector",
           "bindings_overlap",
           "parse_binding", "parse_ip", "parse_range", "same_coverage"]


class IPRangeError(ValueError):
    """A binding, address or range was refused; the message is one line."""


def _show(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:60] + "...")


def parse_ip(value: str | IPAddress) -> IPAddress:
    """An address as given by a socket or an administrator; an IPv4-mapped IPv6 address
    (`::ffff:10.0.0.1`, what a dual-stack socket reports) is its IPv4 address. A zone id
    (`fe80::1%eth0`) is dropped."""
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        ip: IPAddress = value
    else:
        text = str(value).strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        text = text.partition("%")[0]
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise IPRangeError(f"{_show(str(value))} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# -- remote IP ranges -------------------------------------------------------------------


@dataclass(frozen=True)
class IPRange:
    """A contiguous block of addresses of one family, `first` to `last` inclusive."""

    first: IPAddress
    last: IPAddress
    text: str        # the normalised form, as stored and shown

    def __str__(self) -> str:
        return self.text

    @property
    def version(self) -> int:
        return self.first.version

    @property
    def specificity(self) -> int:
        """How many addresses the range holds: the smaller, the more specific."""
        return int(self.last) - int(self.first) + 1

    def contains(self, ip: str | IPAddress) -> bool:
        """Whether `ip` is in the range. IPv4-mapped IPv6 addresses count as their IPv4
        address (and an IPv4 address as its mapped form, for a `::ffff:0:0/96` range)."""
        try:
            addr = parse_ip(ip)
        except IPRangeError:
            return False
        candidates: list[IPAddress] = [addr]
        if isinstance(addr, ipaddress.IPv4Address):
            candidates.append(ipaddress.IPv6Address(f"::ffff:{addr}"))
        return any(c.version == self.version and int(self.first) <= int(c) <= int(self.last)
                   for c in candidates)


def parse_range(text: str) -> IPRange:
    """`10.0.0.1`, `10.0.0.0/8` (host bits are dropped: `10.1.2.3/8` is `10.0.0.0/8`),
    `10.0.0.0/255.0.0.0`, `10.0.0.1-10.0.0.9`, and the same for IPv6."""
    raw = str(text)
    value = raw.strip()
    if not value or any(ord(ch) < 32 or ord(ch) > 126 or ch == "%" for ch in value):
        raise IPRangeError(f"{_show(raw)} is not an IP address, CIDR network or range "
                           f"(e.g. 192.168.1.10, 10.0.0.0/8, 10.0.0.1-10.0.0.9)")
    if "-" in value:
        start_text, _, end_text = value.partition("-")
        try:
            start = ipaddress.ip_address(start_text.strip())
            end = ipaddress.ip_address(end_text.strip())
        except ValueError:
            raise IPRangeError(f"{_show(raw)} is not a range of IP addresses "
                               f"(e.g. 10.0.0.1-10.0.0.9)") from None
        if start.version != end.version:
            raise IPRangeError(f"{_show(raw)} mixes IPv4 and IPv6 addresses")
        if int(start) > int(end):
            raise IPRangeError(f"{_show(raw)} is not a range: {start} comes after {end}")
        if start == end:
            return IPRange(start, end, str(start))
        return IPRange(start, end, f"{start}-{end}")
    if "/" in value:
        try:
            net = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise IPRangeError(f"{_show(raw)} is not a CIDR network "
                               f"(e.g. 10.0.0.0/8 or 2001:db8::/32)") from None
        return IPRange(net.network_address, net.broadcast_address, str(net))
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise IPRangeError(f"{_show(raw)} is not an IP address, CIDR network or range "
                           f"(e.g. 192.168.1.10, 10.0.0.0/8, 10.0.0.1-10.0.0.9)") from None
    return IPRange(ip, ip, str(ip))


def same_coverage(a: Iterable[IPRange | str], b: Iterable[IPRange | str]) -> bool:
    """Whether two lists of ranges hold exactly the same addresses (`10.0.0.0/31` is the
    same as `10.0.0.0-10.0.0.1`, and as `10.0.0.0` plus `10.0.0.1`)."""
    return _coverage(a) == _coverage(b)


def _coverage(ranges: Iterable[IPRange | str]) -> tuple[tuple[int, int, int], ...]:
    spans = sorted((r.version, int(r.first), int(r.last)) for r in
                   (x if isinstance(x, IPRange) else parse_range(x) for x in ranges))
    merged: list[tuple[int, int, int]] = []
    for version, first, last in spans:
        if merged and merged[-1][0] == version and first <= merged[-1][2] + 1:
            v, f, end = merged[-1]
            merged[-1] = (v, f, max(end, last))
        else:
            merged.append((version, first, last))
    return tuple(merged)


# -- bindings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """A local address and port a connector listens on; the unspecified address (0.0.0.0
    or ::) is every local address of its family."""

    ip: IPAddress
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"

    @property
    def wildcard(self) -> bool:
        return self.ip.is_unspecified

    def matches(self, local_ip: IPAddress, local_port: int) -> bool:
        """Whether a connection to `local_ip:local_port` arrived on this binding."""
        if local_port != self.port or local_ip.version != self.ip.version:
            return False
        return self.wildcard or local_ip == self.ip

    def overlaps(self, other: Binding) -> bool:
        """Same port and the same address, or a wildcard of the same family."""
        return (self.port == other.port and self.ip.version == other.ip.version
                and (self.ip == other.ip or self.wildcard or other.wildcard))


def parse_binding(text: str) -> Binding:
    """`192.168.1.5:25`, `0.0.0.0:25`, `[2001:db8::5]:587`, `[::]:25`."""
    raw = str(text)
    value = raw.strip()
    forms = "use IP:PORT, e.g. 0.0.0.0:25, 192.168.1.5:587 or [::]:25"
    if not value or any(ord(ch) < 33 or ord(ch) > 126 or ch == "%" for ch in value):
        raise IPRangeError(f"the binding {_show(raw)} is not valid: {forms}")
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise IPRangeError(f"the binding {_show(raw)} is not valid: {forms}")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise IPRangeError(f"the binding {_show(raw)} has no port: {forms}")
        if ":" in host:
            raise IPRangeError(f"the binding {_show(raw)} is not valid: write an IPv6 "
                               f"address in brackets, e.g. [::]:25")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise IPRangeError(f"the binding {_show(raw)} is not valid: {host!r} is not an IP "
                           f"address") from None
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5 \
            or not 1 <= int(port_text) <= 65535:
        raise IPRangeError(f"the binding {_show(raw)} is not valid: the port must be "
                           f"1-65535")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return Binding(ip, int(port_text))


def bindings_overlap(a: Iterable[str], b: Iterable[str]) -> bool:
    """Whether a connection could arrive on a binding of both lists."""
    return bool(_shared_families(a, b))


def _shared_families(a: Iterable[str], b: Iterable[str]) -> set[int]:
    bb = [parse_binding(x) for x in b]
    return {x.ip.version for x in (parse_binding(t) for t in a) for y in bb if x.overlaps(y)}


def ambiguous(bindings_a: Iterable[str], ranges_a: Iterable[str],
              bindings_b: Iterable[str], ranges_b: Iterable[str]) -> bool:
    """Exchange's rule for two connectors of one node: they may share a binding only if
    their remote IP ranges differ. Compared for the clients that can arrive on the shared
    binding (an IPv4 binding takes IPv4 clients), by the addresses the ranges hold."""
    a_ranges = [parse_range(t) for t in ranges_a]
    b_ranges = [parse_range(t) for t in ranges_b]
    for family in _shared_families(bindings_a, bindings_b):
        a_cov = _coverage(r for r in a_ranges if r.version == family)
        if a_cov and a_cov == _coverage(r for r in b_ranges if r.version == family):
            return True
    return False


# -- choosing the connector -------------------------------------------------------------


def best_connector(connectors: Sequence[ReceiveConnector], local_ip: str | IPAddress,
                   local_port: int, remote_ip: str | IPAddress, *,
                   node: str | None = None) -> ReceiveConnector | None:
    """The Receive connector that applies to a client at `remote_ip` that connected to
    `local_ip:local_port`, or None (the server then refuses the connection).

    Among the enabled connectors (hosted on `node`, when given) with a binding that took the
    connection (its exact address, or 0.0.0.0 / :: of the same family, with that port) and
    a remote range that contains the client: the one whose smallest matching range is the
    smallest wins; on a tie the one bound to the exact local address, then the lowest name
    (case-insensitive). IPv4-mapped IPv6 addresses (a dual-stack socket) count as IPv4.
    Malformed bindings or ranges of a stored connector are skipped, never raised.
    """
    try:
        local = parse_ip(local_ip)
        remote = parse_ip(remote_ip)
    except IPRangeError:
        return None
    best: tuple[int, int, str, str] | None = None
    chosen: ReceiveConnector | None = None
    for c in connectors:
        if not c.enabled or (node is not None and not c.hosted_on(node)):
            continue
        bound = [b for b in _bindings(c) if b.matches(local, local_port)]
        if not bound:
            continue
        sizes = [r.specificity for r in _ranges(c) if r.contains(remote)]
        if not sizes:
            continue
        exact = 0 if any(not b.wildcard for b in bound) else 1
        key = (min(sizes), exact, c.name.casefold(), c.guid)
        if best is None or key < best:
            best, chosen = key, c
    return chosen


# best_connector runs for every connection; the stored texts repeat, so parse each once.
@functools.lru_cache(maxsize=4096)
def _binding_or_none(text: str) -> Binding | None:
    try:
        return parse_binding(text)
    except IPRangeError:
        return None


@functools.lru_cache(maxsize=4096)
def _range_or_none(text: str) -> IPRange | None:
    try:
        return parse_range(text)
    except IPRangeError:
        return None


def _bindings(c: ReceiveConnector) -> list[Binding]:
    return [b for b in map(_binding_or_none, c.bindings) if b is not None]


def _ranges(c: ReceiveConnector) -> list[IPRange]:
    return [r for r in map(_range_or_none, c.remote_ip_ranges) if r is not None]
