"""The organization's configuration objects (Exchange's directory): accepted domains,
mailboxes with proxy addresses, Foreign connectors and per-node transport settings.

These are plain value objects. They are persisted as directory objects by the store
(`store.DirectoryObject`), validated and changed by `admin`, and read by the node as one
immutable `Organization` snapshot that is reloaded whenever the configuration version in
the store changes, so a running node sees CLI changes without a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mailgate.core.address import RecipientAddress, parse_recipient_address
from mailgate.core.address_space import AddressSpace
from mailgate.smtp_connectors import ReceiveConnector, SendConnector, hosted

DOMAIN_TYPES = ("Authoritative", "InternalRelay")
# What happens to a confirmed hand-off the gateway did not answer within ConfirmationTimeout:
# Fail (an NDR, 5.4.7), Delivered (assumed delivered) or Retry (taken back, dropped again).
CONFIRMATION_TIMEOUT_ACTIONS = ("Fail", "Delivered", "Retry")
ZERO_GUID = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class AcceptedDomain:
    guid: str
    name: str
    domain_name: str
    domain_type: str = "Authoritative"
    default: bool = False

    KIND = "accepted-domain"

    def to_data(self) -> dict[str, Any]:
        return {"DomainName": self.domain_name, "DomainType": self.domain_type,
                "Default": self.default}

    @classmethod
    def from_data(cls, guid: str, name: str, data: dict[str, Any]) -> AcceptedDomain:
        return cls(guid, name, data["DomainName"], data["DomainType"], bool(data["Default"]))

    def keys(self) -> list[str]:
        return [f"{self.KIND}:name:{self.name.casefold()}",
                f"{self.KIND}:domain:{self.domain_name.lower()}"]


@dataclass(frozen=True)
class Mailbox:
    """A mailbox: local delivery into Maildir. `email_addresses` holds every proxy address as
    `TYPE:value` (the primary SMTP address included, as Exchange's EmailAddresses does)."""

    guid: str
    name: str
    primary_smtp_address: str
    email_addresses: tuple[str, ...] = ()
    password_hash: str | None = None   # for SMTP AUTH (admin.passwords); None: cannot log on

    KIND = "mailbox"

    def proxy_addresses(self) -> list[RecipientAddress]:
        """Every address this mailbox answers to, primary first."""
        out = [parse_recipient_address(self.primary_smtp_address)]
        for text in self.email_addresses:
            addr = parse_recipient_address(text)
            if addr.key != out[0].key:
                out.append(addr)
        return out

    def exchange_email_addresses(self) -> list[str]:
        """EmailAddresses as Exchange shows them: `SMTP:` primary, `smtp:` secondaries."""
        shown = []
        for i, addr in enumerate(self.proxy_addresses()):
            if addr.is_smtp:
                shown.append(("SMTP:" if i == 0 else "smtp:") + addr.value)
            else:
                shown.append(f"{addr.type}:{addr.value}")
        return shown

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"PrimarySmtpAddress": self.primary_smtp_address,
                                "EmailAddresses": list(self.email_addresses)}
        if self.password_hash is not None:
            data["PasswordHash"] = self.password_hash
        return data

    @classmethod
    def from_data(cls, guid: str, name: str, data: dict[str, Any]) -> Mailbox:
        return cls(guid, name, data["PrimarySmtpAddress"], tuple(data.get("EmailAddresses", ())),
                   data.get("PasswordHash"))

    def keys(self) -> list[str]:
        return [f"{self.KIND}:name:{self.name.casefold()}"] + [
            f"proxy:{addr.key}" for addr in self.proxy_addresses()]


