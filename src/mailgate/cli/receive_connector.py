"""receive-connector commands (New-/Get-/Set-/Remove-ReceiveConnector)."""

from __future__ import annotations

from typing import Any

import click

from mailgate.admin import AdminError
from mailgate.admin import receive_connectors as admin
from mailgate.cli.main import Context, handled, warn
from mailgate.cli.output import emit
from mailgate.cli.params import BOOL, COUNT, DURATION, SIZE, Given
from mailgate.core.units import format_size, seconds_shown
from mailgate.smtp_connectors import AUTH_MECHANISMS, PERMISSION_GROUPS, ReceiveConnector
from mailgate.store import Store

COLUMNS = ("Name", "Bindings", "RemoteIPRanges", "PermissionGroups", "AuthMechanism",
           "Enabled")


def _row(c: ReceiveConnector) -> dict[str, Any]:
    """Every property with Exchange's name; durations in seconds, sizes in bytes."""
    return {"Identity": c.name, "Guid": c.guid, "Name": c.name, **c.to_data()}


def _table(row: dict[str, Any]) -> dict[str, Any]:
    shown = dict(row)
    for key in ("MaxMessageSize", "MaxHeaderSize"):
        shown[key] = format_size(row[key])
    for key in ("ConnectionTimeout", "ConnectionInactivityTimeout", "TarpitInterval"):
        shown[key] = seconds_shown(row[key])
    return shown


def _show(connectors: list[ReceiveConnector], as_json: bool, single: bool = False) -> None:
    rows = [_row(c) for c in connectors]
    emit(rows if as_json else [_table(r) for r in rows], COLUMNS, as_json, single=single)


def _options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--remote-ip-ranges", multiple=True, metavar="RANGE",
                     help="Clients this connector serves: 192.168.1.10, 10.0.0.0/8, "
                          "10.0.0.1-10.0.0.9, IPv6 too (repeat, or separate with commas; "
                          "default 0.0.0.0/0 and ::/0)."),
        click.option("--permission-groups", multiple=True, metavar="GROUP[,GROUP]",
                     help=f"{', '.join(PERMISSION_GROUPS)} (default AnonymousUsers)."),
        click.option("--auth-mechanism", multiple=True, metavar="MECH[,MECH]",
                     help=f"{', '.join(AUTH_MECHANISMS)} (default Tls); e.g. "
                          f"Tls,BasicAuthRequireTLS."),
        click.option("--banner", metavar="TEXT",
                     help="Text of the 220 greeting ('$null': the default)."),
        click.option("--fqdn", metavar="HOST",
                     help="Name in the greeting and EHLO reply (default: the node's)."),
        click.option("--max-message-size", type=SIZE, help="64KB-2GB (default 36MB)."),
        click.option("--max-recipients-per-message", type=COUNT, help="1-5000 (default 200)."),
        click.option("--max-inbound-connection", type=COUNT,
                     help="Connections at once (default 5000)."),
        click.option("--max-inbound-connection-per-source", type=COUNT,
                     help="Connections at once from one client address, 1-10000 "
                          "(default 20)."),
        click.option("--connection-timeout", type=DURATION,
                     help="Longest connection, 1s-1d (default 10m)."),
        click.option("--connection-inactivity-timeout", type=DURATION,
                     help="Longest idle time, less than --connection-timeout (default 5m)."),
        click.option("--max-hop-count", type=COUNT,
                     help="Received headers before a loop is assumed, 1-500 (default 60)."),
        click.option("--max-header-size", type=SIZE, help="Default 256KB."),
        click.option("--max-logon-failures", type=COUNT,
                     help="Failed AUTH before disconnecting, 0-10 (default 3)."),
        click.option("--tarpit-interval", type=DURATION,
                     help="Delay of error replies, 0s-10m (default 5s)."),
        click.option("--max-protocol-errors", type=COUNT,
                     help="Bad commands before disconnecting (default 5)."),
        click.option("--require-tls", type=BOOL, help="Require STARTTLS before MAIL."),
        click.option("--tls-certificate", metavar="PATH",
                     help="PEM certificate chain for STARTTLS ('$null': generated "
                          "self-signed); give --tls-key with it."),
        click.option("--tls-key", metavar="PATH", help="PEM private key (unencrypted)."),
        click.option("--smtp-utf8-enabled", type=BOOL),
        click.option("--source-transport-servers", multiple=True, metavar="NODE",
                     help="Nodes that run the connector (default: this node)."),
        click.option("--enabled", type=BOOL),
        click.option("--comment"),
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table."),
    ]):
        fn = opt(fn)
    return fn


