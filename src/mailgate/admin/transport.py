"""Per-node transport settings (Get-/Set-TransportService), with Exchange's ranges."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from mailgate.admin import AdminError, list_values, within
from mailgate.core.hosts import HostError, parse_dns_server, show_dns_server
from mailgate.core.units import format_size, seconds_shown
from mailgate.directory import load_organization
from mailgate.organization import TransportService
from mailgate.store import DirectoryObject, Store

_D = 86400.0
# name -> (low, high); None bounds are open. Durations in seconds, sizes in bytes.
RANGES: dict[str, tuple[float, float]] = {
    "pickup_directory_max_messages_per_minute": (1, 20000),
    "pickup_directory_max_header_size": (32768, 2147483647),
    "pickup_directory_max_recipients_per_message": (1, 10000),
    "message_expiration_timeout": (5, 90 * _D),
    "delay_notification_timeout": (1, 30 * _D),
    "transient_failure_retry_interval": (1, 12 * 3600),
    "transient_failure_retry_count": (0, 15),
    "outbound_connection_failure_retry_interval": (1, 20 * _D),
    "message_retry_interval": (1, _D),
    "poison_threshold": (1, 10),
    "max_message_size": (65536, 2147483647),
    "message_tracking_log_max_age": (0, 24855 * _D),
    "message_tracking_log_max_directory_size": (1, 2**63 - 1),
    "message_tracking_log_max_file_size": (1, 4 * 1024**3),
}
PATHS = ("pickup_directory_path", "replay_directory_path", "root_drop_directory_path",
         "message_tracking_log_path")
SETTINGS = tuple(f.name for f in fields(TransportService) if f.name != "node")


def option_name(setting: str) -> str:
    return "--" + setting.replace("_", "-")


async def get_transport_service(store: Store, node: str | None = None) -> TransportService:
    return (await load_organization(store, node or store.node)).transport


async def set_transport_service(store: Store, data_dir: Path, node: str | None = None,
                                **changes: Any) -> TransportService:
    node = node or store.node
    current = await get_transport_service(store, node)
    unknown = set(changes) - set(SETTINGS)
    if unknown:
        raise AdminError(f"unknown transport setting(s): {', '.join(sorted(unknown))}")
    for name, value in changes.items():
        if value is None or name not in RANGES:
            continue
        low, high = RANGES[name]
        within(option_name(name), value, low, high, lambda v: _show(name, v))
    for name in PATHS:
        if name in changes and changes[name] is not None:
            text = str(changes[name]).strip()
            if not text or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
                raise AdminError(f"{option_name(name)} must be a path without control "
                                 f"characters")
            changes[name] = text
    if "external_dns_servers" in changes:
        changes["external_dns_servers"] = dns_servers(changes["external_dns_servers"])
    if changes.get("root_drop_directory_path", "") is None:
        raise AdminError("--root-drop-directory-path cannot be disabled; give a path")
    new = current.with_changes(**changes)
    pickup = new.resolve(data_dir, new.pickup_directory_path)
    replay = new.resolve(data_dir, new.replay_directory_path)
    if pickup is not None and replay is not None and pickup.resolve() == replay.resolve():
        raise AdminError("the Pickup and Replay directories must be different folders")
    # Exchange creates a Pickup/Replay folder when its path is changed (reference §2.9).
    for name, path in (("pickup_directory_path", pickup), ("replay_directory_path", replay)):
        if name in changes and path is not None:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise AdminError(f"cannot create {path}: {exc.strerror or exc}") from None
    await store.put_object(DirectoryObject(f"transport-service:{node.casefold()}",
                                           TransportService.KIND, node, new.to_data()),
                           [f"transport-service:{node.casefold()}"])
    return new


def _show(name: str, value: float) -> str:
    if name.endswith(("_timeout", "_interval")):
        return seconds_shown(value)
    if name.endswith("_size"):
        return format_size(int(value))
    return str(int(value))


def dns_servers(values: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """ExternalDnsServers: `ip` or `ip:port` each (comma lists allowed), canonical and
    without repeats; None or nothing: the system's resolver."""
    out: list[str] = []
    for part in list_values(values or ()):
        try:
            out.append(show_dns_server(parse_dns_server(part)))
        except HostError as exc:
            raise AdminError(f"--external-dns-servers: {exc}") from None
    return tuple(dict.fromkeys(out))
