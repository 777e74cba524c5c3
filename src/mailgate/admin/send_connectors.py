"""Send connectors (New-/Set-/Get-/Remove-SendConnector): SMTP out, through DNS MX records
or smart hosts.

Rules (Exchange's, with mailgate's limits):

- AddressSpaces: SMTP spaces only (`*`, `contoso.com`, `*.contoso.com`, with `;cost`),
  parsed as for Foreign connectors; routing chooses among Send, Foreign and Delivery Agent
  connectors together.
- SmartHosts: host names, IP addresses (`[10.0.0.1]`) and `:port` (core/hosts.py). With
  smart hosts DNSRoutingEnabled is false; `--dns-routing-enabled true` clears them, and
  `false` needs them.
- Port 1-65535 (25); Tls none|opportunistic|required (opportunistic); with Tls required,
  TlsAuthLevel EncryptionOnly (the default: any certificate), CertificateValidation (a
  chain to a trusted CA: TlsCaFile's PEM certificates, else the system's) or
  DomainValidation (that, and a name of the certificate matches TlsDomain, else the host
  connected to: the MX or smart host name). TlsDomain `contoso.com` or `*.contoso.com`
  (any host under it) needs DomainValidation; TlsCaFile must hold PEM certificates.
  SmartHostAuthMechanism None|BasicAuth|BasicAuthRequireTLS (None) needs smart hosts, an
  AuthUser and AuthPasswordEnv, the name of the node's environment variable that holds the
  password (the password itself is never stored or shown); BasicAuthRequireTLS needs TLS.
- Fqdn: the EHLO name (default the node's host name); MaxMessageSize 0-2147483647 KB or
  unlimited (35 MB); SmtpMaxMessagesPerConnection 1-100000 (20);
  ConnectionInactivityTimeout 1 s-1 day (10 min); SourceTransportServers (this node).

A request that breaks a rule raises AdminError and changes nothing.
"""

from __future__ import annotations

import os
import re
import ssl
import uuid
from dataclasses import replace
from typing import Any

from mailgate.admin import (
    AdminError,
    check_name,
    find_by_identity,
    fqdn_value,
    list_values,
    within,
)
from mailgate.admin.organization import _max_size, _merge, _obj, _put, _servers, _spaces
from mailgate.core.hosts import HostError, is_host_name, parse_smart_host
from mailgate.core.units import seconds_shown
from mailgate.directory import load_organization
from mailgate.organization import Organization
from mailgate.smtp_connectors import (DOMAIN_VALIDATION, ENCRYPTION_ONLY, SMART_HOST_AUTH,
                                      TLS_AUTH_LEVELS, TLS_MODES, SendConnector)
from mailgate.store import Store

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_TIMEOUT = 86400.0
SETTINGS = ("port", "tls", "tls_auth_level", "tls_domain", "tls_ca_file",
            "smart_host_auth_mechanism", "auth_user", "auth_password_env",
            "fqdn", "max_message_size", "smtp_max_messages_per_connection",
            "connection_inactivity_timeout", "enabled", "comment")


def _smtp_spaces(values: list[str]) -> tuple[Any, ...]:
    spaces = _spaces(values)
    for s in spaces:
        if s.type != "SMTP":
            raise AdminError(f"--address-spaces: a Send connector takes SMTP address spaces "
                             f"only (got {s})")
    return spaces


def smart_hosts(values: list[str]) -> tuple[str, ...]:
    """Smart hosts as given (repeat or comma lists), canonical and without repeats."""
    out: list[str] = []
    for part in list_values(values):
        try:
            out.append(str(parse_smart_host(part)))
        except HostError as exc:
            raise AdminError(f"--smart-hosts: {exc}") from None
    return tuple(dict.fromkeys(out))


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    for a in allowed:
        if value.strip().casefold() == a.casefold():
            return a
    raise AdminError(f"{option} must be one of {', '.join(allowed)} (got '{value}')")