@dataclass(frozen=True)
class ForeignConnector:
    """Exchange's Foreign connector (reference §1.2), with every parameter and default."""

    guid: str
    name: str
    address_spaces: tuple[AddressSpace, ...]
    source_transport_servers: tuple[str, ...] = ()
    is_scoped_connector: bool = False
    drop_directory: str | None = None       # None: the connector's name
    drop_directory_quota: int | None = None  # bytes; None: unlimited
    max_message_size: int | None = None      # bytes; None: unlimited; 0 disables
    relay_dsn_required: bool = False
    enabled: bool = True
    comment: str | None = None
    # Confirmed hand-off (PRODUCT §4.6, beyond Exchange): wait for the gateway's .ack/.nack.
    delivery_confirmation: bool = False
    confirmation_timeout: float = 3600.0
    confirmation_timeout_action: str = "Fail"   # one of CONFIRMATION_TIMEOUT_ACTIONS

    KIND = "foreign-connector"

    def to_data(self) -> dict[str, Any]:
        return {
            "AddressSpaces": [str(a) for a in self.address_spaces],
            "SourceTransportServers": list(self.source_transport_servers),
            "IsScopedConnector": self.is_scoped_connector,
            "DropDirectory": self.drop_directory,
            "DropDirectoryQuota": self.drop_directory_quota,
            "MaxMessageSize": self.max_message_size,
            "RelayDsnRequired": self.relay_dsn_required,
            "Enabled": self.enabled,
            "Comment": self.comment,
            "DeliveryConfirmation": self.delivery_confirmation,
            "ConfirmationTimeout": self.confirmation_timeout,
            "ConfirmationTimeoutAction": self.confirmation_timeout_action,
        }

    @classmethod
    def from_data(cls, guid: str, name: str, data: dict[str, Any]) -> ForeignConnector:
        return cls(
            guid, name,
            tuple(AddressSpace.parse(a) for a in data["AddressSpaces"]),
            tuple(data.get("SourceTransportServers", ())),
            bool(data.get("IsScopedConnector", False)),
            data.get("DropDirectory"),
            data.get("DropDirectoryQuota"),
            data.get("MaxMessageSize"),
            bool(data.get("RelayDsnRequired", False)),
            bool(data.get("Enabled", True)),
            data.get("Comment"),
            bool(data.get("DeliveryConfirmation", False)),
            float(data.get("ConfirmationTimeout", 3600.0)),
            data.get("ConfirmationTimeoutAction", "Fail"),
        )

    def keys(self) -> list[str]:
        return [f"{self.KIND}:name:{self.name.casefold()}"]

    def drop_path(self, root: Path) -> Path:
        """The Drop directory: DropDirectory when absolute, else RootDropDirectoryPath/DropDirectory."""
        rel = Path(self.drop_directory if self.drop_directory else self.name)
        return rel if rel.is_absolute() else root / rel

    def hosted_on(self, node: str) -> bool:
        return hosted(self.source_transport_servers, node)


@dataclass(frozen=True)
class DeliveryAgentConnector:
    """Exchange's Delivery Agent connector (reference §3.2): its address spaces are served
    by a delivery agent (a plugin, `DeliveryProtocol`) with queue management."""

    guid: str
    name: str
    address_spaces: tuple[AddressSpace, ...]
    delivery_protocol: str
    source_transport_servers: tuple[str, ...] = ()
    max_concurrent_connections: int = 5
    max_messages_per_connection: int = 20
    max_message_size: int | None = None
    enabled: bool = True
    comment: str | None = None
    settings: tuple[tuple[str, str], ...] = ()   # as checked by the agent; secrets by env var

    KIND = "delivery-agent-connector"

    def to_data(self) -> dict[str, Any]:
        return {
            "AddressSpaces": [str(a) for a in self.address_spaces],
            "DeliveryProtocol": self.delivery_protocol,
            "SourceTransportServers": list(self.source_transport_servers),
            "MaxConcurrentConnections": self.max_concurrent_connections,
            "MaxMessagesPerConnection": self.max_messages_per_connection,
            "MaxMessageSize": self.max_message_size,
            "Enabled": self.enabled,
            "Comment": self.comment,
            "Settings": dict(self.settings),
        }

    @classmethod
    def from_data(cls, guid: str, name: str, data: dict[str, Any]) -> DeliveryAgentConnector:
        return cls(
            guid, name, tuple(AddressSpace.parse(a) for a in data["AddressSpaces"]),
            data["DeliveryProtocol"], tuple(data.get("SourceTransportServers", ())),
            int(data.get("MaxConcurrentConnections", 5)),
            int(data.get("MaxMessagesPerConnection", 20)), data.get("MaxMessageSize"),
            bool(data.get("Enabled", True)), data.get("Comment"),
            tuple(sorted(data.get("Settings", {}).items())))

    def keys(self) -> list[str]:
        return [f"{self.KIND}:name:{self.name.casefold()}"]

    def hosted_on(self, node: str) -> bool:
        return hosted(self.source_transport_servers, node)


