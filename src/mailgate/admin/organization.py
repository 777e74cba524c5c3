"""Accepted domains, mailboxes and Foreign connectors (New-/Get-/Set-/Remove- cmdlets)."""

from __future__ import annotations

import re
import uuid
from dataclasses import replace
from typing import Any, Iterable

from mailgate.admin import AdminError, check_name, find_by_identity, pick_one
from mailgate.core.address import AddressError, parse_recipient_address, parse_smtp_address
from mailgate.core.address_space import AddressSpace, AddressSpaceError, parse_address_spaces
from mailgate.deliver.maildir import MaildirStore
from mailgate.directory import load_organization
from mailgate.organization import (
    CONFIRMATION_TIMEOUT_ACTIONS,
    DOMAIN_TYPES,
    AcceptedDomain,
    DeliveryAgentConnector,
    ForeignConnector,
    Mailbox,
    Organization,
)
from mailgate.smtp_connectors import ReceiveConnector, SendConnector
from mailgate.store import DirectoryObject, DuplicateKeyError, Store

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
MAX_KB = 2147483647


_KIND_NAMES = {"accepted-domain": "an accepted domain", "mailbox": "a mailbox",
               "foreign-connector": "a Foreign connector",
               "delivery-agent-connector": "a Delivery Agent connector",
               "send-connector": "a Send connector"}


def _describe_duplicate(exc: DuplicateKeyError) -> str:
    kind, _, rest = exc.key.partition(":")
    if kind == "proxy":
        return f"the address {rest.partition(':')[2] if rest.startswith('SMTP:') else rest} " \
               f"is already used by {exc.owner}"
    what, _, value = rest.partition(":")
    return f"{_KIND_NAMES.get(kind, kind)} with {what} '{value}' already exists ({exc.owner})"


async def _put(store: Store, items: list[tuple[DirectoryObject, list[str]]]) -> None:
    try:
        await store.put_objects(items)
    except DuplicateKeyError as exc:
        raise AdminError(_describe_duplicate(exc)) from None


def _obj(o: AcceptedDomain | Mailbox | ForeignConnector | DeliveryAgentConnector
         | ReceiveConnector | SendConnector) -> tuple[DirectoryObject, list[str]]:
    """A configuration object as the directory stores it, with its unique keys."""
    return DirectoryObject(o.guid, o.KIND, o.name, o.to_data()), o.keys()


# -- accepted domains -------------------------------------------------------------------

def _domain_type(value: str) -> str:
    canon = value.replace("-", "").replace("_", "").lower()
    for t in DOMAIN_TYPES:
        if t.lower() == canon:
            return t
    raise AdminError(f"--domain-type must be authoritative or internal-relay (got {value!r})")


def _domain_name(value: str) -> str:
    name = value.strip().rstrip(".").lower()
    labels = name.split(".")
    if len(name) > 255 or len(labels) < 1 or not all(_LABEL.match(lb) for lb in labels):
        raise AdminError(f"{value!r} is not a valid domain name")
    return name


def find_domain(org: Organization, identity: str) -> AcceptedDomain:
    ident = identity.strip().lower()
    return pick_one("accepted domain", identity, (
        d for d in org.accepted_domains
        if ident in (d.guid, d.name.lower(), d.domain_name.lower())))


async def new_accepted_domain(store: Store, *, domain_name: str, name: str | None = None,
                              domain_type: str = "Authoritative",
                              default: bool = False) -> AcceptedDomain:
    org = await load_organization(store, store.node)
    dname = _domain_name(domain_name)
    make_default = default or not org.accepted_domains
    d = AcceptedDomain(str(uuid.uuid4()), check_name("accepted domain", name or dname), dname,
                       _domain_type(domain_type), make_default)
    items = [_obj(d)]
    if make_default:
        items += [_obj(replace(o, default=False)) for o in org.accepted_domains if o.default]
    await _put(store, items)
    return d


async def set_accepted_domain(store: Store, identity: str, *, name: str | None = None,
                              domain_type: str | None = None,
                              default: bool | None = None) -> AcceptedDomain:
    org = await load_organization(store, store.node)
    d = find_domain(org, identity)
    if default is False and d.default:
        raise AdminError(f"{d.domain_name} is the default accepted domain; make another "
                         f"domain the default instead")
    new = replace(d, name=check_name("accepted domain", name) if name is not None else d.name,
                  domain_type=_domain_type(domain_type) if domain_type else d.domain_type,
                  default=d.default if default is None else default)
    items = [_obj(new)]
    if default:
        items += [_obj(replace(o, default=False)) for o in org.accepted_domains
                  if o.default and o.guid != d.guid]
    await _put(store, items)
    return new


