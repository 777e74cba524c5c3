"""Searching the message tracking log (Get-MessageTrackingLog, reference §6.1).

Contract: `tracking_query(...)` turns what an administrator typed into a `TrackingQuery`
or raises `AdminError` with one line (unparseable time, start not before end, unknown
event id, result size below 1). `search_tracking(store, query)` returns the matching
events oldest first, at most `result_size` of them (None = unlimited). `exchange_record`
presents one event under Exchange's property names, the same for the CLI's JSON and any
later API.

Matching follows Get-MessageTrackingLog: `end` is exclusive; sender, recipients, event
id, source and Message-ID compare case-insensitively and exactly; an event matches
`recipients` when any of its recipients is one of them; the subject is a substring match.
Times without an offset are UTC.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Iterable

from mailgate import tracking
from mailgate.admin import AdminError, list_values
from mailgate.clock import iso
from mailgate.store import Store, TrackingEvent

DEFAULT_RESULT_SIZE = 1000  # Exchange's -ResultSize default
# What "unlimited" asks of the store: a LIMIT no table reaches (valid for any SQL dialect).
_UNLIMITED = 2**62

# Forms Exchange users type besides ISO 8601 (which datetime.fromisoformat reads): the
# en-US forms of Exchange's own examples, month first ("-Start 03/13/2018 09:00:00").
_US_FORMATS = ("%m/%d/%Y", "%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S", "%m/%d/%Y %I:%M %p",
               "%m/%d/%Y %I:%M:%S %p")


@dataclass(frozen=True)
class TrackingQuery:
    """The criteria of one search; None (or empty) means "any"."""

    start: float | None = None          # epoch seconds, inclusive
    end: float | None = None            # epoch seconds, exclusive
    message_id: str | None = None
    sender: str | None = None
    recipients: tuple[str, ...] = ()
    event_id: str | None = None
    source: str | None = None
    internal_message_id: int | None = None
    message_subject: str | None = None
    result_size: int | None = DEFAULT_RESULT_SIZE


def parse_time(option: str, text: str) -> float:
    """Epoch seconds for an ISO 8601 date or date-time (naive = UTC) or an en-US
    `MM/DD/YYYY [hh:mm[:ss] [AM|PM]]`; AdminError naming `option` otherwise."""
    value = text.strip()
    when: dt.datetime | None = None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        for form in _US_FORMATS:
            try:
                when = dt.datetime.strptime(value, form)
                break
            except ValueError:
                continue
    if when is None:
        raise AdminError(f"{option}: {text!r} is not a date or time (use 2026-11-29, "
                         f"\"2026-11-29 10:00\" or 2026-11-29T10:00:00Z; UTC unless an "
                         f"offset is given)")
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _event_id(text: str) -> str:
    wanted = text.strip().upper()
    if wanted not in tracking.EVENT_IDS:
        raise AdminError(f"--event-id: unknown event id {text!r} (known: "
                         f"{', '.join(sorted(tracking.EVENT_IDS))})")
    return wanted


def _message_id(text: str) -> str:
    # Tracking keeps the Message-ID header as written, angle brackets included; people
    # often paste it without them.
    value = text.strip()
    return value if value.startswith("<") else f"<{value}>"


def _recipients(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(list_values(values))


def tracking_query(*, start: str | None = None, end: str | None = None,
                   message_id: str | None = None, sender: str | None = None,
                   recipients: Iterable[str] = (), event_id: str | None = None,
                   source: str | None = None, internal_message_id: int | None = None,
                   message_subject: str | None = None,
                   result_size: int | None = DEFAULT_RESULT_SIZE) -> TrackingQuery:
    """Validate an administrator's search criteria (strings as typed)."""
    start_at = parse_time("--start", start) if start is not None else None
    end_at = parse_time("--end", end) if end is not None else None
    if start_at is not None and end_at is not None and start_at >= end_at:
        raise AdminError(f"--start ({iso(start_at)}) must be before --end ({iso(end_at)}); "
                         f"--end is exclusive")
    if result_size is not None and result_size < 1:
        raise AdminError(f"--result-size must be at least 1 or 'unlimited' "
                         f"(got {result_size})")
    return TrackingQuery(
        start=start_at, end=end_at,
        message_id=_message_id(message_id) if message_id else None,
        sender=sender.strip() if sender else None,
        recipients=_recipients(recipients),
        event_id=_event_id(event_id) if event_id is not None else None,
        source=source.strip().upper() if source else None,
        internal_message_id=internal_message_id,
        message_subject=message_subject if message_subject else None,
        result_size=result_size)


async def search_tracking(store: Store, query: TrackingQuery) -> list[TrackingEvent]:
    """The events matching `query`, oldest first, at most `query.result_size`."""
    return await store.search_tracking(
        start=query.start, end=query.end, message_id=query.message_id,
        sender=query.sender, recipients=list(query.recipients), event_id=query.event_id,
        source=query.source, internal_message_id=query.internal_message_id,
        subject=query.message_subject,
        result_size=_UNLIMITED if query.result_size is None else query.result_size)


def exchange_record(e: TrackingEvent) -> dict[str, Any]:
    """One event as Get-MessageTrackingLog shows it: Exchange's property names, in the
    log's field order; Timestamp is ISO 8601 UTC."""
    return {
        "Timestamp": iso(e.timestamp),
        # Not recorded by mailgate's receivers yet (no SMTP receive); present so that
        # scripts written for Exchange find every property.
        "ClientIp": getattr(e, "client_ip", None),
        "ClientHostname": getattr(e, "client_hostname", None),
        "ServerIp": getattr(e, "server_ip", None),
        "ServerHostname": e.server_hostname,
        "SourceContext": e.source_context,
        "ConnectorId": e.connector_id,
        "Source": e.source,
        "EventId": e.event_id,
        "InternalMessageId": e.internal_message_id,
        "MessageId": e.message_id,
        "Recipients": list(e.recipients),
        "RecipientStatus": list(e.recipient_status),
        "TotalBytes": e.total_bytes,
        "RecipientCount": len(e.recipients),
        "RelatedRecipientAddress": e.related_recipient_address,
        "Reference": e.reference,
        "MessageSubject": e.subject,
        "Sender": e.sender,
        "ReturnPath": e.return_path,
        "MessageInfo": e.message_info,
        "Directionality": e.directionality,
    }
