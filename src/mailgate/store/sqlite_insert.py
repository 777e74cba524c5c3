"""Storing many new messages in one SQLite job with a handful of `executemany` calls.

A Pickup batch of hundreds of messages costs a few statements per table instead of a dozen
statements per message. Message and delivery ids are allocated here, inside the writer's
transaction (which holds SQLite's write lock), from `sqlite_sequence`, so they stay
AUTOINCREMENT ids that are never reused.

Content is consumed one message at a time and flushed every few MiB, so a large message
never sits whole in memory. A message whose content cannot be read fails alone (its result
is the exception); the others are stored. This is the only place messages are inserted.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Callable, Iterable

from mailgate.ids import unique_hex32
from mailgate.store import NewDelivery, NewMessage, QueueKey, TrackingEvent
from mailgate.store.sqlite_bulk import insert_rows

CHUNK_SIZE = 1024 * 1024
FLUSH_BYTES = 4 * CHUNK_SIZE

Result = int | None | BaseException


_RETURNING = sqlite3.sqlite_version_info >= (3, 35)


def next_ids(c: sqlite3.Connection, table: str, count: int) -> int:
    """Reserve `count` AUTOINCREMENT ids of `table`; returns the first (0 when count is 0)."""
    if not count:
        return 0
    if _RETURNING:
        # One statement, not three: each statement costs the writer a wait for the GIL.
        row = c.execute(f"UPDATE sqlite_sequence SET seq = MAX(seq, (SELECT COALESCE(MAX(id),"
                        f" 0) FROM {table})) + ? WHERE name = ? RETURNING seq",
                        (count, table)).fetchone()
        if row is not None:
            return int(row[0]) - count + 1
    row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    top = row[0] if row is not None else 0
    high = c.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()[0]
    first = max(top, high) + 1
    # Record the reservation, so that ids are never handed out twice.
    if row is None:
        c.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)",
                  (table, first + count - 1))
    else:
        c.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = ?",
                  (first + count - 1, table))
    return first


_json = json.JSONEncoder(ensure_ascii=False).encode  # one encoder, not one per call


def message_id_hash(message_id: str | None) -> int | None:
    """The indexed 64-bit hash of a Message-ID (compared case-insensitively)."""
    if message_id is None:
        return None
    digest = hashlib.blake2b(message_id.strip().casefold().encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def event_row(e: TrackingEvent) -> tuple[object, ...]:
    return (e.timestamp, e.event_id, e.source, e.message_id, message_id_hash(e.message_id),
            e.internal_message_id,
            _json(e.recipients), _json(e.recipient_status), e.sender, e.return_path,
            e.subject, e.total_bytes, e.source_context, e.connector_id, e.server_hostname,
            e.reference, e.related_recipient_address, e.message_info, e.directionality)


EVENT_COLUMNS = ("timestamp", "event_id", "source", "message_id", "message_id_hash",
                 "internal_message_id",
                 "recipients", "recipient_status", "sender", "return_path", "subject",
                 "total_bytes", "source_context", "connector_id", "server_hostname",
                 "reference", "related_recipient_address", "message_info", "directionality")
EVENT_SQL = (f"INSERT INTO tracking_events ({', '.join(EVENT_COLUMNS)})"
             f" VALUES ({','.join('?' * len(EVENT_COLUMNS))})")
MESSAGE_COLUMNS = ("id", "node", "internet_message_id", "from_address", "subject", "size",
                   "date_received", "expiration_time", "source", "source_context", "ret",
                   "envid", "is_dsn")


def stamp(events: Iterable[TrackingEvent], now: float) -> None:
    """Events without a time happened now."""
    for e in events:
        if not e.timestamp:
            e.timestamp = now


def insert_events(c: sqlite3.Connection, events: list[TrackingEvent], now: float) -> None:
    stamp(events, now)
    insert_rows(c, "tracking_events", EVENT_COLUMNS, [event_row(e) for e in events])


class _Content:
    def __init__(self, c: sqlite3.Connection) -> None:
        self.c = c
        self.rows: list[tuple[int, int, bytes]] = []
        self.bytes = 0

    def add(self, mid: int, seq: int, data: bytes) -> None:
        self.rows.append((mid, seq, data))
        self.bytes += len(data)
        if self.bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            insert_rows(self.c, "message_content", ("message_id", "seq", "data"), self.rows,
                        max_bytes=CHUNK_SIZE)
            self.rows = []
            self.bytes = 0

    def discard(self, mid: int) -> None:
        """Forget the content of a message whose content failed half-way."""
        self.rows = [r for r in self.rows if r[0] != mid]
        self.bytes = sum(len(r[2]) for r in self.rows)
        self.c.execute("DELETE FROM message_content WHERE message_id = ?", (mid,))

    def store(self, mid: int, m: NewMessage) -> int:
        """Store `m`'s content under `mid`; returns its size. Re-chunks to CHUNK_SIZE."""
        size = seq = 0
        pending = b""
        for piece in m.content():
            pending = pending + piece if pending else piece
            while len(pending) >= CHUNK_SIZE:
                self.add(mid, seq, pending[:CHUNK_SIZE])
                size += CHUNK_SIZE
                seq += 1
                pending = pending[CHUNK_SIZE:]
        if pending or seq == 0:
            self.add(mid, seq, pending)
            size += len(pending)
        return size


