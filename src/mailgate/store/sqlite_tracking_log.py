"""Lines of Exchange's CSV message tracking log, rendered by SQLite (tracking_log.py).

Why in SQL: the node writes every tracking event to the CSV log while it is busiest (three
events per message at well over a thousand messages a second). Decoding each event into
Python objects and formatting it there cost about a sixth of the node's Python time; as
one string per event built by SQLite, reading a batch is a single JSON row of strings.

The text is what `csv.writer` (QUOTE_MINIMAL, CRLF) makes of `TrackingLogWriter.row`: a
field is quoted, with quotes doubled, when it holds a comma, a quote, CR or LF; times are
ISO 8601 UTC with milliseconds (truncated, as `clock.iso`).
"""

from __future__ import annotations

import sqlite3

from mailgate.store.sqlite_bulk import select_json


def _field(expr: str) -> str:
    text = f"CAST({expr} AS TEXT)"
    return (f"CASE WHEN instr({text}, ',') OR instr({text}, '\"') OR instr({text}, char(13))"
            f" OR instr({text}, char(10)) THEN '\"' || replace({text}, '\"', '\"\"') || '\"'"
            f" ELSE coalesce({text}, '') END")


def _joined(column: str) -> str:
    return f"(SELECT group_concat(value, ';') FROM json_each(coalesce({column}, '[]')))"


_TIME = ("strftime('%Y-%m-%dT%H:%M:%S', CAST(timestamp AS INTEGER), 'unixepoch') ||"
         " printf('.%03dZ', min(999, CAST(round((timestamp - CAST(timestamp AS INTEGER))"
         " * 1000000) AS INTEGER) / 1000))")

# Exchange's 30 fields in order (tracking_log.FIELDS); '' for what mailgate does not record.
_COLUMNS = [
    _TIME, "''", "''", "''", _field("server_hostname"),
    _field("source_context"), _field("connector_id"), _field("source"), _field("event_id"),
    _field("internal_message_id"), _field("message_id"), "''",
    _field(_joined("recipients")), _field(_joined("recipient_status")),
    _field("total_bytes"), "json_array_length(coalesce(recipients, '[]'))",
    _field("related_recipient_address"), _field("reference"),
    f"CASE WHEN :subjects THEN {_field('subject')} ELSE '' END",
    _field("sender"), _field("return_path"), _field("message_info"),
    _field("directionality"), "''", "''", "''", "''", "''",
    "id", _field(":version"),
]
_LINE = " || ',' || ".join(f"({c})" for c in _COLUMNS) + " || char(13, 10)"
_SQL = (f"SELECT json_array(id, {_LINE}) AS r FROM tracking_events WHERE id > :after"
        f" ORDER BY id LIMIT :limit")


def log_lines(c: sqlite3.Connection, after_id: int, limit: int, subjects: bool,
              version: str) -> list[tuple[int, str]]:
    """Up to `limit` (event id, CSV line with CRLF) above `after_id`, by increasing id."""
    return [(r[0], r[1]) for r in select_json(
        c, _SQL, {"after": after_id, "limit": limit, "subjects": int(subjects),
                  "version": version})]