def _settings(c: SendConnector, s: dict[str, Any]) -> SendConnector:
    unknown = set(s) - set(SETTINGS)
    if unknown:
        raise AdminError(f"unknown Send connector settings: {', '.join(sorted(unknown))}")
    changes: dict[str, Any] = {}
    if s.get("port") is not None:
        changes["port"] = int(within("--port", s["port"], 1, 65535))
    if s.get("tls") is not None:
        changes["tls"] = _choice("--tls", s["tls"], TLS_MODES)
    if s.get("tls_auth_level") is not None:
        changes["tls_auth_level"] = _choice("--tls-auth-level", s["tls_auth_level"],
                                            TLS_AUTH_LEVELS)
    if s.get("tls_domain") is not None:
        changes["tls_domain"] = _tls_domain(s["tls_domain"])
    if s.get("tls_ca_file") is not None:
        changes["tls_ca_file"] = _ca_file(s["tls_ca_file"])
    if s.get("smart_host_auth_mechanism") is not None:
        changes["smart_host_auth_mechanism"] = _choice(
            "--smart-host-auth-mechanism", s["smart_host_auth_mechanism"], SMART_HOST_AUTH)
    if s.get("auth_user") is not None:
        user = s["auth_user"]
        if user and (user != user.strip() or any(ord(ch) < 32 or ord(ch) == 127
                                                  for ch in user)):
            raise AdminError("--auth-user must not contain control characters or "
                             "surrounding spaces")
        changes["auth_user"] = user or None
    if s.get("auth_password_env") is not None:
        name = s["auth_password_env"].strip()
        if name and not _ENV_NAME.match(name):
            raise AdminError(f"--auth-password-env takes the name of an environment "
                             f"variable (letters, digits, '_'), not '{name}'")
        changes["auth_password_env"] = name or None
    if s.get("fqdn") is not None:
        changes["fqdn"] = fqdn_value(s["fqdn"])
    if "max_message_size" in s:
        changes["max_message_size"] = _max_size(s["max_message_size"])
    if s.get("smtp_max_messages_per_connection") is not None:
        changes["smtp_max_messages_per_connection"] = int(within(
            "--smtp-max-messages-per-connection", s["smtp_max_messages_per_connection"], 1,
            100000))
    if s.get("connection_inactivity_timeout") is not None:
        changes["connection_inactivity_timeout"] = within(
            "--connection-inactivity-timeout", float(s["connection_inactivity_timeout"]), 1.0,
            MAX_TIMEOUT, seconds_shown)
    if s.get("enabled") is not None:
        changes["enabled"] = bool(s["enabled"])
    if s.get("comment") is not None:
        changes["comment"] = s["comment"] or None
    return replace(c, **changes)


def _tls_domain(value: str) -> str | None:
    domain = value.strip().rstrip(".").lower()
    if not domain:
        return None
    if not is_host_name(domain.removeprefix("*.")):
        raise AdminError(f"--tls-domain must be a domain (contoso.com) or a wildcard "
                         f"(*.contoso.com), not '{value}'")
    return domain


def _ca_file(value: str) -> str | None:
    """The path, absolute, once it is known to hold PEM certificates a client can trust."""
    if not value.strip():
        return None
    path = os.path.abspath(value.strip())
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise AdminError(f"--tls-ca-file: {path} does not exist") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise AdminError(f"--tls-ca-file: {path} holds no usable PEM certificate "
                         f"({getattr(exc, 'strerror', None) or exc})") from None
    return path


def _routing(c: SendConnector, hosts: list[str] | None,
             dns_routing_enabled: bool | None) -> SendConnector:
    if hosts is not None and dns_routing_enabled:
        raise AdminError("--smart-hosts and --dns-routing-enabled true exclude each other")
    if hosts is not None:
        found = smart_hosts(hosts)
        if not found:
            raise AdminError("--smart-hosts needs at least one host")
        c = replace(c, smart_hosts=found)
    elif dns_routing_enabled:
        c = replace(c, smart_hosts=())
    elif dns_routing_enabled is False and not c.smart_hosts:
        raise AdminError("--dns-routing-enabled false needs --smart-hosts")
    return replace(c, dns_routing_enabled=not c.smart_hosts)