async def remove_accepted_domain(store: Store, identity: str) -> AcceptedDomain:
    org = await load_organization(store, store.node)
    d = find_domain(org, identity)
    if d.default and len(org.accepted_domains) > 1:
        raise AdminError(f"{d.domain_name} is the default accepted domain; make another "
                         f"domain the default before removing it")
    users = [m.name for m in org.mailboxes if any(
        a.is_smtp and a.value.rpartition("@")[2].lower() == d.domain_name
        for a in m.proxy_addresses())]
    if users:
        raise AdminError(f"{d.domain_name} is used by the SMTP addresses of "
                         f"{len(users)} mailbox(es) ({', '.join(users[:5])}); change or "
                         f"remove those addresses first")
    await store.delete_object(d.guid)
    return d


# -- mailboxes --------------------------------------------------------------------------

def _smtp_in_accepted(org: Organization, text: str, what: str) -> str:
    try:
        addr = parse_smtp_address(text)
    except AddressError as exc:
        raise AdminError(f"{what}: {exc}") from None
    if org.accepted_domain(addr.domain) is None:
        raise AdminError(f"{what} {addr} is not in an accepted domain (add it with "
                         f"'mailgate accepted-domain new --domain-name {addr.domain}')")
    return str(addr)


def _proxy(org: Organization, text: str) -> str:
    try:
        addr = parse_recipient_address(text)
    except AddressError as exc:
        raise AdminError(f"--email-addresses: {exc}") from None
    if addr.is_smtp:
        return "smtp:" + _smtp_in_accepted(org, addr.value, "--email-addresses")
    return f"{addr.type}:{addr.value}"


def find_mailbox(org: Organization, identity: str) -> Mailbox:
    ident = identity.strip()
    key = None
    try:
        key = parse_recipient_address(ident).key
    except AddressError:
        pass
    return pick_one("mailbox", identity, (
        m for m in org.mailboxes
        if ident.lower() in (m.guid, m.name.casefold())
        or (key is not None and any(a.key == key for a in m.proxy_addresses()))))


def _merge(current: Iterable[str], replace_with: list[str] | None, add: list[str] | None,
           remove: list[str] | None, key: Any) -> list[str]:
    """Exchange's @{Add=...;Remove=...}: replace, then add (an item with the key of an
    existing one replaces it, e.g. an address space with a new cost), then remove."""
    items = list(replace_with) if replace_with is not None else list(current)
    for a in add or []:
        same = [i for i, b in enumerate(items) if key(a) == key(b)]
        if same:
            items[same[0]] = a
        else:
            items.append(a)
    for r in remove or []:
        before = len(items)
        items = [b for b in items if key(b) != key(r)]
        if len(items) == before:
            raise AdminError(f"'{r}' is not in the list, so it cannot be removed")
    return items


def _proxy_key(text: str) -> str:
    return parse_recipient_address(text[5:] if text.lower().startswith("smtp:") else text).key


def _primary_from_list(addresses: list[str] | None, primary: str | None) -> str | None:
    """Exchange marks the primary SMTP address with an upper-case `SMTP:` prefix."""
    marked = [a[5:] for a in addresses or [] if a.startswith("SMTP:")]
    if len(marked) > 1:
        raise AdminError("--email-addresses: only one address can be the primary (SMTP:)")
    if marked and primary and marked[0].lower() != primary.lower():
        raise AdminError(f"--email-addresses marks {marked[0]} as primary (SMTP:) but "
                         f"--primary-smtp-address is {primary}")
    return primary or (marked[0] if marked else None)


async def new_mailbox(store: Store, *, name: str, primary_smtp_address: str | None,
                      email_addresses: list[str] | None = None) -> Mailbox:
    org = await load_organization(store, store.node)
    given = _primary_from_list(email_addresses, primary_smtp_address)
    if not given:
        raise AdminError("a mailbox needs --primary-smtp-address")
    primary = _smtp_in_accepted(org, given, "--primary-smtp-address")
    proxies = [_proxy(org, a) for a in email_addresses or []]
    proxies = [p for p in proxies if _proxy_key(p) != _proxy_key(primary)]
    m = Mailbox(str(uuid.uuid4()), check_name("mailbox", name), primary, tuple(proxies))
    await _put(store, [_obj(m)])
    return m


