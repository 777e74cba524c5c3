"""Receive connectors (New-/Get-/Set-/Remove-ReceiveConnector): who may connect on which
local address and port, with which rights and limits.

Every value is checked here, before anything is stored, so a refused command changes
nothing; the messages name the CLI option. Exchange's ranges, and its rule that connectors
sharing a binding on a node must differ in their remote IP ranges (the most specific range
chooses the connector for a client, `mailgate.core.ip_ranges.best_connector`).
"""

from __future__ import annotations

import os
import re
import ssl
import stat
import uuid
from dataclasses import replace
from typing import Any, Callable, Iterable

from mailgate.admin import (
    AdminError,
    check_name,
    find_by_identity,
    fqdn_value,
    list_values,
    within,
)
from mailgate.admin.organization import _merge, _obj, _servers
from mailgate.core.ip_ranges import IPRangeError, ambiguous, parse_binding, parse_range
from mailgate.core.units import format_size, seconds_shown
from mailgate.directory import load_organization
from mailgate.organization import Organization
from mailgate.smtp_connectors import AUTH_MECHANISMS, PERMISSION_GROUPS, ReceiveConnector
from mailgate.store import DuplicateKeyError, Store

INT_MAX = 2147483647
DAY = 86400.0
# setting -> (low, high): Exchange's ranges (Set-ReceiveConnector); sizes in bytes,
# durations in seconds.
RANGES: dict[str, tuple[float, float]] = {
    "max_message_size": (65536, INT_MAX),           # RFC 5321 §4.5.3.1.7: at least 64K
    "max_recipients_per_message": (1, 5000),
    "max_inbound_connection": (1, INT_MAX),
    "max_inbound_connection_per_source": (1, 10000),
    "connection_timeout": (1, DAY),
    "connection_inactivity_timeout": (1, DAY),
    "max_hop_count": (1, 500),
    "max_header_size": (1, INT_MAX),
    "max_logon_failures": (0, 10),
    "tarpit_interval": (0, 600),
    "max_protocol_errors": (0, INT_MAX),
}
DURATIONS = ("connection_timeout", "connection_inactivity_timeout", "tarpit_interval")
SIZES = ("max_message_size", "max_header_size")
BOOLS = ("require_tls", "smtp_utf8_enabled", "enabled")
LISTS = ("bindings", "remote_ip_ranges", "permission_groups", "auth_mechanism",
         "source_transport_servers")
TEXTS = ("banner", "fqdn", "comment", "tls_certificate", "tls_key")
SETTINGS = tuple(RANGES) + BOOLS + LISTS + TEXTS
BANNER_MAX = 200
COMMENT_MAX = 1024
_NULL = ("", "$null")
_REPLY_CODE = re.compile(r"^[0-9]{3}(?:[ -]|$)")