def _check(c: SendConnector) -> SendConnector:
    """The rules between settings, after every change is applied."""
    if c.tls_auth_level != ENCRYPTION_ONLY and c.tls != "required":
        raise AdminError(f"--tls-auth-level {c.tls_auth_level} needs --tls required "
                         f"(Exchange's RequireTLS): a certificate cannot be insisted on "
                         f"when TLS itself is optional")
    if c.tls_domain and c.tls_auth_level != DOMAIN_VALIDATION:
        raise AdminError("--tls-domain applies with --tls-auth-level DomainValidation")
    if c.smart_host_auth_mechanism != "None":
        if not c.smart_hosts:
            raise AdminError(f"--smart-host-auth-mechanism {c.smart_host_auth_mechanism} "
                             f"applies to smart hosts only: give --smart-hosts")
        if not c.auth_user or not c.auth_password_env:
            raise AdminError(f"--smart-host-auth-mechanism {c.smart_host_auth_mechanism} "
                             f"needs --auth-user and --auth-password-env")
        if c.smart_host_auth_mechanism == "BasicAuthRequireTLS" and c.tls == "none":
            raise AdminError("--smart-host-auth-mechanism BasicAuthRequireTLS needs --tls "
                             "opportunistic or required")
    return c


def warnings(c: SendConnector) -> list[str]:
    out = []
    if c.auth_password_env and c.smart_host_auth_mechanism != "None" \
            and c.auth_password_env not in os.environ:
        out.append(f"the environment variable {c.auth_password_env} is not set here; the "
                   f"node must have it when it delivers, or the queue waits in Retry")
    if c.max_message_size == 0 and c.enabled:
        out.append(f"MaxMessageSize is 0: the connector {c.name} is enabled but takes no "
                   f"messages")
    return out


def find_send_connector(org: Organization, identity: str) -> SendConnector:
    return find_by_identity("Send connector", identity, org.send_connectors)


async def new_send_connector(store: Store, *, name: str, address_spaces: list[str],
                             smart_hosts: list[str] | None = None,
                             dns_routing_enabled: bool | None = None,
                             source_transport_servers: list[str] | None = None,
                             **settings: Any) -> SendConnector:
    c = SendConnector(str(uuid.uuid4()), check_name("connector", name),
                      _smtp_spaces(address_spaces),
                      source_transport_servers=_servers(source_transport_servers)
                      or (store.node,))
    c = _check(_settings(_routing(c, smart_hosts, dns_routing_enabled), settings))
    await _put(store, [_obj(c)])
    return c


async def set_send_connector(store: Store, identity: str, *, name: str | None = None,
                             address_spaces: list[str] | None = None,
                             add_address_spaces: list[str] | None = None,
                             remove_address_spaces: list[str] | None = None,
                             smart_hosts: list[str] | None = None,
                             dns_routing_enabled: bool | None = None,
                             source_transport_servers: list[str] | None = None,
                             **settings: Any) -> SendConnector:
    org = await load_organization(store, store.node)
    c = find_send_connector(org, identity)

    def key(text: str) -> str:
        a = _smtp_spaces([text])[0]
        return f"{a.type}:{a.space.casefold()}"
    spaces = _merge([str(a) for a in c.address_spaces], address_spaces, add_address_spaces,
                    remove_address_spaces, key)
    new = replace(c, name=check_name("connector", name) if name is not None else c.name,
                  address_spaces=_smtp_spaces(spaces),
                  source_transport_servers=_servers(source_transport_servers)
                  or c.source_transport_servers)
    new = _check(_settings(_routing(new, smart_hosts, dns_routing_enabled), settings))
    await _put(store, [_obj(new)])
    return new


async def get_send_connectors(store: Store, identity: str | None = None
                              ) -> list[SendConnector]:
    org = await load_organization(store, store.node)
    if identity:
        return [find_send_connector(org, identity)]
    return sorted(org.send_connectors, key=lambda c: c.name.casefold())


async def remove_send_connector(store: Store, identity: str) -> SendConnector:
    org = await load_organization(store, store.node)
    c = find_send_connector(org, identity)
    await store.delete_object(c.guid)
    return c
