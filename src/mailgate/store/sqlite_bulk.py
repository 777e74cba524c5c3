"""Bulk SQL for the hot paths: many rows per statement.

Python's sqlite3 module releases the GIL around every `sqlite3_step`, i.e. for every row of
`executemany` and every row fetched. When other threads are busy, each of those releases
costs a wait of up to the interpreter's switch interval before the GIL comes back (the
"convoy effect"): measured on the development machine, 3 ms per row with one competing
thread, against 80 µs per row when the same rows go in one multi-row statement. So hot
paths insert with multi-row VALUES, delete and update with IN lists, and read many rows
as one JSON row.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Sequence

MAX_VARIABLES = 32766   # SQLite >= 3.32
ROWS_PER_STATEMENT = 64  # keeps the number of distinct statements (and prepares) small


def insert_rows(c: sqlite3.Connection, table: str, columns: Sequence[str],
                rows: Sequence[Sequence[Any]], max_bytes: int = 0) -> None:
    """INSERT `rows` with as few statements as possible. With `max_bytes`, a statement also
    stops at about that many bytes of bytes/str values (large content rows)."""
    if not rows:
        return
    n = len(columns)
    head = f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
    one = "(" + ",".join("?" * n) + ")"
    per = max(1, min(ROWS_PER_STATEMENT, MAX_VARIABLES // n))
    i = 0
    while i < len(rows):
        j = min(len(rows), i + per)
        if max_bytes:
            size = 0
            k = i
            while k < j:
                size += sum(len(v) for v in rows[k] if isinstance(v, (bytes, str)))
                k += 1
                if size >= max_bytes:
                    break
            j = k
        part = rows[i:j]
        c.execute(head + ",".join([one] * len(part)), [v for row in part for v in row])
        i = j


def in_list(c: sqlite3.Connection, sql: str, values: Sequence[Any],
            extra: Sequence[Any] = ()) -> None:
    """Run `sql` (containing `{in}` where the IN list goes) for `values`, in chunks;
    `extra` parameters come first."""
    per = 500
    for i in range(0, len(values), per):
        part = values[i:i + per]
        c.execute(sql.replace("{in}", ",".join("?" * len(part))), [*extra, *part])


def select_json(c: sqlite3.Connection, sql: str,
                args: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
    """Rows of `SELECT json_array(...) AS r FROM ...` fetched as one JSON row."""
    row = c.execute(f"SELECT json_group_array(json(r)) FROM ({sql})", args).fetchone()
    return json.loads(row[0]) if row and row[0] else []


def select_in_json(c: sqlite3.Connection, sql: str, values: Sequence[Any],
                   extra: Sequence[Any] = ()) -> list[Any]:
    """select_json for a query with an `{in}` list, in chunks."""
    out: list[Any] = []
    per = 500
    for i in range(0, len(values), per):
        part = values[i:i + per]
        out.extend(select_json(c, sql.replace("{in}", ",".join("?" * len(part))),
                               [*extra, *part]))
    return out

