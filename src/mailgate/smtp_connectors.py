"""Receive connectors and Send connectors: the SMTP configuration objects (Exchange's
New-ReceiveConnector / New-SendConnector), with Exchange's parameter names and defaults.

Plain value objects like those of `organization`: persisted as directory objects, validated
and changed by `admin`, read by the node from its `Organization` snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from mailgate.core.address_space import AddressSpace

PERMISSION_GROUPS = ("AnonymousUsers", "ExchangeUsers", "ExchangeServers", "Partners")
AUTH_MECHANISMS = ("None", "Tls", "BasicAuth", "BasicAuthRequireTLS")
TLS_MODES = ("none", "opportunistic", "required")
ENCRYPTION_ONLY, CERTIFICATE_VALIDATION, DOMAIN_VALIDATION = (
    "EncryptionOnly", "CertificateValidation", "DomainValidation")
TLS_AUTH_LEVELS = (ENCRYPTION_ONLY, CERTIFICATE_VALIDATION, DOMAIN_VALIDATION)
SMART_HOST_AUTH = ("None", "BasicAuth", "BasicAuthRequireTLS")
MB = 1024 * 1024


def hosted(servers: tuple[str, ...], node: str) -> bool:
    """Whether a connector with these SourceTransportServers runs on `node` (all do when
    the list is empty)."""
    return not servers or any(s.casefold() == node.casefold() for s in servers)


def split_binding(binding: str) -> tuple[str, int]:
    """`192.0.2.5:25` or `[2001:db8::5]:25` as (address, port)."""
    host, _, port = binding.rpartition(":")
    return host.strip("[]"), int(port)


def _data(obj: Any, names: dict[str, str]) -> dict[str, Any]:
    out = {}
    for f in fields(obj):
        if f.name in ("guid", "name"):
            continue
        value = getattr(obj, f.name)
        out[names[f.name]] = list(value) if isinstance(value, tuple) else value
    return out


def _from(cls: Any, guid: str, name: str, data: dict[str, Any], names: dict[str, str]) -> Any:
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        key = names.get(f.name)
        if key is None or key not in data:
            continue
        value = data[key]
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(guid=guid, name=name, **kwargs)


def _exchange_name(field_name: str) -> str:
    special = {"fqdn": "Fqdn", "max_inbound_connection_per_source":
               "MaxInboundConnectionPerSource", "remote_ip_ranges": "RemoteIPRanges",
               "require_tls": "RequireTLS", "dns_routing_enabled": "DNSRoutingEnabled",
               "tls_certificate": "TlsCertificate", "tls_key": "TlsKey",
               "tls": "Tls", "smtp_utf8_enabled": "SmtpUtf8Enabled"}
    return special.get(field_name) or "".join(p.capitalize() for p in field_name.split("_"))


@dataclass(frozen=True)
class ReceiveConnector:
    """An SMTP listener policy: which clients (RemoteIPRanges) on which local addresses
    (Bindings) get which rights (PermissionGroups) and limits. For a client, the connector
    with the most specific matching remote range on the binding it connected to applies."""

    guid: str
    name: str
    bindings: tuple[str, ...] = ("0.0.0.0:25",)
    remote_ip_ranges: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    permission_groups: tuple[str, ...] = ("AnonymousUsers",)
    auth_mechanism: tuple[str, ...] = ("Tls",)
    banner: str | None = None
    fqdn: str | None = None
    max_message_size: int = 36 * MB
    max_recipients_per_message: int = 200
    max_inbound_connection: int = 5000
    max_inbound_connection_per_source: int = 20
    connection_timeout: float = 600.0
    connection_inactivity_timeout: float = 300.0
    max_hop_count: int = 60
    max_header_size: int = 256 * 1024
    max_logon_failures: int = 3
    tarpit_interval: float = 5.0
    max_protocol_errors: int = 5
    require_tls: bool = False
    tls_certificate: str | None = None   # PEM file; None: a generated self-signed one
    tls_key: str | None = None
    smtp_utf8_enabled: bool = True
    source_transport_servers: tuple[str, ...] = ()
    enabled: bool = True
    comment: str | None = None

    KIND = "receive-connector"

    def to_data(self) -> dict[str, Any]:
        return _data(self, {f.name: _exchange_name(f.name) for f in fields(self)})

    @classmethod
    def from_data(cls, guid: str, name: str, data: dict[str, Any]) -> ReceiveConnector:
        return _from(cls, guid, name, data,  # type: ignore[no-any-return]
                     {f.name: _exchange_name(f.name) for f in fields(cls)})

    def keys(self) -> list[str]:
        return [f"{self.KIND}:name:{self.name.casefold()}"]

    def hosted_on(self, node: str) -> bool:
        return hosted(self.source_transport_servers, node)

    def endpoints(self) -> list[tuple[str, int]]:
        """(address, port) of each binding; the address is "0.0.0.0" or "::" for all."""
        return [split_binding(b) for b in self.bindings]


@dataclass(frozen=True)
class SendConnector:
    """Outbound SMTP for the address spaces it serves: through DNS MX records (then A/AAAA)
    of each recipient domain, or through its smart hosts."""

    guid: str
    name: str
    address_spaces: tuple[AddressSpace, ...] = ()
    smart_hosts: tuple[str, ...] = ()           # host or [literal], optional :port each
    port: int = 25
    dns_routing_enabled: bool = True            # False when smart hosts are given
    tls: str = "opportunistic"                  # one of TLS_MODES
    tls_auth_level: str = ENCRYPTION_ONLY       # one of TLS_AUTH_LEVELS (with tls required)
    tls_domain: str | None = None               # DomainValidation: the name to match
    tls_ca_file: str | None = None              # PEM trust anchors; None: the system's
    smart_host_auth_mechanism: str = "None"     # one of SMART_HOST_AUTH
    auth_user: str | None = None
    auth_password_env: str | None = None        # the password is read from this variable
    fqdn: str | None = None                     # EHLO name (default: the node's host name)
    max_message_size: int | None = 35 * MB
    smtp_max_messages_per_connection: int = 20
    connection_inactivity_timeout: float = 600.0
    source_transport_servers: tuple[str, ...] = ()
    enabled: bool = True
    comment: str | None = None

    KIND = "send-connector"

    def to_data(self) -> dict[str, Any]:
        data = _data(self, {f.name: _exchange_name(f.name) for f in fields(self)})
        data["AddressSpaces"] = [str(a) for a in self.address_spaces]
        return data

    @classmethod
    def from_data(cls, guid: str, name: str, data: dict[str, Any]) -> SendConnector:
        c: SendConnector = _from(cls, guid, name, {k: v for k, v in data.items()
                                                   if k != "AddressSpaces"},
                                 {f.name: _exchange_name(f.name) for f in fields(cls)})
        return replace(c, address_spaces=tuple(AddressSpace.parse(a)
                                               for a in data.get("AddressSpaces", ())))

    def keys(self) -> list[str]:
        return [f"{self.KIND}:name:{self.name.casefold()}"]

    def hosted_on(self, node: str) -> bool:
        return hosted(self.source_transport_servers, node)

    @property
    def smart_host_list(self) -> str:
        """The NextHopDomain of its SmartHostConnectorDelivery queue: the smart hosts as
        shown (`relay1.example.net,[10.0.0.1]:2525`)."""
        return ",".join(self.smart_hosts)
