"""delivery-agent list (the delivery protocols installed, as entry points) and
delivery-agent-connector new|get|set|remove."""

from __future__ import annotations

from typing import Any

import click

from mailgate.admin import agents as admin
from mailgate.admin import list_values
from mailgate.cli.main import Context, handled
from mailgate.cli.output import emit, emit_list
from mailgate.cli.params import BOOL, SIZE
from mailgate.deliver.agents.registry import AgentInfo, discover
from mailgate.organization import DeliveryAgentConnector


def _row(a: AgentInfo) -> dict[str, Any]:
    return {
        "Name": a.name, "Version": a.version, "Origin": a.origin,
        "Settings": [s.name + ("*" if s.required else "") + (" (secret)" if s.secret else "")
                     for s in a.settings],
        "RecipientLimit": a.recipient_limit,
        "Status": "broken: " + a.error if a.error else "ok",
    }


@click.group("delivery-agent")
def delivery_agent() -> None:
    """Delivery agents: the protocols Delivery Agent connectors can use."""


@delivery_agent.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@handled
def agent_list(as_json: bool) -> None:
    """Every delivery protocol found (entry-point group mailgate.delivery_agents), with its
    version and the package it comes from. Settings marked * are required."""
    emit([_row(a) for a in discover()], ("Name", "Version", "Origin", "Settings", "Status"),
         as_json)


def _connector_row(c: DeliveryAgentConnector) -> dict[str, Any]:
    row = {"Identity": c.name, "Guid": c.guid}
    row.update(c.to_data())
    return row


def _limit_options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--address-spaces", multiple=True, metavar="[TYPE:]SPACE[;COST]",
                     help="Repeat, or separate with commas."),
        click.option("--delivery-protocol", help="A protocol from `delivery-agent list`."),
        click.option("--setting", "settings", multiple=True, metavar="NAME=VALUE",
                     help="An agent setting (repeat); secrets as NAME-env=VARIABLE."),
        click.option("--source-transport-servers", multiple=True, metavar="NODE"),
        click.option("--max-concurrent-connections", type=int, help="1-1000 (default 5)."),
        click.option("--max-messages-per-connection", type=int,
                     help="1-100000 (default 20)."),
        click.option("--max-message-size", type=SIZE, help="e.g. 10MB, or unlimited."),
        click.option("--enabled", type=BOOL),
        click.option("--comment"),
        click.option("--json", "as_json", is_flag=True, help="Print JSON."),
    ]):
        fn = opt(fn)
    return fn


def _limits(kw: dict[str, Any]) -> dict[str, Any]:
    out = {k: kw[k] for k in ("max_concurrent_connections", "max_messages_per_connection",
                              "enabled", "comment") if kw.get(k) is not None}
    if kw.get("max_message_size") is not None:
        out["max_message_size"] = kw["max_message_size"].value
    return out


@click.group("delivery-agent-connector")
def delivery_agent_connector() -> None:
    """Delivery Agent connectors: address spaces served by a delivery agent."""


@delivery_agent_connector.command("new")
@click.option("--name", required=True)
@_limit_options
@click.pass_obj
@handled
def dac_new(obj: Context, name: str, address_spaces: tuple[str, ...],
            delivery_protocol: str | None, settings: tuple[str, ...],
            source_transport_servers: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    if not address_spaces or not delivery_protocol:
        raise click.UsageError("--address-spaces and --delivery-protocol are required")
    c = obj.run(lambda s: admin.new_agent_connector(
        s, name=name, address_spaces=list_values(address_spaces),
        delivery_protocol=delivery_protocol, settings=list(settings),
        source_transport_servers=list(source_transport_servers) or None, **_limits(kw)))
    emit_list(_connector_row(c), as_json)


@delivery_agent_connector.command("set")
@click.argument("identity")
@click.option("--name")
@click.option("--remove-setting", "remove_settings", multiple=True, metavar="NAME")
@_limit_options
@click.pass_obj
@handled
def dac_set(obj: Context, identity: str, name: str | None, remove_settings: tuple[str, ...],
            address_spaces: tuple[str, ...], delivery_protocol: str | None,
            settings: tuple[str, ...], source_transport_servers: tuple[str, ...],
            as_json: bool, **kw: Any) -> None:
    c = obj.run(lambda s: admin.set_agent_connector(
        s, identity, name=name, address_spaces=list_values(address_spaces) or None,
        delivery_protocol=delivery_protocol, settings=list(settings),
        remove_settings=list(remove_settings),
        source_transport_servers=list(source_transport_servers) or None, **_limits(kw)))
    emit_list(_connector_row(c), as_json)


@delivery_agent_connector.command("get")
@click.argument("identity", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
@handled
def dac_get(obj: Context, identity: str | None, as_json: bool) -> None:
    found = obj.run(lambda s: admin.get_agent_connectors(s, identity))
    emit([_connector_row(c) for c in found],
         ("Identity", "DeliveryProtocol", "AddressSpaces", "MaxConcurrentConnections",
          "Enabled"), as_json)


@delivery_agent_connector.command("remove")
@click.argument("identity")
@click.pass_obj
@handled
def dac_remove(obj: Context, identity: str) -> None:
    c = obj.run(lambda s: admin.remove_agent_connector(s, identity))
    click.echo(f"removed Delivery Agent connector {c.name}")
