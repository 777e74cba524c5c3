"""Host names, smart hosts and DNS server addresses as an administrator writes them
(Set-SendConnector -SmartHosts, Set-TransportService -ExternalDNSServers). Pure: parsing
and canonical text only, no lookups.

Smart host (`parse_smart_host`): a host name (`relay.example.net`, stored lower-case), an
IPv4 address with or without brackets (`10.0.0.1`, `[10.0.0.1]`) or an IPv6 address in
brackets (`[2001:db8::1]`, also RFC 5321's `[IPv6:2001:db8::1]`), then optionally `:port`
(1-65535). Canonical text: `relay.example.net`, `relay.example.net:587`, `[10.0.0.1]`,
`[2001:db8::1]:2525`.

DNS server (`parse_dns_server`): an IP address, optionally with `:port` (IPv6 with a port
in brackets: `[::1]:5353`). Canonical text: `10.0.0.53`, `10.0.0.53:5353`, `::1`,
`[::1]:5353`.

Errors are `HostError` (a ValueError) with one line naming the value and the rule.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_HOST_NAME = 253


class HostError(ValueError):
    """A host, smart host or DNS server was refused; one line for the administrator."""


@dataclass(frozen=True)
class HostPort:
    """A host (name or IP address) and an optional port."""

    host: str
    port: int | None = None
    literal: bool = False      # `host` is an IP address

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.literal else self.host
        return host if self.port is None else f"{host}:{self.port}"


def is_host_name(text: str) -> bool:
    """An RFC 1035 host name of letters, digits and '-' (A-labels for IDNs), one or more
    labels, case-insensitive; a trailing dot is not part of it."""
    name = text.lower()
    return (0 < len(name) <= MAX_HOST_NAME
            and all(_LABEL.match(label) for label in name.split(".")))


def _port(text: str, value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise HostError(f"'{text}': the port must be a number from 1 to 65535")
    return int(value)


def ip_or_none(value: str) -> str | None:
    """The IP address `value` in normal form, or None when it is not one."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def literal_address(inside: str) -> str | None:
    """The IP address written inside an address literal's brackets (`192.0.2.1`,
    `IPv6:2001:db8::1`, RFC 5321 4.1.3), or None when it is not one."""
    return ip_or_none(inside[5:] if inside[:5].lower() == "ipv6:" else inside)


def parse_smart_host(text: str) -> HostPort:
    raw = text.strip()
    if not raw or any(ord(ch) < 33 or ord(ch) == 127 for ch in raw):
        raise HostError(f"'{text}' is not a smart host: give a host name or an IP address, "
                        f"optionally with :port")
    if raw.startswith("["):
        inside, close, rest = raw[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise HostError(f"'{text}' is not a smart host: an address literal is "
                            f"[address] or [address]:port")
        ip = literal_address(inside)
        if ip is None:
            raise HostError(f"'{text}' is not a smart host: '{inside}' is not an IP address")
        return HostPort(ip, _port(text, rest[1:]) if rest else None, True)
    if raw.count(":") > 1:
        raise HostError(f"'{text}' is not a smart host: write an IPv6 address in brackets, "
                        f"e.g. [2001:db8::1]:25")
    host, colon, port = raw.partition(":")
    ip = ip_or_none(host)
    if ip is not None:
        return HostPort(ip, _port(text, port) if colon else None, True)
    name = host.rstrip(".").lower()
    if not is_host_name(name):
        raise HostError(f"'{text}' is not a smart host: '{host}' is neither a host name nor "
                        f"an IP address")
    return HostPort(name, _port(text, port) if colon else None)


def parse_dns_server(text: str) -> HostPort:
    raw = text.strip()
    if raw.startswith("["):
        inside, close, rest = raw[1:].partition("]")
        ip = ip_or_none(inside) if close else None
        if ip is None or (rest and not rest.startswith(":")):
            raise HostError(f"'{text}' is not a DNS server: give an IP address, optionally "
                            f"with :port ([IPv6]:port)")
        return HostPort(ip, _port(text, rest[1:]) if rest else None, True)
    ip = ip_or_none(raw)
    if ip is not None:
        return HostPort(ip, None, True)
    host, colon, port = raw.rpartition(":")
    ip = ip_or_none(host) if colon else None
    if ip is None or ":" in host:
        raise HostError(f"'{text}' is not a DNS server: give an IP address, optionally with "
                        f":port ([IPv6]:port)")
    return HostPort(ip, _port(text, port), True)


def show_dns_server(server: HostPort) -> str:
    """The canonical text of a DNS server: bare IPv6 only without a port."""
    if server.port is None:
        return server.host
    return f"[{server.host}]:{server.port}" if ":" in server.host else \
        f"{server.host}:{server.port}"
