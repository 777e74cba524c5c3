"""delivery-agent list: the delivery protocols installed (entry points)."""

from __future__ import annotations

from typing import Any

import click

from mailgate.cli.main import handled
from mailgate.cli.output import emit
from mailgate.deliver.agents.registry import AgentInfo, discover


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