async def set_mailbox(store: Store, identity: str, *, name: str | None = None,
                      primary_smtp_address: str | None = None,
                      email_addresses: list[str] | None = None,
                      add_email_addresses: list[str] | None = None,
                      remove_email_addresses: list[str] | None = None,
                      maildirs: MaildirStore | None = None) -> Mailbox:
    """Change a mailbox. When the primary SMTP address changes, the old one stays a proxy
    address (as in Exchange) and, given `maildirs`, the Maildir folder moves with it."""
    org = await load_organization(store, store.node)
    m = find_mailbox(org, identity)
    given = _primary_from_list((email_addresses or []) + (add_email_addresses or []),
                               primary_smtp_address)
    primary = (_smtp_in_accepted(org, given, "--primary-smtp-address")
               if given else m.primary_smtp_address)
    for r in remove_email_addresses or []:
        try:
            if _proxy_key(r) == _proxy_key(primary):
                raise AdminError(f"{primary} is the primary SMTP address; make another "
                                 f"address primary before removing it")
        except AddressError as exc:
            raise AdminError(f"--remove-email-addresses: {exc}") from None
    try:
        proxies = _merge(m.email_addresses,
                         [_proxy(org, a) for a in email_addresses] if email_addresses is not None
                         else None,
                         [_proxy(org, a) for a in add_email_addresses or []],
                         remove_email_addresses, _proxy_key)
    except AddressError as exc:
        raise AdminError(str(exc)) from None
    moved = m.primary_smtp_address.lower() != primary.lower()
    if moved:
        # The old primary stays an address of the mailbox, as in Exchange.
        old = "smtp:" + m.primary_smtp_address
        if all(_proxy_key(old) != _proxy_key(p) for p in proxies):
            proxies.append(old)
    proxies = [p for p in proxies if _proxy_key(p) != _proxy_key(primary)]
    new = Mailbox(m.guid, check_name("mailbox", name) if name is not None else m.name,
                  primary, tuple(proxies), m.password_hash)
    await _put(store, [_obj(new)])
    if moved and maildirs is not None:
        maildirs.move(m.primary_smtp_address, primary)
    return new


async def remove_mailbox(store: Store, identity: str) -> Mailbox:
    org = await load_organization(store, store.node)
    m = find_mailbox(org, identity)
    await store.delete_object(m.guid)
    return m


# -- Foreign connectors -----------------------------------------------------------------

def _spaces(values: list[str]) -> tuple[AddressSpace, ...]:
    try:
        spaces = parse_address_spaces(values)
    except AddressSpaceError as exc:
        raise AdminError(str(exc)) from None
    if not spaces:
        raise AdminError("--address-spaces needs at least one address space")
    return tuple(spaces)


