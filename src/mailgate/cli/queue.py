"""queue get (Get-Queue)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from mailgate.admin.queues import QueueView, get_queues
from mailgate.cli.main import Context, handled
from mailgate.cli.output import emit
from mailgate.clock import iso


def _row(v: QueueView) -> dict[str, Any]:
    fields = {k: val for k, val in asdict(v.queue).items() if k not in ("id", "node")}
    row: dict[str, Any] = {"Identity": v.identity}
    row.update({"".join(p.capitalize() for p in k.split("_")): val for k, val in fields.items()})
    for key in ("FirstRetryTime", "LastRetryTime", "NextRetryTime"):
        row[key] = iso(row[key])
    return row


@click.group("queue")
def queue() -> None:
    """Queues: Submission, one delivery queue per next hop, Unreachable, Poison."""


@queue.command("get")
@click.argument("identity", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
@handled
def queue_get(obj: Context, identity: str | None, as_json: bool) -> None:
    views = obj.run(lambda s: get_queues(s, identity))
    emit([_row(v) for v in views],
         ("Identity", "DeliveryType", "Status", "MessageCount", "NextHopDomain", "LastError"),
         as_json)
