"""message get|suspend|resume|remove|export|redirect (the *-Message cmdlets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable

import click

from mailgate.admin.messages import MessageService, MessageView
from mailgate.cli.main import Context, handled
from mailgate.cli.output import emit
from mailgate.cli.params import BOOL, RESULT_SIZE
from mailgate.clock import SystemClock, iso
from mailgate.directory import load_organization
from mailgate.settings import host_name
from mailgate.store import Store

COLUMNS = ("Identity", "FromAddress", "Status", "Size", "RetryCount", "Subject", "LastError")
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
FILTER = click.option("--filter", "filter_", metavar="OPATH",
                      help="Exchange filter, e.g. \"FromAddress -like '*@contoso.test'\".")


def _row(v: MessageView) -> dict[str, Any]:
    m = v.message
    return {
        "Identity": v.identity, "Queue": v.queue, "Status": m.status,
        "FromAddress": m.from_address or "<>", "Subject": m.subject, "Size": m.size,
        "DateReceived": iso(m.date_received), "ExpirationTime": iso(v.expiration_time),
        "InternetMessageId": m.internet_message_id, "LastError": m.last_error,
        "RetryCount": m.retry_count, "MessageSourceName": m.source,
        "NextRetryTime": iso(m.next_attempt) if m.status == "Retry" else None,
        "Recipients": [{"Address": r.address, "Status": r.status, "LastError": r.last_error}
                       for r in m.recipients],
    }


def _show(views: list[MessageView], as_json: bool) -> None:
    emit([_row(v) for v in views], COLUMNS, as_json)


def _done(views: list[MessageView], as_json: bool, bulk: bool, verb: str) -> None:
    """After an action: the message's row; after a bulk action (--filter) a count line,
    since a table of thousands helps nobody (--json still lists them all)."""
    if bulk and not as_json:
        click.echo(f"{len(views)} message(s) {verb}")
    else:
        _show(views, as_json)


def _service(obj: Context, act: Callable[[MessageService], Awaitable[Any]]) -> Any:
    async def run(store: Store) -> Any:
        org = await load_organization(store, store.node)
        return await act(MessageService(store, org, SystemClock(), host_name(store.node)))
    return obj.run(run)


@click.group("message")
def message() -> None:
    """Messages in queues: view, suspend, resume, remove, export, redirect."""


@message.command("get")
@click.argument("identity", required=False)
@click.option("--queue", "queue", metavar="QUEUE", help="Only the messages of this queue.")
@FILTER
@RESULT_SIZE
@JSON
@click.pass_obj
@handled
def message_get(obj: Context, identity: str | None, queue: str | None, filter_: str | None,
                result_size: int | None, as_json: bool) -> None:
    """Show queued messages (all, one by IDENTITY, one queue's, or those matching --filter),
    with each recipient's status in --json."""
    _show(_service(obj, lambda svc: svc.get(identity, queue, filter_, result_size)), as_json)


def _action(name: str, verb: str, help_text: str,
            act: Callable[[MessageService, str | None, str | None], Awaitable[Any]]) -> None:
    @message.command(name, help=help_text)
    @click.argument("identity", required=False)
    @FILTER
    @JSON
    @click.pass_obj
    @handled
    def command(obj: Context, identity: str | None, filter_: str | None,
                as_json: bool) -> None:
        _done(_service(obj, lambda svc: act(svc, identity, filter_)), as_json,
              bool(filter_), verb)


_action("suspend", "suspended", "Suspend a message (IDENTITY) or the messages matching "
                                "--filter; one being delivered becomes PendingSuspend.",
        lambda svc, i, f: svc.suspend(i, f))
_action("resume", "resumed", "Resume suspended messages; a message in the Poison queue is "
                             "resubmitted.",
        lambda svc, i, f: svc.resume(i, f))
_action("redirect", "redirected", "Send messages back to the categorizer, to be routed with "
                                  "the current configuration (one node: after a connector "
                                  "change).",
        lambda svc, i, f: svc.redirect(i, f))


@message.command("remove")
@click.argument("identity", required=False)
@FILTER
@click.option("--with-ndr", type=BOOL, default=True, show_default=True,
              help="true sends the sender an NDR.")
@JSON
@click.pass_obj
@handled
def message_remove(obj: Context, identity: str | None, filter_: str | None, with_ndr: bool,
                   as_json: bool) -> None:
    """Remove a message (IDENTITY) or the messages matching --filter; one being delivered
    becomes PendingRemove and goes when its attempt ends."""
    _done(_service(obj, lambda svc: svc.remove(identity, filter_, with_ndr)), as_json,
          bool(filter_), "removed")


@message.command("export")
@click.argument("identity")
@click.option("--path", "path", required=True, type=click.Path(path_type=Path),
              help="Folder to write the .eml file to.")
@click.pass_obj
@handled
def message_export(obj: Context, identity: str, path: Path) -> None:
    """Write a suspended message in the Replay format (X-Sender/X-Receiver, then the
    message as queued); put the file in a Replay directory to send it again."""
    written = _service(obj, lambda svc: svc.export(identity, path))
    click.echo(str(written))
