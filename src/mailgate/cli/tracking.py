"""tracking search (Get-MessageTrackingLog): a table by default, every field with --json."""

from __future__ import annotations

import click

from mailgate.admin import tracking as admin
from mailgate.cli.main import Context, handled
from mailgate.cli.output import emit
from mailgate.cli.params import COUNT, Given

COLUMNS = ("Timestamp", "EventId", "Source", "Sender", "Recipients", "MessageSubject")


@click.group("tracking")
def tracking() -> None:
    """The message tracking log: what happened to each message, and when."""


@tracking.command("search")
@click.option("--start", metavar="DATE[TIME]",
              help="Events at or after this time (2026-11-29, \"2026-11-29 10:00\"; UTC "
                   "unless an offset is given).")
@click.option("--end", metavar="DATE[TIME]", help="Events before this time (exclusive).")
@click.option("--message-id", help="The Message-ID header value (angle brackets optional).")
@click.option("--sender", help="The sender address.")
@click.option("--recipients", multiple=True, metavar="ADDRESS",
              help="Events for any of these recipients (repeat, or separate with commas).")
@click.option("--event-id", help="RECEIVE, SUBMIT, DELIVER, FAIL, DSN, DEFER, ...")
@click.option("--source", help="PICKUP, ROUTING, STOREDRIVER, GATEWAY, DSN, QUEUE, ...")
@click.option("--internal-message-id", type=int, help="The store's id of the message.")
@click.option("--message-subject", help="Part of the subject (case-insensitive).")
@click.option("--result-size", type=COUNT, default=None,
              help=f"Most events to show (default {admin.DEFAULT_RESULT_SIZE}), or unlimited.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
@handled
def tracking_search(obj: Context, start: str | None, end: str | None, message_id: str | None,
                    sender: str | None, recipients: tuple[str, ...], event_id: str | None,
                    source: str | None, internal_message_id: int | None,
                    message_subject: str | None, result_size: Given | None,
                    as_json: bool) -> None:
    query = admin.tracking_query(
        start=start, end=end, message_id=message_id, sender=sender, recipients=recipients,
        event_id=event_id, source=source, internal_message_id=internal_message_id,
        message_subject=message_subject,
        result_size=admin.DEFAULT_RESULT_SIZE if result_size is None else result_size.value)
    events = obj.run(lambda s: admin.search_tracking(s, query))
    emit([admin.exchange_record(e) for e in events], COLUMNS, as_json)
