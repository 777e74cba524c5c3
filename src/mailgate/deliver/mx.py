"""Where SMTP mail for a domain or a smart host goes: MX records (RFC 5321 §5.1, RFC 7505
null MX) and host addresses, through an injectable resolver.

Contract:

- `Resolver` is what delivery needs from DNS: `mx(domain)` gives the MX records as
  (preference, host) pairs, or None when the domain has no MX records (then the domain
  itself is the one host, RFC 5321's implicit MX); it raises `NoSuchDomain` for NXDOMAIN
  and `DnsTemporary` when DNS did not answer (timeout, SERVFAIL, no servers).
  `addresses(host)` gives the host's IPv4 then IPv6 addresses ([] when the host does not
  exist or has none); it raises `DnsTemporary` when DNS did not answer.
- `DnsResolver(servers)` is the real one (dnspython's asyncio resolver): with servers (the
  transport setting ExternalDnsServers, `ip[:port]`) every query goes to them; without,
  MX queries use the system's DNS configuration (/etc/resolv.conf) and addresses the
  system's resolver (getaddrinfo, so /etc/hosts counts), as any local program would.
- `mx_targets(resolver, domain, port)` orders the targets for a recipient domain: MX hosts
  by preference (equal preferences in random order, RFC 5321 §5.1), each host's addresses
  in order, at most `MAX_TARGETS`; an address literal domain (`[192.0.2.1]`) is its own
  target. Null MX (a single MX record `0 .`) → `Unroutable` 556 5.1.10; NXDOMAIN →
  `Unroutable` 550 5.4.4; no usable address for any MX host, or no answer → `DnsTemporary`
  (the queue is retried).
- `host_targets(resolver, hosts, port)` does the same for smart hosts: each in the order
  given, a name by its addresses (no MX lookup, as Exchange), an IP address as is; a smart
  host's own port wins over the connector's.
"""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass
from typing import Protocol, Sequence

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from mailgate.core.hosts import (
    HostError,
    HostPort,
    ip_or_none,
    literal_address,
    parse_dns_server,
    parse_smart_host,
)
from mailgate.core.status import Status

MAX_TARGETS = 10
QUERY_TIMEOUT = 5.0        # one DNS server's answer
QUERY_LIFETIME = 15.0      # one query, over every server and retry
DNS_CACHE_SIZE = 10000     # answers (and NXDOMAIN / no-record answers) kept for their TTL

S556_NULL_MX = Status(556, "5.1.10", "the recipient's domain does not accept mail (null MX)")
S550_NO_DOMAIN = Status(550, "5.4.4", "SMTPSEND.DNS.NonExistentDomain; nonexistent domain")


class NoSuchDomain(Exception):
    """The domain does not exist (NXDOMAIN)."""


class DnsTemporary(Exception):
    """DNS did not give an answer now; the text says which query and why."""


class Unroutable(Exception):
    """Mail for the domain cannot be delivered at all (every recipient fails)."""

    def __init__(self, status: Status) -> None:
        super().__init__(str(status))
        self.status = status


class Resolver(Protocol):
    async def mx(self, domain: str) -> list[tuple[int, str]] | None: ...
    async def addresses(self, host: str) -> list[str]: ...


@dataclass(frozen=True)
class Target:
    """One address to connect to, with the host name it was found under."""

    host: str          # MX host, smart host name, or the IP address itself
    address: str
    port: int

    def __str__(self) -> str:
        addr = f"[{self.address}]"
        return f"{addr}:{self.port}" if self.host == self.address \
            else f"{self.host}{addr}:{self.port}"