def option(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def _null(value: str) -> bool:
    return value.strip().lower() in _NULL


# -- single values ----------------------------------------------------------------------


def _bindings(values: Iterable[str]) -> tuple[str, ...]:
    out = []
    for text in list_values(values):
        try:
            out.append(str(parse_binding(text)))
        except IPRangeError as exc:
            raise AdminError(f"--bindings: {exc}") from None
    if not out:
        raise AdminError("--bindings needs at least one IP:PORT, e.g. 0.0.0.0:25")
    return tuple(dict.fromkeys(out))


def _remote_ranges(values: Iterable[str]) -> tuple[str, ...]:
    out = []
    for text in list_values(values):
        try:
            out.append(str(parse_range(text)))
        except IPRangeError as exc:
            raise AdminError(f"--remote-ip-ranges: {exc}") from None
    if not out:
        raise AdminError("--remote-ip-ranges needs at least one address, network or range "
                         "(0.0.0.0/0 and ::/0 for every client)")
    return tuple(dict.fromkeys(out))


def _canonical(what: str, allowed: tuple[str, ...], values: Iterable[str]) -> tuple[str, ...]:
    out = []
    for text in list_values(values):
        found = [a for a in allowed if a.casefold() == text.casefold()]
        if not found:
            raise AdminError(f"{what}: '{text}' is not one of {', '.join(allowed)}")
        out.append(found[0])
    if not out:
        raise AdminError(f"{what} needs one or more of {', '.join(allowed)}")
    # Shown in the order Exchange lists the values, each once.
    return tuple(a for a in allowed if a in out)


def _permission_groups(values: Iterable[str]) -> tuple[str, ...]:
    return _canonical("--permission-groups", PERMISSION_GROUPS, values)


def _auth_mechanism(values: Iterable[str]) -> tuple[str, ...]:
    mechanisms = _canonical("--auth-mechanism", AUTH_MECHANISMS, values)
    if "None" in mechanisms and len(mechanisms) > 1:
        raise AdminError("--auth-mechanism: None cannot be combined with other mechanisms")
    return mechanisms


def _banner(value: str) -> str | None:
    """The text of the 220 greeting. Exchange requires it to start with '220 '; mailgate
    takes it with or without and stores the text after the code."""
    if _null(value):
        return None
    if any(ch in value for ch in "\r\n\x00"):
        raise AdminError("--banner must be one line: no CR, LF or NUL characters")
    text = value.strip()
    if text == "220" or text.startswith("220 "):
        text = text[3:].strip()
    elif text.startswith("220-"):
        raise AdminError("--banner is one line: give the text alone, or '220 text'")
    elif _REPLY_CODE.match(text):
        raise AdminError(f"--banner is the text of the 220 greeting; it cannot start with "
                         f"another reply code ('{text[:3]}')")
    if not text:
        raise AdminError("--banner needs some text after '220' (or '$null' for the default)")
    if any(not 32 <= ord(ch) <= 126 for ch in text):
        raise AdminError("--banner must be printable ASCII text (SMTP replies are ASCII)")
    if len(text) > BANNER_MAX:
        raise AdminError(f"--banner must be at most {BANNER_MAX} characters "
                         f"(got {len(text)})")
    return text


def _comment(value: str) -> str | None:
    if _null(value):
        return None
    if len(value) > COMMENT_MAX or any(ch in value for ch in "\x00"):
        raise AdminError(f"--comment must be at most {COMMENT_MAX} characters, without NUL")
    return value


def _path(setting: str, value: str) -> str | None:
    if _null(value):
        return None
    text = value.strip()
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise AdminError(f"{option(setting)} must be a path without control characters")
    # Absolute, but symbolic links are kept: a renewed certificate (e.g. certbot's
    # live/ folder) is picked up through its link.
    return os.path.abspath(os.path.expanduser(text))


def _number(setting: str, value: Any) -> Any:
    low, high = RANGES[setting]
    if setting in DURATIONS:
        shown: Callable[[Any], str] = seconds_shown
    elif setting in SIZES:
        shown = format_size
    else:
        shown = str
    if value is None:
        raise AdminError(f"{option(setting)} must be between {shown(low)} and {shown(high)} "
                         f"(got unlimited)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdminError(f"{option(setting)} must be a number (got {value!r})")
    within(option(setting), value, low, high, shown)
    return float(value) if setting in DURATIONS else int(value)


# -- TLS files ----------------------------------------------------------------------------


class _Encrypted(Exception):
    pass


def _refuse_passphrase() -> bytes:
    raise _Encrypted()


def check_tls_files(certificate: str, key: str) -> None:
    """Both files exist and load together as a server certificate chain and private key."""
    for setting, path in (("tls_certificate", certificate), ("tls_key", key)):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise AdminError(f"{option(setting)}: {path} does not exist") from None
        except OSError as exc:
            raise AdminError(f"{option(setting)}: cannot read {path}: "
                             f"{exc.strerror or exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise AdminError(f"{option(setting)}: {path} is not a file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certificate, key, password=_refuse_passphrase)
    except _Encrypted:
        raise AdminError(f"--tls-key: {key} is protected by a passphrase; mailgate needs an "
                         f"unencrypted key file (readable only by mailgate's user)") from None
    except PermissionError as exc:
        raise AdminError(f"cannot read {exc.filename or 'the TLS files'}: permission "
                         f"denied") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None)
        if reason == "KEY_VALUES_MISMATCH":
            why = "the key does not belong to the certificate"
        elif isinstance(exc, ssl.SSLError):
            why = ("not a PEM certificate chain and private key"
                   + (f": {reason}" if reason else ""))
        else:
            why = str(getattr(exc, "strerror", None) or exc)
        raise AdminError(f"--tls-certificate {certificate} and --tls-key {key} cannot be "
                         f"used: {why.replace(chr(10), ' ')[:120]}") from None


# -- applying settings --------------------------------------------------------------------


def _apply(c: ReceiveConnector, s: dict[str, Any]) -> ReceiveConnector:
    unknown = set(s) - set(SETTINGS)
    if unknown:
        raise AdminError(f"unknown Receive connector settings: {', '.join(sorted(unknown))}")
    changes: dict[str, Any] = {}
    for key, value in s.items():
        if key in RANGES:
            changes[key] = _number(key, value)
        elif key in BOOLS:
            changes[key] = bool(value)
        elif key == "bindings":
            changes[key] = _bindings(value)
        elif key == "remote_ip_ranges":
            changes[key] = _remote_ranges(value)
        elif key == "permission_groups":
            changes[key] = _permission_groups(value)
        elif key == "auth_mechanism":
            changes[key] = _auth_mechanism(value)
        elif key == "source_transport_servers":
            changes[key] = _servers(list_values(value)) or ()
        elif key == "banner":
            changes[key] = _banner(value)
        elif key == "fqdn":
            changes[key] = fqdn_value(value)
        elif key == "comment":
            changes[key] = _comment(value)
        elif key in ("tls_certificate", "tls_key"):
            changes[key] = _path(key, value)
    new = replace(c, **changes)
    _check_consistent(new, s)
    return new


def _check_consistent(c: ReceiveConnector, given: dict[str, Any]) -> None:
    if c.connection_inactivity_timeout >= c.connection_timeout:
        raise AdminError(f"--connection-inactivity-timeout "
                         f"({seconds_shown(c.connection_inactivity_timeout)}) must be less than "
                         f"--connection-timeout ({seconds_shown(c.connection_timeout)})")
    if (c.tls_certificate is None) != (c.tls_key is None):
        raise AdminError("--tls-certificate and --tls-key go together: give both (or "
                         "'$null' for both to use a generated self-signed certificate)")
    if c.tls_certificate is not None and c.tls_key is not None and (
            "tls_certificate" in given or "tls_key" in given):
        check_tls_files(c.tls_certificate, c.tls_key)
    tls = "Tls" in c.auth_mechanism
    if c.require_tls and not tls:
        raise AdminError("--require-tls true needs Tls in --auth-mechanism (STARTTLS must be "
                         "offered before it can be required)")
    for mech in ("BasicAuth", "BasicAuthRequireTLS"):
        if mech in c.auth_mechanism and not tls:
            raise AdminError(f"--auth-mechanism {mech} needs Tls too: mailgate offers AUTH "
                             f"only after STARTTLS (e.g. --auth-mechanism "
                             f"Tls,BasicAuthRequireTLS)")


def _share_a_node(a: ReceiveConnector, b: ReceiveConnector) -> str | None:
    """A node both connectors run on ('every node' when neither names one), or None."""
    sa = {s.casefold(): s for s in a.source_transport_servers}
    sb = {s.casefold() for s in b.source_transport_servers}
    if not sa and not sb:
        return "every node"
    if not sa:
        return next(iter(b.source_transport_servers))
    if not sb:
        return next(iter(a.source_transport_servers))
    common = [sa[k] for k in sa if k in sb]
    return common[0] if common else None


def _check_conflicts(c: ReceiveConnector, org: Organization) -> None:
    """Exchange: connectors on the same binding of a node must differ in remote ranges."""
    if not c.enabled:
        return
    for other in org.receive_connectors:
        if other.guid == c.guid or not other.enabled:
            continue
        node = _share_a_node(c, other)
        if node is None:
            continue
        try:
            clash = ambiguous(c.bindings, c.remote_ip_ranges, other.bindings,
                              other.remote_ip_ranges)
        except IPRangeError:
            continue   # a stored connector that no longer parses is not ours to judge
        if clash:
            where = f"on {node}" if node == "every node" else f"on node {node}"
            raise AdminError(f"the Receive connector {other.name} {where} already takes "
                             f"connections on the same binding ({', '.join(other.bindings)}) "
                             f"from the same remote IP ranges; connectors that share a "
                             f"binding must differ in --remote-ip-ranges (or --bindings)")


async def _save(store: Store, c: ReceiveConnector, org: Organization) -> None:
    if any(o.guid != c.guid and o.name.casefold() == c.name.casefold()
           for o in org.receive_connectors):
        raise AdminError(f"a Receive connector named '{c.name}' already exists")
    _check_conflicts(c, org)
    try:
        await store.put_objects([_obj(c)])
    except DuplicateKeyError as exc:
        raise AdminError(f"a Receive connector named '{c.name}' already exists "
                         f"({exc.owner})") from None


# -- commands -----------------------------------------------------------------------------


def find_receive_connector(org: Organization, identity: str) -> ReceiveConnector:
    """By GUID, name, or `Node\\Name` as Exchange shows it."""
    return find_by_identity("Receive connector", identity, org.receive_connectors)


def receive_connector_warnings(c: ReceiveConnector) -> list[str]:
    """Settings that are allowed but probably not what the administrator wants."""
    out = []
    auth = {"BasicAuth", "BasicAuthRequireTLS"} & set(c.auth_mechanism)
    if c.enabled and "ExchangeUsers" in c.permission_groups and not auth:
        out.append(f"the Receive connector {c.name} grants ExchangeUsers but offers no AUTH: "
                   f"add BasicAuthRequireTLS to --auth-mechanism so that users can log on")
    if c.tls_key is not None:
        try:
            mode = os.stat(c.tls_key).st_mode
        except OSError:
            mode = 0
        if mode & stat.S_IROTH:
            out.append(f"the private key {c.tls_key} can be read by every user on this "
                       f"machine; chmod o-r it")
    return out


async def new_receive_connector(store: Store, *, name: str, bindings: list[str],
                                source_transport_servers: list[str] | None = None,
                                **settings: Any) -> ReceiveConnector:
    org = await load_organization(store, store.node)
    c = ReceiveConnector(str(uuid.uuid4()), check_name("connector", name),
                         source_transport_servers=(store.node,))
    if source_transport_servers is not None:
        settings["source_transport_servers"] = source_transport_servers
    c = _apply(c, {"bindings": bindings, **settings})
    await _save(store, c, org)
    return c


async def set_receive_connector(store: Store, identity: str, *, name: str | None = None,
                                add_bindings: list[str] | None = None,
                                remove_bindings: list[str] | None = None,
                                add_remote_ip_ranges: list[str] | None = None,
                                remove_remote_ip_ranges: list[str] | None = None,
                                **settings: Any) -> ReceiveConnector:
    org = await load_organization(store, store.node)
    c = find_receive_connector(org, identity)
    if name is not None:
        c = replace(c, name=check_name("connector", name))
    for setting, add, remove, parse in (
            ("bindings", add_bindings, remove_bindings, _bindings),
            ("remote_ip_ranges", add_remote_ip_ranges, remove_remote_ip_ranges,
             _remote_ranges)):
        if add or remove:
            current = settings.get(setting)
            base = list(parse(current)) if current is not None else list(getattr(c, setting))
            merged = _merge(base, None, list(parse(add)) if add else None,
                            list(parse(remove)) if remove else None,
                            lambda text: text)
            settings[setting] = merged
    new = _apply(c, settings)
    await _save(store, new, org)
    return new


async def get_receive_connectors(store: Store, identity: str | None = None
                                 ) -> list[ReceiveConnector]:
    org = await load_organization(store, store.node)
    if identity:
        return [find_receive_connector(org, identity)]
    return sorted(org.receive_connectors, key=lambda c: c.name.casefold())


async def remove_receive_connector(store: Store, identity: str) -> ReceiveConnector:
    org = await load_organization(store, store.node)
    c = find_receive_connector(org, identity)
    await store.delete_object(c.guid)
    return c