# Transport-service settings: name -> (default, kind). Kinds drive parsing/formatting in admin.
# Paths default to folders under the node's data directory (PRODUCT §4.1).
_DAY = 86400.0


@dataclass(frozen=True)
class TransportService:
    """Per-node transport settings (Set-TransportService). Durations are in seconds, sizes
    in bytes; None means unlimited (sizes, rates) or disabled (directory paths)."""

    node: str
    pickup_directory_path: str | None = "pickup"
    replay_directory_path: str | None = "replay"
    replay_directory_trusted: bool = False
    root_drop_directory_path: str = "drop"
    pickup_directory_max_messages_per_minute: int | None = None
    pickup_directory_max_header_size: int = 64 * 1024
    pickup_directory_max_recipients_per_message: int = 100
    message_expiration_timeout: float = 2 * _DAY
    delay_notification_timeout: float = 4 * 3600.0
    transient_failure_retry_interval: float = 5 * 60.0
    transient_failure_retry_count: int = 6
    outbound_connection_failure_retry_interval: float = 10 * 60.0
    message_retry_interval: float = 15 * 60.0
    poison_message_detection_enabled: bool = True
    poison_threshold: int = 2
    max_message_size: int | None = None
    message_tracking_log_enabled: bool = True
    message_tracking_log_path: str | None = "logs/MessageTracking"
    message_tracking_log_max_age: float = 30 * _DAY
    message_tracking_log_max_directory_size: int | None = 1000 * 1024 * 1024
    message_tracking_log_max_file_size: int = 10 * 1024 * 1024
    message_tracking_log_subject_logging_enabled: bool = True
    # DNS servers for Send connectors (Set-TransportService -ExternalDNSServers), each
    # `ip` or `ip:port` (`[ipv6]:port`); empty: the system's resolver.
    external_dns_servers: tuple[str, ...] = ()

    KIND = "transport-service"

    def to_data(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self) if f.name != "node"}

    @classmethod
    def from_data(cls, node: str, data: dict[str, Any]) -> TransportService:
        known = {f.name for f in fields(cls)} - {"node"}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in data.items() if k in known}
        return cls(node=node, **values)

    def with_changes(self, **changes: Any) -> TransportService:
        return replace(self, **changes)

    def resolve(self, data_dir: Path, value: str | None) -> Path | None:
        if value is None:
            return None
        p = Path(value)
        return p if p.is_absolute() else data_dir / p


@dataclass
class Organization:
    """An immutable-by-convention snapshot of the configuration, indexed for the categorizer."""

    version: int
    accepted_domains: list[AcceptedDomain]
    mailboxes: list[Mailbox]
    foreign_connectors: list[ForeignConnector]
    transport: TransportService
    delivery_agent_connectors: list[DeliveryAgentConnector] = field(default_factory=list)
    receive_connectors: list[ReceiveConnector] = field(default_factory=list)
    send_connectors: list[SendConnector] = field(default_factory=list)
    _domains: dict[str, AcceptedDomain] = field(default_factory=dict, repr=False)
    _proxies: dict[str, Mailbox] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._domains = {d.domain_name.lower(): d for d in self.accepted_domains}
        for mbx in self.mailboxes:
            for addr in mbx.proxy_addresses():
                self._proxies.setdefault(addr.key, mbx)

    def accepted_domain(self, domain: str) -> AcceptedDomain | None:
        return self._domains.get(domain.lower())

    @property
    def default_domain(self) -> AcceptedDomain | None:
        for d in self.accepted_domains:
            if d.default:
                return d
        return self.accepted_domains[0] if len(self.accepted_domains) == 1 else None

    def mailbox_for(self, address: RecipientAddress) -> Mailbox | None:
        return self._proxies.get(address.key)
