"""Delivery Agent connectors (New-/Set-/Get-/Remove-DeliveryAgentConnector).

A connector names its delivery protocol (a plugin found by `delivery-agent list`) and gives
it settings, checked against what the agent declares when the connector is created or
changed; secrets only as `<name>-env=VARIABLE`. MaxConcurrentConnections (5) sessions run
per queue, each delivering up to MaxMessagesPerConnection (20) messages.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from mailgate.admin import AdminError, check_name, find_by_identity
from mailgate.admin.organization import _max_size, _obj, _put, _servers, _spaces
from mailgate.deliver.agents.registry import AgentError, check_settings, find
from mailgate.directory import load_organization
from mailgate.organization import DeliveryAgentConnector, Organization
from mailgate.store import Store

LIMITS = {"max_concurrent_connections": (1, 1000), "max_messages_per_connection": (1, 100000)}


def parse_settings(pairs: list[str]) -> dict[str, str]:
    """`name=value` pairs as given to --setting."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise AdminError(f"--setting takes name=value, not '{pair}'")
        out[name.strip()] = value
    return out


def _checked(protocol: str, settings: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    try:
        info = find(protocol)
        checked = check_settings(info, settings)
        # An agent may check more than its declared settings (the pipe agent's argv).
        extra_check = getattr(info.agent, "check", None)
        if callable(extra_check):
            extra_check(checked)
        return info.name, tuple(sorted(checked.items()))
    except AgentError as exc:
        raise AdminError(str(exc)) from None


def _limits(c: DeliveryAgentConnector, s: dict[str, Any]) -> DeliveryAgentConnector:
    changes: dict[str, Any] = {}
    for key, (low, high) in LIMITS.items():
        if s.get(key) is not None:
            if not low <= s[key] <= high:
                raise AdminError(f"--{key.replace('_', '-')} must be between {low} and {high}")
            changes[key] = s[key]
    if "max_message_size" in s:
        changes["max_message_size"] = _max_size(s["max_message_size"])
    if s.get("enabled") is not None:
        changes["enabled"] = bool(s["enabled"])
    if s.get("comment") is not None:
        changes["comment"] = s["comment"]
    return replace(c, **changes)


def find_agent_connector(org: Organization, identity: str) -> DeliveryAgentConnector:
    return find_by_identity("Delivery Agent connector", identity,
                            org.delivery_agent_connectors)


async def new_agent_connector(store: Store, *, name: str, address_spaces: list[str],
                              delivery_protocol: str, settings: list[str] | None = None,
                              source_transport_servers: list[str] | None = None,
                              **limits: Any) -> DeliveryAgentConnector:
    protocol, checked = _checked(delivery_protocol, parse_settings(settings or []))
    c = DeliveryAgentConnector(
        str(uuid.uuid4()), check_name("connector", name), _spaces(address_spaces), protocol,
        _servers(source_transport_servers) or (store.node,), settings=checked)
    c = _limits(c, limits)
    await _put(store, [_obj(c)])
    return c


async def set_agent_connector(store: Store, identity: str, *, name: str | None = None,
                              address_spaces: list[str] | None = None,
                              delivery_protocol: str | None = None,
                              settings: list[str] | None = None,
                              remove_settings: list[str] | None = None,
                              source_transport_servers: list[str] | None = None,
                              **limits: Any) -> DeliveryAgentConnector:
    org = await load_organization(store, store.node)
    c = find_agent_connector(org, identity)
    merged = dict(c.settings)
    for key in remove_settings or []:
        if merged.pop(key, None) is None:
            raise AdminError(f"the connector {c.name} has no setting '{key}'")
    merged.update(parse_settings(settings or []))
    protocol, checked = _checked(delivery_protocol or c.delivery_protocol, merged)
    new = replace(c, name=check_name("connector", name) if name is not None else c.name,
                  address_spaces=_spaces(address_spaces) if address_spaces else c.address_spaces,
                  delivery_protocol=protocol, settings=checked,
                  source_transport_servers=_servers(source_transport_servers)
                  or c.source_transport_servers)
    new = _limits(new, limits)
    await _put(store, [_obj(new)])
    return new


async def get_agent_connectors(store: Store, identity: str | None = None
                               ) -> list[DeliveryAgentConnector]:
    org = await load_organization(store, store.node)
    if identity:
        return [find_agent_connector(org, identity)]
    return sorted(org.delivery_agent_connectors, key=lambda c: c.name.casefold())


async def remove_agent_connector(store: Store, identity: str) -> DeliveryAgentConnector:
    org = await load_organization(store, store.node)
    c = find_agent_connector(org, identity)
    await store.delete_object(c.guid)
    return c
