"""transport-service get|set (Get-/Set-TransportService)."""

from __future__ import annotations

from typing import Any

import click

from mailgate.admin import transport as admin
from mailgate.cli.main import Context, handled
from mailgate.cli.output import emit_list
from mailgate.cli.params import BOOL, COUNT, DURATION, PATH_OR_NULL, SIZE, Given
from mailgate.core.units import format_size, seconds_shown
from mailgate.organization import TransportService

JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a list.")


def _pascal(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _row(ts: TransportService, obj: Context, as_json: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"Identity": ts.node}
    for name in admin.SETTINGS:
        value = getattr(ts, name)
        if name in admin.PATHS:
            path = ts.resolve(obj.settings.data_dir, value)
            value = str(path) if path is not None else None
        elif name.endswith(("_timeout", "_interval", "_max_age")):
            value = seconds_shown(value)
        elif name.endswith("_size") and not as_json:
            value = format_size(value)
        elif value is None and not as_json:
            value = "unlimited"
        row[_pascal(name)] = value
    return row


@click.group("transport-service")
def transport_service() -> None:
    """This node's transport settings (Pickup, Replay, Drop, retries, limits)."""


@transport_service.command("get")
@JSON
@click.pass_obj
@handled
def ts_get(obj: Context, as_json: bool) -> None:
    ts = obj.run(lambda s: admin.get_transport_service(s))
    emit_list(_row(ts, obj, as_json), as_json)


def _options(fn: Any) -> Any:
    spec: list[tuple[str, Any, str]] = [
        ("pickup_directory_path", PATH_OR_NULL, "Pickup folder; $null disables Pickup."),
        ("replay_directory_path", PATH_OR_NULL, "Replay folder; $null disables Replay."),
        ("replay_directory_trusted", BOOL, "true keeps X-MS-Exchange-Organization-* headers "
                                           "of Replay files (default false)."),
        ("root_drop_directory_path", PATH_OR_NULL, "Root of relative Drop directories."),
        ("pickup_directory_max_messages_per_minute", COUNT, "1-20000, or unlimited."),
        ("pickup_directory_max_header_size", SIZE, "32KB-2GB (default 64KB)."),
        ("pickup_directory_max_recipients_per_message", COUNT, "1-10000 (default 100)."),
        ("message_expiration_timeout", DURATION, "default 2.00:00:00."),
        ("delay_notification_timeout", DURATION, "default 04:00:00."),
        ("transient_failure_retry_interval", DURATION, "default 00:05:00."),
        ("transient_failure_retry_count", COUNT, "0-15 (default 6)."),
        ("outbound_connection_failure_retry_interval", DURATION, "default 00:10:00."),
        ("message_retry_interval", DURATION, "default 00:15:00."),
        ("poison_message_detection_enabled", BOOL, "true|false (default true)."),
        ("poison_threshold", COUNT, "1-10 (default 2)."),
        ("max_message_size", SIZE, "Largest message accepted from Pickup; unlimited by default."),
        ("message_tracking_log_enabled", BOOL, "true|false (default true)."),
        ("message_tracking_log_path", PATH_OR_NULL, "CSV tracking log folder; $null: none."),
        ("message_tracking_log_max_age", DURATION, "default 30.00:00:00; 0 keeps all."),
        ("message_tracking_log_max_directory_size", SIZE, "default 1000MB, or unlimited."),
        ("message_tracking_log_max_file_size", SIZE, "default 10MB."),
        ("message_tracking_log_subject_logging_enabled", BOOL, "true|false (default true)."),
    ]
    for name, kind, helptext in reversed(spec):
        fn = click.option(admin.option_name(name), name, type=kind, help=helptext)(fn)
    return click.option(
        "--external-dns-servers", "external_dns_servers", multiple=True, metavar="IP[:PORT]",
        help="DNS servers for Send connectors (repeat, or a comma list); $null: the "
             "system's resolver.")(fn)


@transport_service.command("set")
@_options
@JSON
@click.pass_obj
@handled
def ts_set(obj: Context, as_json: bool, **options: Any) -> None:
    changes: dict[str, Any] = {}
    servers = options.pop("external_dns_servers")
    if servers:
        clear = [v.strip().lower() in ("$null", "") for v in servers]
        if any(clear) and len(servers) > 1:
            raise click.BadParameter("'$null' clears the list; give it alone",
                                     param_hint="--external-dns-servers")
        changes["external_dns_servers"] = [] if all(clear) else list(servers)
    for name, value in options.items():
        if value is None:
            continue
        value = value.value if isinstance(value, Given) else value
        if value is None and name not in ("pickup_directory_max_messages_per_minute",
                                          "max_message_size", "pickup_directory_path",
                                          "replay_directory_path", "root_drop_directory_path",
                                          "message_tracking_log_path",
                                          "message_tracking_log_max_directory_size"):
            raise click.BadParameter("'unlimited' is not allowed here",
                                     param_hint=admin.option_name(name))
        changes[name] = value
    if not changes:
        raise click.UsageError("nothing to set: give at least one option (see --help)")
    ts = obj.run(lambda s: admin.set_transport_service(s, obj.settings.data_dir, **changes))
    emit_list(_row(ts, obj, as_json), as_json)