def _settings(kw: dict[str, Any]) -> dict[str, Any]:
    """The options given, as the admin layer takes them."""
    out: dict[str, Any] = {}
    for key, value in kw.items():
        if value is None or value == ():
            continue
        if key not in admin.SETTINGS:
            raise AdminError(f"unknown option {admin.option(key)}")
        out[key] = value.value if isinstance(value, Given) else (
            list(value) if isinstance(value, tuple) else value)
    return out


@click.group("receive-connector")
def receive_connector() -> None:
    """Receive connectors: who may send mail over SMTP, on which addresses, with which
    rights and limits."""


@receive_connector.command("new")
@click.option("--name", required=True)
@click.option("--bindings", multiple=True, required=True, metavar="IP:PORT",
              help="Local addresses and ports: 0.0.0.0:25, 192.168.1.5:587, [::]:25 "
                   "(repeat, or separate with commas).")
@_options
@click.pass_obj
@handled
def rc_new(obj: Context, name: str, bindings: tuple[str, ...], as_json: bool,
           **kw: Any) -> None:
    settings = _settings(kw)
    c = obj.run(lambda s: admin.new_receive_connector(s, name=name, bindings=list(bindings),
                                                      **settings))
    for w in admin.receive_connector_warnings(c):
        warn(w)
    _show([c], as_json, single=True)


@receive_connector.command("get")
@click.argument("identity", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
@handled
def rc_get(obj: Context, identity: str | None, as_json: bool) -> None:
    _show(obj.run(lambda s: admin.get_receive_connectors(s, identity)), as_json)


@receive_connector.command("set")
@click.argument("identity")
@click.option("--name")
@click.option("--bindings", multiple=True, metavar="IP:PORT", help="Replace the bindings.")
@click.option("--add-bindings", multiple=True, metavar="IP:PORT")
@click.option("--remove-bindings", multiple=True, metavar="IP:PORT")
@click.option("--add-remote-ip-ranges", multiple=True, metavar="RANGE")
@click.option("--remove-remote-ip-ranges", multiple=True, metavar="RANGE")
@_options
@click.pass_obj
@handled
def rc_set(obj: Context, identity: str, name: str | None, add_bindings: tuple[str, ...],
           remove_bindings: tuple[str, ...], add_remote_ip_ranges: tuple[str, ...],
           remove_remote_ip_ranges: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    settings = _settings(kw)
    edits = (add_bindings, remove_bindings, add_remote_ip_ranges, remove_remote_ip_ranges)
    if name is None and not settings and not any(edits):
        raise click.UsageError("give at least one setting to change",
                               ctx=click.get_current_context())

    async def run(s: Store) -> ReceiveConnector:
        return await admin.set_receive_connector(
            s, identity, name=name, add_bindings=list(add_bindings) or None,
            remove_bindings=list(remove_bindings) or None,
            add_remote_ip_ranges=list(add_remote_ip_ranges) or None,
            remove_remote_ip_ranges=list(remove_remote_ip_ranges) or None, **settings)
    c = obj.run(run)
    for w in admin.receive_connector_warnings(c):
        warn(w)
    _show([c], as_json, single=True)


@receive_connector.command("remove")
@click.argument("identity")
@click.pass_obj
@handled
def rc_remove(obj: Context, identity: str) -> None:
    obj.run(lambda s: admin.remove_receive_connector(s, identity))
