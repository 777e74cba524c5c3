"""SQLite statements of the queue engine and the queue/message commands.

Message status (Exchange's, reference §4.3) is derived from a delivery's row: `status`
(Ready, Retry, Active, Suspended) and `pending`, the administrator's action waiting for an
in-flight attempt to end ('Suspend' → PendingSuspend; 'Remove' or 'RemoveWithNdr' →
PendingRemove). Transitions:

- suspend: Ready/Retry → Suspended; Active → PendingSuspend (Suspended if the attempt
  fails back into the queue; gone if it delivers).
- resume: Suspended → Ready (Retry if it had been tried), due now; PendingSuspend → Active.
- remove: Ready/Retry/Suspended → removed at once; Active → PendingRemove, removed (with
  the NDR if asked) by the node when the attempt fails back into the queue.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable

from mailgate.store import (
    DeliveryResult,
    MessageInfo,
    MessageQuery,
    RecipientInfo,
)
from mailgate.store.sqlite_bulk import in_list, select_in_json, select_json

# A queue's identity as the admin commands show it: <node>\<id>, or <node>\Unreachable,
# <node>\Poison for the persistent queues (admin/queues.py QueueView).
QUEUE_IDENTITY_SQL = ("(q.node || '\\' || CASE WHEN q.delivery_type = 'Unreachable' THEN"
                      " 'Unreachable' WHEN q.delivery_type = 'Undefined' AND q.next_hop_domain"
                      " = 'Poison Message' THEN 'Poison' ELSE q.id END)")
STATUS_SQL = ("CASE WHEN d.pending LIKE 'Remove%' THEN 'PendingRemove'"
              " WHEN d.status = 'Active' AND d.pending = 'Suspend' THEN 'PendingSuspend'"
              " ELSE d.status END")


def message_columns(expiration_timeout: float) -> dict[str, str]:
    """SQL expressions of the filterable message properties (see MESSAGE_PROPERTIES)."""
    return {
        "Status": STATUS_SQL,
        "FromAddress": "m.from_address",
        "Subject": "m.subject",
        "Size": "m.size",
        "DateReceived": "m.date_received",
        "ExpirationTime": f"(m.date_received + {float(expiration_timeout)!r})",
        "InternetMessageId": "m.internet_message_id",
        "LastError": "d.last_error",
        "RetryCount": "d.retry_count",
        "MessageSourceName": "m.source",
        "Queue": QUEUE_IDENTITY_SQL,
    }


def _where(q: MessageQuery, node: str) -> tuple[list[str], list[Any], bool]:
    """WHERE terms for a query; the bool says whether the filter still has to be applied
    in Python (it uses a property SQL cannot see, such as Recipients)."""
    where = ["q.node = ?"]
    args: list[Any] = [node]
    for values, column in ((q.queue_ids, "d.queue_id"), (q.message_ids, "d.message_id"),
                           (q.delivery_ids, "d.id")):
        if values is not None:
            where.append(f"{column} IN ({','.join('?' * len(values))})" if values else "0")
            args.extend(values)
    if q.statuses is not None:
        where.append(f"{STATUS_SQL} IN ({','.join('?' * len(q.statuses))})"
                     if q.statuses else "0")
        args.extend(q.statuses)
    if q.received_before is not None:
        where.append("m.date_received <= ?")
        args.append(q.received_before)
    if q.delay_notified is not None:
        where.append("d.delay_notified = ?")
        args.append(int(q.delay_notified))
    in_python = False
    if q.filter is not None:
        translated = q.filter.to_sql(message_columns(q.expiration_timeout))
        if translated is None:
            in_python = True
        else:
            sql, params = translated
            where.append(f"({sql})")
            args.extend(params)
    return where, args, in_python


def message_properties(m: MessageInfo, expiration_timeout: float) -> dict[str, object]:
    """The filterable properties of a message (Get-Message -Filter), by canonical name."""
    return {
        "Status": m.status, "FromAddress": m.from_address, "Subject": m.subject,
        "Size": m.size, "DateReceived": m.date_received,
        "ExpirationTime": m.date_received + expiration_timeout,
        "InternetMessageId": m.internet_message_id, "LastError": m.last_error,
        "RetryCount": m.retry_count, "MessageSourceName": m.source, "Queue": m.queue_identity,
        "Recipients": [r.address for r in m.recipients],
    }


def list_messages(c: sqlite3.Connection, node: str, q: MessageQuery) -> list[MessageInfo]:
    where, args, in_python = _where(q, node)
    limit = "" if in_python or q.limit is None else f" LIMIT {int(q.limit)}"
    rows = select_json(
        c, "SELECT json_array(d.id, d.message_id, d.queue_id, " + STATUS_SQL + ","
           " m.from_address, m.internet_message_id, m.subject, m.size, m.date_received,"
           " d.last_error, d.retry_count, d.next_attempt, m.source, m.ret, m.envid,"
           " m.is_dsn, d.delay_notified, d.pending, " + QUEUE_IDENTITY_SQL + ") AS r"
           " FROM deliveries d JOIN messages m ON m.id = d.message_id"
           " JOIN queues q ON q.id = d.queue_id WHERE " + " AND ".join(where) +
           " ORDER BY d.message_id, d.id" + limit, args)
    out = [MessageInfo(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10],
                       r[11], r[12], r[13], r[14], bool(r[15]), bool(r[16]), r[17],
                       queue_identity=r[18]) for r in rows]
    by_delivery = {m.delivery_id: m for m in out}
    for rid, did, address, status, error, original, orcpt, notify in select_in_json(
            c, "SELECT json_array(id, delivery_id, address, status, last_error, original,"
               " orcpt, notify) AS r FROM recipients WHERE delivery_id IN ({in})"
               " ORDER BY id", list(by_delivery)):
        by_delivery[did].recipients.append(
            RecipientInfo(rid, address, status, error, original, orcpt, notify))
    if in_python:
        out = [m for m in out
               if q.filter.matches(message_properties(m, q.expiration_timeout))]
        if q.limit is not None:
            out = out[:q.limit]
    return out


def _statuses(c: sqlite3.Connection, ids: list[int]) -> dict[int, tuple[str, str | None]]:
    return {r[0]: (r[1], r[2]) for r in select_in_json(
        c, "SELECT json_array(id, status, pending) AS r FROM deliveries WHERE id IN ({in})",
        ids)}


def _shown(status: str, pending: str | None) -> str:
    if pending and pending.startswith("Remove"):
        return "PendingRemove"
    if status == "Active" and pending == "Suspend":
        return "PendingSuspend"
    return status


def suspend(c: sqlite3.Connection, ids: list[int]) -> dict[int, str]:
    """Suspend deliveries (bulk statements: a whole queue's worth at once). Returns each
    one's status afterwards."""
    in_list(c, "UPDATE deliveries SET status = 'Suspended' WHERE status IN ('Ready', 'Retry')"
               " AND id IN ({in})", ids)
    in_list(c, "UPDATE deliveries SET pending = 'Suspend' WHERE status = 'Active' AND"
               " pending IS NULL AND id IN ({in})", ids)
    return {did: _shown(*st) for did, st in _statuses(c, ids).items()}


def resume(c: sqlite3.Connection, ids: list[int], now: float) -> dict[int, str]:
    """Resume suspended deliveries (due now) and cancel pending suspensions. Returns each
    one's status afterwards."""
    in_list(c, "UPDATE deliveries SET status = CASE WHEN retry_count > 0 THEN 'Retry' ELSE"
               " 'Ready' END, next_attempt = ?, pending = NULL WHERE status = 'Suspended' AND"
               " (pending IS NULL OR pending NOT LIKE 'Remove%') AND id IN ({in})",
            ids, (now,))
    in_list(c, "UPDATE deliveries SET pending = NULL WHERE status = 'Active' AND"
               " pending = 'Suspend' AND id IN ({in})", ids)
    return {did: _shown(*st) for did, st in _statuses(c, ids).items()}


def finish_idle(c: sqlite3.Connection, results: list[DeliveryResult],
                pending_if_active: str | None,
                complete_one: Callable[[sqlite3.Connection, DeliveryResult], None]
                ) -> list[int]:
    """Apply `results` to deliveries that are not being delivered right now; an Active
    one gets `pending_if_active` (if given) instead. Returns the ids that were finished."""
    statuses = _statuses(c, [r.delivery_id for r in results])
    done = []
    for res in results:
        current = statuses.get(res.delivery_id)
        if current is None:
            continue  # delivered or removed meanwhile
        if current[0] == "Active":
            if pending_if_active is not None:
                c.execute("UPDATE deliveries SET pending = ? WHERE id = ?",
                          (pending_if_active, res.delivery_id))
            continue
        complete_one(c, res)
        done.append(res.delivery_id)
    return done


def mark_delay_notified(c: sqlite3.Connection, ids: list[int]) -> None:
    in_list(c, "UPDATE deliveries SET delay_notified = 1 WHERE id IN ({in})", ids)


def recover(c: sqlite3.Connection, node: str) -> list[tuple[int, int]]:
    """Deliveries this node had claimed when it stopped go back to their queue, marked
    `recovering` and with one more crash counted. Returns (delivery id, crash count)."""
    rows = [(r[0], r[1]) for r in c.execute(
        "SELECT id, crash_count + 1 FROM deliveries WHERE status = 'Active' AND"
        " queue_id IN (SELECT id FROM queues WHERE node = ?)", (node,))]
    in_list(c, "UPDATE deliveries SET status = CASE WHEN pending = 'Suspend' OR pending"
               " LIKE 'Remove%' THEN 'Suspended' WHEN retry_count > 0 THEN 'Retry'"
               " ELSE 'Ready' END, pending = CASE WHEN pending = 'Suspend' THEN NULL"
               " ELSE pending END, recovering = 1, crash_count = crash_count + 1,"
               " lease_owner = NULL, lease_until = NULL WHERE id IN ({in})",
            [r[0] for r in rows])
    return rows


def move(c: sqlite3.Connection, ids: list[int], queue_id: int, status: str) -> None:
    in_list(c, "UPDATE deliveries SET queue_id = ?, status = ?, pending = NULL,"
               " lease_owner = NULL, lease_until = NULL WHERE id IN ({in})",
            ids, (queue_id, status))
