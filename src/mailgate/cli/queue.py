"""queue get|suspend|resume|retry (Get-/Suspend-/Resume-/Retry-Queue)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Awaitable, Callable

import click

from mailgate.admin import queues as admin
from mailgate.admin.messages import MessageService
from mailgate.admin.queues import QueueView
from mailgate.cli.main import Context, handled
from mailgate.cli.output import emit
from mailgate.cli.params import BOOL, RESULT_SIZE
from mailgate.clock import SystemClock, iso
from mailgate.directory import load_organization
from mailgate.settings import host_name
from mailgate.store import Store

COLUMNS = ("Identity", "DeliveryType", "Status", "MessageCount", "NextHopDomain",
           "NextRetryTime", "LastError")
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
FILTER = click.option("--filter", "filter_", metavar="OPATH",
                      help="Exchange filter, e.g. \"Status -eq 'Retry'\".")


def _row(v: QueueView) -> dict[str, Any]:
    fields = {k: val for k, val in asdict(v.queue).items() if k not in ("id", "node")}
    row: dict[str, Any] = {"Identity": v.identity}
    row.update({"".join(p.capitalize() for p in k.split("_")): val for k, val in fields.items()})
    for key in ("FirstRetryTime", "LastRetryTime", "NextRetryTime"):
        row[key] = iso(row[key])
    return row


def _show(views: list[QueueView], as_json: bool) -> None:
    emit([_row(v) for v in views], COLUMNS, as_json)


@click.group("queue")
def queue() -> None:
    """Queues: Submission, one delivery queue per next hop, Unreachable, Poison."""


@queue.command("get")
@click.argument("identity", required=False)
@FILTER
@RESULT_SIZE
@JSON
@click.pass_obj
@handled
def queue_get(obj: Context, identity: str | None, filter_: str | None,
              result_size: int | None, as_json: bool) -> None:
    """Show queues (all, one by IDENTITY, or those matching --filter)."""
    _show(obj.run(lambda s: admin.get_queues(s, identity, filter_, result_size)), as_json)


def _action(name: str, help_text: str,
            act: Callable[[Store, str | None, str | None], Awaitable[list[QueueView]]]
            ) -> None:
    @queue.command(name, help=help_text)
    @click.argument("identity", required=False)
    @FILTER
    @JSON
    @click.pass_obj
    @handled
    def command(obj: Context, identity: str | None, filter_: str | None,
                as_json: bool) -> None:
        _show(obj.run(lambda s: act(s, identity, filter_)), as_json)


_action("suspend", "Suspend a queue (IDENTITY) or the queues matching --filter: nothing "
                   "leaves it until it is resumed.", admin.suspend_queues)
_action("resume", "Resume suspended queues; each message keeps its own status.",
        admin.resume_queues)


@queue.command("retry")
@click.argument("identity", required=False)
@FILTER
@click.option("--resubmit", type=BOOL, default=False,
              help="true sends the queue's messages back to the categorizer (needed for "
                   "Unreachable).")
@JSON
@click.pass_obj
@handled
def queue_retry(obj: Context, identity: str | None, filter_: str | None, resubmit: bool,
                as_json: bool) -> None:
    """Try a queue in Retry now (or resubmit its messages with --resubmit true)."""
    clock = SystemClock()

    async def run(store: Store) -> list[QueueView]:
        views = await admin.retry_queues(store, clock.now(), identity, filter_, resubmit)
        if resubmit:
            org = await load_organization(store, store.node)
            service = MessageService(store, org, clock, host_name(store.node))
            for v in views:
                await service.resubmit_queue(v.queue)
        return [QueueView.of(await store.queue(v.queue.id)) for v in views]
    _show(obj.run(run), as_json)