class DnsResolver:
    """dnspython's asyncio resolver, on the given servers or the system's configuration."""

    def __init__(self, servers: Sequence[HostPort] = ()) -> None:
        self.servers = tuple(servers)
        self._resolver: dns.asyncresolver.Resolver | None = None

    @classmethod
    def from_setting(cls, servers: Sequence[str]) -> DnsResolver:
        """From ExternalDnsServers (`ip[:port]` each, as checked by the admin layer)."""
        parsed = []
        for text in servers:
            try:
                parsed.append(parse_dns_server(text))
            except HostError:
                continue
        return cls(parsed)

    def _dns(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            try:
                r = dns.asyncresolver.Resolver(configure=not self.servers)
            except dns.resolver.NoResolverConfiguration as exc:
                raise DnsTemporary(f"no DNS servers are configured: {exc}") from None
            if self.servers:
                r.nameservers = [dns.nameserver.Do53Nameserver(s.host, s.port or 53)
                                 for s in self.servers]
            r.timeout = QUERY_TIMEOUT
            r.lifetime = QUERY_LIFETIME
            # A queue per recipient domain asks for the same MX and addresses at every
            # attempt and for every batch: answers are kept for their TTL, as a caching
            # resolver would (SERVFAIL and timeouts are not kept).
            r.cache = dns.resolver.LRUCache(DNS_CACHE_SIZE)
            self._resolver = r
        return self._resolver

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, None when the name has no records of the type; NoSuchDomain."""
        try:
            return await self._dns().resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise NoSuchDomain(name) from None
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NoNameservers:
            raise DnsTemporary(f"no DNS server answered the {rdtype} query for {name} "
                               f"(SERVFAIL or refused)") from None
        except dns.exception.Timeout:
            raise DnsTemporary(f"the {rdtype} query for {name} timed out") from None
        except dns.exception.DNSException as exc:
            raise DnsTemporary(f"the {rdtype} query for {name} failed: "
                               f"{type(exc).__name__}") from None

    async def mx(self, domain: str) -> list[tuple[int, str]] | None:
        answer = await self._query(domain, "MX")
        if answer is None or answer.rrset is None:
            return None
        return [(int(r.preference), r.exchange.to_text(omit_final_dot=True) or ".")
                for r in answer.rrset]

    async def addresses(self, host: str) -> list[str]:
        if not self.servers:
            return await self._system_addresses(host)
        out: list[str] = []
        problems: list[DnsTemporary] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._query(host, rdtype)
            except NoSuchDomain:
                return []
            except DnsTemporary as exc:
                problems.append(exc)
                continue
            if answer is not None and answer.rrset is not None:
                out.extend(r.address for r in answer.rrset)
        if not out and problems:
            raise problems[0]
        return out

    async def _system_addresses(self, host: str) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                return []
            raise DnsTemporary(f"looking up {host} failed: {exc.strerror or exc}") from None
        v4 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET]
        v6 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET6]
        return list(dict.fromkeys(v4 + v6))


async def _host_targets(resolver: Resolver, host: str, port: int,
                        problems: list[str]) -> list[Target]:
    ip = ip_or_none(host)
    if ip is not None:
        return [Target(ip, ip, port)]
    try:
        found = await resolver.addresses(host)
    except DnsTemporary as exc:
        problems.append(str(exc))
        return []
    if not found:
        problems.append(f"{host} has no address (A/AAAA)")
    return [Target(host, a, port) for a in found]


async def mx_targets(resolver: Resolver, domain: str, port: int) -> list[Target]:
    if domain.startswith("[") and domain.endswith("]"):
        ip = literal_address(domain[1:-1])
        if ip is None:
            raise Unroutable(S550_NO_DOMAIN.with_text(
                f"the address literal {domain} is not an IP address"))
        return [Target(ip, ip, port)]
    try:
        records = await resolver.mx(domain)
    except NoSuchDomain:
        raise Unroutable(S550_NO_DOMAIN.with_text(
            f"SMTPSEND.DNS.NonExistentDomain; the domain {domain} does not exist")) from None
    if not records:
        hosts = [domain]
    else:
        real = [(pref, host) for pref, host in records if host not in (".", "")]
        if not real:
            raise Unroutable(S556_NULL_MX.with_text(
                f"the domain {domain} does not accept mail (null MX, RFC 7505)"))
        by_pref: dict[int, list[str]] = {}
        for pref, host in real:
            by_pref.setdefault(pref, []).append(host)
        hosts = []
        for pref in sorted(by_pref):
            group = list(dict.fromkeys(by_pref[pref]))
            random.shuffle(group)
            hosts.extend(group)
    targets: list[Target] = []
    problems: list[str] = []
    for host in hosts:
        targets.extend(await _host_targets(resolver, host, port, problems))
        if len(targets) >= MAX_TARGETS:
            break
    if not targets:
        what = "MX hosts" if records else "address records"
        raise DnsTemporary(f"no usable {what} for {domain}: " + "; ".join(problems[:5]))
    return targets[:MAX_TARGETS]


async def host_targets(resolver: Resolver, smart_hosts: Sequence[str],
                       port: int) -> list[Target]:
    targets: list[Target] = []
    problems: list[str] = []
    for text in smart_hosts:
        try:
            hp = parse_smart_host(text)
        except HostError as exc:
            problems.append(str(exc))
            continue
        targets.extend(await _host_targets(resolver, hp.host, hp.port or port, problems))
    if not targets:
        raise DnsTemporary("no smart host could be resolved: " + "; ".join(problems[:5]))
    return targets[:MAX_TARGETS]