def _quota(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= 2147483647:
        raise AdminError(f"--drop-directory-quota must be between 1 B and 2147483647 B or "
                         f"unlimited (got {value})")
    return value


def _confirmation_timeout(seconds: float) -> float:
    # At least a minute (the gateway needs time to answer), at most 30 days.
    if not 60.0 <= seconds <= 30 * 86400.0:
        raise AdminError(f"--confirmation-timeout must be between 1 minute and 30 days "
                         f"(got {seconds:g} seconds)")
    return float(seconds)


def _timeout_action(value: str) -> str:
    for action in CONFIRMATION_TIMEOUT_ACTIONS:
        if value.strip().casefold() == action.casefold():
            return action
    raise AdminError(f"--confirmation-timeout-action must be one of "
                     f"{', '.join(CONFIRMATION_TIMEOUT_ACTIONS)} (got '{value}')")


def _max_size(value: int | None) -> int | None:
    if value is not None and not 0 <= value <= MAX_KB * 1024:
        raise AdminError(f"--max-message-size must be between 0 KB and {MAX_KB} KB or "
                         f"unlimited (got {value} bytes)")
    return value


def _drop_directory(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value or "\x00" in value or any(ord(ch) < 32 for ch in value):
        raise AdminError("--drop-directory must be a folder name or an absolute path")
    return value


def _servers(values: list[str] | None) -> tuple[str, ...] | None:
    if values is None:
        return None
    out = []
    for v in values:
        name = v.strip()
        if not name or any(ord(ch) < 33 or ch in "\\/" for ch in name):
            raise AdminError(f"--source-transport-servers: '{v}' is not a node name")
        out.append(name)
    if not out:
        raise AdminError("--source-transport-servers needs at least one node name")
    return tuple(dict.fromkeys(out))


def find_connector(org: Organization, identity: str) -> ForeignConnector:
    return find_by_identity("Foreign connector", identity, org.foreign_connectors)


def connector_warnings(c: ForeignConnector, org: Organization, data_dir: Any) -> list[str]:
    out = []
    if c.max_message_size == 0 and c.enabled:
        out.append(f"MaxMessageSize is 0: the connector {c.name} is enabled but takes no "
                   f"messages")
    root = org.transport.resolve(data_dir, org.transport.root_drop_directory_path)
    if root is not None:
        path = c.drop_path(root)
        if not path.is_dir():
            out.append(f"the Drop directory {path} does not exist; mailgate does not create "
                       f"it: create it with permissions for the gateway, or messages wait in "
                       f"Retry")
    return out


async def new_foreign_connector(store: Store, *, name: str, address_spaces: list[str],
                                source_transport_servers: list[str] | None = None,
                                **settings: Any) -> ForeignConnector:
    c = ForeignConnector(
        str(uuid.uuid4()), check_name("connector", name), _spaces(address_spaces),
        _servers(source_transport_servers) or (store.node,))
    c = _apply_connector_settings(c, settings)
    await _put(store, [_obj(c)])
    return c


def _apply_connector_settings(c: ForeignConnector, s: dict[str, Any]) -> ForeignConnector:
    changes: dict[str, Any] = {}
    if s.get("drop_directory") is not None:
        changes["drop_directory"] = _drop_directory(s["drop_directory"])
    if "drop_directory_quota" in s:
        changes["drop_directory_quota"] = _quota(s["drop_directory_quota"])
    if "max_message_size" in s:
        changes["max_message_size"] = _max_size(s["max_message_size"])
    for key in ("relay_dsn_required", "enabled", "is_scoped_connector"):
        if s.get(key) is not None:
            changes[key] = bool(s[key])
    if s.get("comment") is not None:
        changes["comment"] = s["comment"]
    if s.get("delivery_confirmation") is not None:
        changes["delivery_confirmation"] = bool(s["delivery_confirmation"])
    if s.get("confirmation_timeout") is not None:
        changes["confirmation_timeout"] = _confirmation_timeout(s["confirmation_timeout"])
    if s.get("confirmation_timeout_action") is not None:
        changes["confirmation_timeout_action"] = _timeout_action(
            s["confirmation_timeout_action"])
    unknown = set(s) - {"drop_directory", "drop_directory_quota", "max_message_size",
                        "relay_dsn_required", "enabled", "is_scoped_connector", "comment",
                        "delivery_confirmation", "confirmation_timeout",
                        "confirmation_timeout_action"}
    if unknown:
        raise AdminError(f"unknown Foreign connector settings: {', '.join(sorted(unknown))}")
    return replace(c, **changes)


async def set_foreign_connector(store: Store, identity: str, *, name: str | None = None,
                                address_spaces: list[str] | None = None,
                                add_address_spaces: list[str] | None = None,
                                remove_address_spaces: list[str] | None = None,
                                source_transport_servers: list[str] | None = None,
                                **settings: Any) -> ForeignConnector:
    org = await load_organization(store, store.node)
    c = find_connector(org, identity)
    spaces = [str(a) for a in c.address_spaces]

    def key(text: str) -> str:
        a = _spaces([text])[0]
        return f"{a.type}:{a.space.casefold()}"
    spaces = _merge(spaces, address_spaces, add_address_spaces, remove_address_spaces, key)
    new = replace(c, name=check_name("connector", name) if name is not None else c.name,
                  address_spaces=_spaces(spaces),
                  source_transport_servers=_servers(source_transport_servers)
                  or c.source_transport_servers)
    new = _apply_connector_settings(new, settings)
    await _put(store, [_obj(new)])
    return new


async def remove_foreign_connector(store: Store, identity: str) -> ForeignConnector:
    org = await load_organization(store, store.node)
    c = find_connector(org, identity)
    await store.delete_object(c.guid)
    return c