def delivery_rows(mid: int, first_did: int, deliveries: list[NewDelivery], created: float,
                  now: float, queue_id: Callable[[QueueKey], int]
                  ) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The rows of a message's deliveries (ids from `first_did` on) and their recipients."""
    deliveries_out: list[tuple[object, ...]] = []
    recipients_out: list[tuple[object, ...]] = []
    for did, d in enumerate(deliveries, first_did):
        deliveries_out.append((did, mid, queue_id(d.queue), unique_hex32(), created, now))
        recipients_out.extend((mid, did, r.address, r.original, r.orcpt, r.notify, r.mailbox)
                              for r in d.recipients)
    return deliveries_out, recipients_out


DELIVERY_COLUMNS = ("id", "message_id", "queue_id", "token", "created", "next_attempt")
RECIPIENT_COLUMNS = ("message_id", "delivery_id", "address", "original", "orcpt", "notify",
                     "mailbox")


def insert_deliveries(c: sqlite3.Connection, mid: int, deliveries: list[NewDelivery],
                      created: float, now: float, queue_id: Callable[[QueueKey], int]) -> None:
    """Add deliveries (with their recipients) to an existing message."""
    rows, recipients = delivery_rows(mid, next_ids(c, "deliveries", len(deliveries)),
                                     deliveries, created, now, queue_id)
    insert_rows(c, "deliveries", DELIVERY_COLUMNS, rows)
    insert_rows(c, "recipients", RECIPIENT_COLUMNS, recipients)


def insert_messages(c: sqlite3.Connection, node: str, messages: list[NewMessage], now: float,
                    queue_id: Callable[[sqlite3.Connection, QueueKey, float], int]
                    ) -> list[Result]:
    """Store `messages` (and, first, their `related` messages). One result per message: its
    id, None when its source_key was already stored, 0 when it had no deliveries, or the
    exception (from its content) that kept it out."""
    results: list[Result] = [None] * len(messages)
    # Dedupe on source_key: against the store and within this batch.
    keys = [m.source_key for m in messages if m.source_key is not None]
    seen: set[str] = set()
    for start in range(0, len(keys), 500):
        part = keys[start:start + 500]
        marks = ",".join("?" * len(part))
        seen.update(r[0] for r in c.execute(
            f"SELECT source_key FROM pickup_seen WHERE source_key IN ({marks})", part))
    todo: list[int] = []
    related: list[NewMessage] = []
    for i, m in enumerate(messages):
        if m.source_key is not None:
            if m.source_key in seen:
                continue  # result stays None: already stored
            seen.add(m.source_key)
        related.extend(m.related)
        todo.append(i)
    if related:
        # Messages that go with these (their NDRs), in the same transaction.
        for r in insert_messages(c, node, related, now, queue_id):
            if isinstance(r, BaseException):
                raise r
    with_deliveries = [i for i in todo if messages[i].deliveries]
    mid = next_ids(c, "messages", len(with_deliveries))
    n_deliveries = sum(len(messages[i].deliveries) for i in with_deliveries)
    did = next_ids(c, "deliveries", n_deliveries)
    content = _Content(c)
    queues: dict[QueueKey, int] = {}

    def qid(key: QueueKey) -> int:
        if key not in queues:
            queues[key] = queue_id(c, key, now)
        return queues[key]

    seen_rows: list[tuple[str, float]] = []
    message_rows: list[tuple[object, ...]] = []
    all_deliveries: list[tuple[object, ...]] = []
    all_recipients: list[tuple[object, ...]] = []
    event_rows: list[tuple[object, ...]] = []
    for i in todo:
        m = messages[i]
        stamp(m.tracking, now)
        if not m.deliveries:
            results[i] = 0
        else:
            try:
                size = content.store(mid, m)
            except Exception as exc:  # noqa: BLE001 - e.g. the Pickup file became unreadable
                content.discard(mid)
                results[i] = exc
                continue
            received = m.date_received or now
            message_rows.append((mid, node, m.internet_message_id, m.from_address, m.subject,
                                 size, received, m.expiration_time, m.source,
                                 m.source_context, m.ret, m.envid, int(m.is_dsn)))
            rows, recipients = delivery_rows(mid, did, m.deliveries, received, now, qid)
            all_deliveries.extend(rows)
            all_recipients.extend(recipients)
            did += len(rows)
            for e in m.tracking:
                if e.total_bytes is None:
                    e.total_bytes = size
                if e.internal_message_id is None:
                    e.internal_message_id = mid
            results[i] = mid
            mid += 1
        if m.source_key is not None:
            seen_rows.append((m.source_key, now))
        event_rows.extend(event_row(e) for e in m.tracking)
    content.flush()
    insert_rows(c, "pickup_seen", ("source_key", "created"), seen_rows)
    insert_rows(c, "messages", MESSAGE_COLUMNS, message_rows)
    insert_rows(c, "deliveries", DELIVERY_COLUMNS, all_deliveries)
    insert_rows(c, "recipients", RECIPIENT_COLUMNS, all_recipients)
    insert_rows(c, "tracking_events", EVENT_COLUMNS, event_rows)
    return results
