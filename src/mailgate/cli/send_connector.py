"""send-connector new|get|set|remove (New-/Get-/Set-/Remove-SendConnector)."""

from __future__ import annotations

from typing import Any

import click

from mailgate.admin import send_connectors as admin
from mailgate.cli.main import Context, handled, warn
from mailgate.cli.organization import multi_valued
from mailgate.cli.output import emit
from mailgate.cli.params import BOOL, DURATION, SIZE, Given
from mailgate.core.units import format_size, seconds_shown
from mailgate.smtp_connectors import SMART_HOST_AUTH, TLS_AUTH_LEVELS, TLS_MODES, SendConnector

JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
COLUMNS = ("Name", "AddressSpaces", "SmartHosts", "Port", "Tls", "Enabled", "MaxMessageSize")


def _row(c: SendConnector, as_json: bool) -> dict[str, Any]:
    """Every property with Exchange's name (as the Receive connector's); in a table, sizes
    and durations as an administrator reads them."""
    row: dict[str, Any] = {"Identity": c.name, "Guid": c.guid, "Name": c.name, **c.to_data()}
    if not as_json:
        row["MaxMessageSize"] = format_size(c.max_message_size)
        row["ConnectionInactivityTimeout"] = seconds_shown(c.connection_inactivity_timeout)
    return row


def _show(connectors: list[SendConnector], as_json: bool, single: bool = False) -> None:
    emit([_row(c, as_json) for c in connectors], COLUMNS, as_json, single=single)


def _options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--smart-hosts", multiple=True, metavar="HOST[:PORT]",
                     help="Smart hosts (repeat or comma list): a host name, an IP address "
                          "or [IP literal], optionally :port. Replaces the list."),
        click.option("--dns-routing-enabled", type=BOOL,
                     help="true: deliver through DNS MX records (clears the smart hosts)."),
        click.option("--port", type=int, help="TCP port of the next hops (default 25)."),
        click.option("--tls", type=click.Choice(TLS_MODES, case_sensitive=False),
                     help="STARTTLS: none, opportunistic (default) or required."),
        click.option("--tls-auth-level", type=click.Choice(TLS_AUTH_LEVELS,
                                                           case_sensitive=False),
                     help="With --tls required: EncryptionOnly (default), "
                          "CertificateValidation (a trusted chain) or DomainValidation "
                          "(also the name: --tls-domain, else the MX or smart host name)."),
        click.option("--tls-domain", metavar="DOMAIN",
                     help="DomainValidation: the certificate must name this domain, or a "
                          "host under it with *.domain (empty: the host connected to)."),
        click.option("--tls-ca-file", metavar="PEM",
                     help="Trusted CA certificates for validation (default: the system's; "
                          "empty to reset)."),
        click.option("--smart-host-auth-mechanism",
                     type=click.Choice(SMART_HOST_AUTH, case_sensitive=False),
                     help="AUTH at the smart hosts: None (default), BasicAuth, "
                          "BasicAuthRequireTLS."),
        click.option("--auth-user", help="User name for BasicAuth."),
        click.option("--auth-password-env", metavar="VARIABLE",
                     help="Name of the node's environment variable holding the password "
                          "(the password is never stored)."),
        click.option("--fqdn", help="EHLO name (default: the node's host name)."),
        click.option("--max-message-size", type=SIZE, help="e.g. 35MB, or unlimited."),
        click.option("--smtp-max-messages-per-connection", type=int,
                     help="Messages per SMTP connection, 1-100000 (default 20)."),
        click.option("--connection-inactivity-timeout", type=DURATION,
                     help="Longest wait for a reply, e.g. 10m (default 00:10:00)."),
        click.option("--source-transport-servers", multiple=True, metavar="NODE",
                     help="Nodes that host the connector (repeat; default: this node)."),
        click.option("--enabled", type=BOOL),
        click.option("--comment"),
        JSON,
    ]):
        fn = opt(fn)
    return fn


def _settings(kw: dict[str, Any]) -> dict[str, Any]:
    out = {k: kw[k] for k in admin.SETTINGS if kw.get(k) is not None}
    size = out.pop("max_message_size", None)
    if isinstance(size, Given):
        out["max_message_size"] = size.value
    return out


def _many(values: tuple[str, ...]) -> list[str] | None:
    return list(values) if values else None


@click.group("send-connector")
def send_connector() -> None:
    """Send connectors: SMTP out, through DNS MX records or smart hosts."""


@send_connector.command("new")
@click.option("--name", required=True)
@click.option("--address-spaces", multiple=True, required=True, metavar="SPACE[;COST]",
              help='SMTP address spaces, e.g. "*" or "fabrikam.com;5" (repeat for several).')
@_options
@click.pass_obj
@handled
def sc_new(obj: Context, name: str, address_spaces: tuple[str, ...],
           smart_hosts: tuple[str, ...], dns_routing_enabled: bool | None,
           source_transport_servers: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """A new Send connector (New-SendConnector)."""
    c = obj.run(lambda s: admin.new_send_connector(
        s, name=name, address_spaces=list(address_spaces), smart_hosts=_many(smart_hosts),
        dns_routing_enabled=dns_routing_enabled,
        source_transport_servers=_many(source_transport_servers), **_settings(kw)))
    for w in admin.warnings(c):
        warn(w)
    _show([c], as_json, single=True)


@send_connector.command("set")
@click.argument("identity")
@click.option("--name")
@multi_valued("address-spaces", "SPACE[;COST]", "address spaces")
@_options
@click.pass_obj
@handled
def sc_set(obj: Context, identity: str, name: str | None, address_spaces: tuple[str, ...],
           add_address_spaces: tuple[str, ...], remove_address_spaces: tuple[str, ...],
           smart_hosts: tuple[str, ...], dns_routing_enabled: bool | None,
           source_transport_servers: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """Change a Send connector (Set-SendConnector). Identity: name, GUID or Node\\Name."""
    c = obj.run(lambda s: admin.set_send_connector(
        s, identity, name=name, address_spaces=_many(address_spaces),
        add_address_spaces=_many(add_address_spaces),
        remove_address_spaces=_many(remove_address_spaces), smart_hosts=_many(smart_hosts),
        dns_routing_enabled=dns_routing_enabled,
        source_transport_servers=_many(source_transport_servers), **_settings(kw)))
    for w in admin.warnings(c):
        warn(w)
    _show([c], as_json, single=True)


@send_connector.command("get")
@click.argument("identity", required=False)
@JSON
@click.pass_obj
@handled
def sc_get(obj: Context, identity: str | None, as_json: bool) -> None:
    """Send connectors (Get-SendConnector)."""
    _show(obj.run(lambda s: admin.get_send_connectors(s, identity)), as_json)


@send_connector.command("remove")
@click.argument("identity")
@click.pass_obj
@handled
def sc_remove(obj: Context, identity: str) -> None:
    """Remove a Send connector (Remove-SendConnector); its queued messages are routed
    again."""
    c = obj.run(lambda s: admin.remove_send_connector(s, identity))
    click.echo(f"removed Send connector {c.name}")
