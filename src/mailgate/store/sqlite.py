"""The embedded SQLite store: WAL, `synchronous=FULL`, and group commit.

All writes go through one writer thread. It takes every job that is waiting, runs each in
its own SAVEPOINT (so one failing job does not undo the others), takes in the jobs that
arrive meanwhile for a few milliseconds, and commits them together: a burst of messages
pays for one fsync instead of one each, and every caller's future is resolved only after
that commit has returned, i.e. once its data is durable.

Reads run on a small pool of threads with their own connections; WAL lets them read while
the writer writes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from mailgate.clock import Clock, SystemClock
from mailgate.store import (
    ClaimedDelivery,
    ClaimedRecipient,
    DeliveryResult,
    DirectoryObject,
    DuplicateKeyError,
    MessageInfo,
    MessageQuery,
    NewDelivery,
    NewMessage,
    NotFoundError,
    POISON_QUEUE,
    QueueInfo,
    QueueKey,
    QueueState,
    StoreError,
    TrackingEvent,
)
from mailgate.store import sqlite_queues, sqlite_tracking_log
from mailgate.store.sqlite_bulk import in_list, select_in_json, select_json
from mailgate.store.sqlite_coalesce import SubmissionCoalescer
from mailgate.store.sqlite_insert import (
    CHUNK_SIZE,
    insert_deliveries,
    insert_events,
    insert_messages,
    message_id_hash,
)
from mailgate.store.sqlite_schema import MIGRATIONS

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_GROUP = 512
# How long a group keeps taking jobs that arrive while it runs, before it commits.
LATE_JOIN = 0.006

# Message bytes a claim carries at most (see _claimed).
INLINE_CONTENT = 4 * 1024 * 1024
_Job = tuple[Callable[[sqlite3.Connection], Any], cf.Future[Any]]
_PENDING = ("Ready", "Retry")


def _statements(script: str) -> Iterator[str]:
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf
            buf = ""
    if buf.strip():
        yield buf


class _Writer(threading.Thread):
    """Runs write jobs in grouped transactions (group commit)."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        super().__init__(name="mailgate-store-writer", daemon=True)
        self._connect = connect
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._stopping = False
        self.commits = 0
        self._closing = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> cf.Future[T]:
        fut: cf.Future[T] = cf.Future()
        with self._closing:
            if self._closed:
                fut.set_exception(StoreError("the store is closed"))
            else:
                self._jobs.put((fn, fut))
        return fut

    def stop(self) -> None:
        """Finish the jobs already submitted, then refuse new ones (they fail at once)."""
        with self._closing:
            self._closed = True
            self._jobs.put(None)
        self.join()

    def run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while not self._stopping:
                first = self._jobs.get()
                if first is None:
                    return
                batch = [first, *self._waiting(MAX_GROUP - 1)]
                if conn is None:
                    try:
                        conn = self._connect()
                    except StoreError as exc:
                        for _, fut in batch:
                            _fail(fut, exc)
                        continue
                self._run_group(conn, batch)
        finally:
            if conn is not None:
                conn.close()

    def _waiting(self, limit: int) -> list[_Job]:
        """Up to `limit` jobs already queued, without waiting; notes a stop request."""
        out: list[_Job] = []
        while len(out) < limit and not self._stopping:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._stopping = True
            else:
                out.append(item)
        return out

    def _run_group(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        outcomes: list[tuple[cf.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            err = StoreError(f"cannot start a transaction: {exc}")
            for _, fut in batch:
                _fail(fut, err)
            return
        # A lone job needs no savepoint: if it fails, the whole transaction is rolled back.
        # (Each statement costs the writer a wait for the GIL, so the two saved count.)
        alone = len(batch) == 1
        late_until = time.monotonic() + LATE_JOIN
        while batch:
            for fn, fut in batch:
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    if not alone:
                        conn.execute("SAVEPOINT job")
                    result = fn(conn)
                    if not alone:
                        conn.execute("RELEASE job")
                    outcomes.append((fut, result, None))
                except BaseException as exc:  # noqa: BLE001 - every failure goes to its caller
                    failure = StoreError(str(exc)) if isinstance(exc, sqlite3.Error) else exc
                    if alone:
                        _rollback_quietly(conn)
                        _fail(fut, failure)
                        return
                    try:
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                    except sqlite3.Error:
                        pass
                    outcomes.append((fut, None, failure))
            # Jobs that came while this group ran join it, for a few milliseconds: otherwise
            # they would wait for this commit and then for their own.
            alone = False
            room = MAX_GROUP - len(outcomes)
            batch = self._waiting(room) if room > 0 and time.monotonic() < late_until else []
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # Nothing of this group is durable: every caller must treat it as not stored.
            _rollback_quietly(conn)
            err = StoreError(f"commit failed: {exc}")
            for fut, _, _ in outcomes:
                _fail(fut, err)
            return
        self.commits += 1
        for fut, result, error in outcomes:
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)


class _Checkpointer(threading.Thread):
    """Copies the WAL back into the database in the background (PASSIVE: never blocks the
    writer or readers), and truncates a WAL that has grown past 64 MiB when it can."""

    INTERVAL = 0.5
    TRUNCATE_PAGES = 16384

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        super().__init__(name="mailgate-store-checkpoint", daemon=True)
        self._connect = connect
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()

    def run(self) -> None:
        try:
            conn = self._connect()
        except StoreError as exc:
            log.error("checkpoints disabled: %s", exc)
            return
        try:
            while not self._stop_event.wait(self.INTERVAL):
                try:
                    _, log_pages, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if log_pages > self.TRUNCATE_PAGES:
                        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as exc:
                    log.warning("WAL checkpoint failed: %s", exc)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
        finally:
            conn.close()


def _contains(needle: str) -> str:
    """A LIKE pattern (ESCAPE '\\') matching `needle` anywhere, taken literally."""
    for ch in "\\%_":
        needle = needle.replace(ch, "\\" + ch)
    return f"%{needle}%"


def _settle_pending(c: sqlite3.Connection, ids: list[int]) -> None:
    """An attempt failed back into the queue: a pending suspend or remove now applies
    (a removal is finished, with its NDR, by the node's queue maintenance)."""
    in_list(c, "UPDATE deliveries SET status = 'Suspended', pending = CASE WHEN pending ="
               " 'Suspend' THEN NULL ELSE pending END WHERE pending IS NOT NULL AND"
               " status != 'Active' AND id IN ({in})", ids)


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _fail(fut: cf.Future[Any], exc: BaseException) -> None:
    """Fail a job's future unless its caller already gave up on it."""
    if not fut.done():
        try:
            fut.set_exception(exc)
        except cf.InvalidStateError:
            pass



def _claimed(c: sqlite3.Connection, rows: list[list[Any]]) -> list[ClaimedDelivery]:
    """Claimed deliveries with their message, open recipients and (when it is small) the
    message bytes, from rows (queue_id, id, message_id, token, created, retry_count,
    recovering, crash_count)."""
    ids = [r[1] for r in rows]
    mids = sorted({r[2] for r in rows})
    msgs = {m[0]: m for m in select_in_json(
        c, "SELECT json_array(id, from_address, internet_message_id, subject, size,"
           " date_received, ret, envid, is_dsn) AS r FROM messages WHERE id IN ({in})",
        mids)}
    rcpts: dict[int, list[ClaimedRecipient]] = {i: [] for i in ids}
    for rid, did, address, original, orcpt, notify, mailbox in select_in_json(
            c, "SELECT json_array(id, delivery_id, address, original, orcpt, notify,"
               " mailbox) AS r FROM recipients WHERE status IN ('Ready', 'Retry') AND"
               " delivery_id IN ({in})", ids):
        rcpts[did].append(ClaimedRecipient(rid, address, original, orcpt, notify, mailbox))
    for lst in rcpts.values():
        lst.sort(key=lambda r: r.id)
    # Small messages (one chunk) come with the claim, up to INLINE_CONTENT bytes in all: no
    # read per message later. The others are streamed from the store when delivered (a
    # claim of 100 one-megabyte messages took 650 MB, as hex in one JSON row, before).
    small: list[int] = []
    budget = INLINE_CONTENT
    for m in mids:
        if msgs[m][4] <= min(CHUNK_SIZE, budget):
            small.append(m)
            budget -= msgs[m][4]
    bodies = {mid: bytes.fromhex(data) for mid, data in select_in_json(
        c, "SELECT json_array(message_id, hex(data)) AS r FROM message_content"
           " WHERE seq = 0 AND message_id IN ({in})", small)} if small else {}
    out = []
    for qid, did, mid, token, created, retry_count, recovering, crashes in sorted(
            rows, key=lambda r: r[1]):
        _, sender, imid, subject, size, received, ret, envid, is_dsn = msgs[mid]
        out.append(ClaimedDelivery(
            id=did, message_id=mid, queue_id=qid, token=token, created=created,
            retry_count=retry_count, recovering=bool(recovering), from_address=sender,
            internet_message_id=imid, subject=subject, size=size,
            date_received=received, ret=ret, envid=envid, is_dsn=bool(is_dsn),
            recipients=rcpts[did], content=bodies.get(mid), crash_count=crashes))
    return out


def _row_to_event(row: sqlite3.Row) -> TrackingEvent:
    return TrackingEvent(
        event_id=row["event_id"], source=row["source"], timestamp=row["timestamp"],
        message_id=row["message_id"], internal_message_id=row["internal_message_id"],
        recipients=json.loads(row["recipients"] or "[]"),
        recipient_status=json.loads(row["recipient_status"] or "[]"),
        sender=row["sender"], return_path=row["return_path"], subject=row["subject"],
        total_bytes=row["total_bytes"], source_context=row["source_context"],
        connector_id=row["connector_id"], server_hostname=row["server_hostname"],
        reference=row["reference"], related_recipient_address=row["related_recipient_address"],
        message_info=row["message_info"], directionality=row["directionality"],
    )


class SqliteStore:
    """The `Store` port on one SQLite database file."""

    def __init__(self, path: Path, node: str, clock: Clock | None = None) -> None:
        self.path = Path(path)
        self.node = node
        self.clock = clock or SystemClock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._migrate()
        self._readers = cf.ThreadPoolExecutor(4, thread_name_prefix="mailgate-store-read")
        self._writer = _Writer(self._connect_writer)
        self._submissions = SubmissionCoalescer(self._writer.submit, self._store)
        self._writer.start()
        self._checkpointer = _Checkpointer(self._connect)
        self._checkpointer.start()

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=30.0)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when COMMIT returns, also across power loss.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            return conn
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc

    def _connect_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        # Checkpoints run on their own thread (_Checkpointer), not inside a commit that
        # callers are waiting for.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._conns_lock:
                self._all_conns.append(conn)
        return conn

    def _migrate(self) -> None:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                conn.execute("ROLLBACK")
                raise StoreError(
                    f"the store {self.path} has schema version {version}, newer than this "
                    f"mailgate knows ({len(MIGRATIONS)}); upgrade mailgate")
            for number in range(version + 1, len(MIGRATIONS) + 1):
                for stmt in _statements(MIGRATIONS[number - 1]):
                    conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback_quietly(conn)
            raise StoreError(f"cannot migrate the store {self.path}: {exc}") from exc
        finally:
            conn.close()

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.wrap_future(self._writer.submit(fn))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()

        def run() -> T:
            try:
                return fn(self._reader())
            except sqlite3.Error as exc:
                raise StoreError(str(exc)) from exc

        return await loop.run_in_executor(self._readers, run)

    @property
    def commits(self) -> int:
        return self._writer.commits

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close_sync)

    def close_sync(self) -> None:
        if self._writer.is_alive():
            self._writer.stop()
        self._checkpointer.stop()
        self._readers.shutdown(wait=True)
        with self._conns_lock:
            for conn in self._all_conns:
                conn.close()
            self._all_conns.clear()

    # -- directory ---------------------------------------------------------------------

    async def config_version(self) -> int:
        return await self._read(
            lambda c: c.execute("SELECT version FROM config_version").fetchone()[0])

    async def list_objects(self, kind: str | None = None) -> list[DirectoryObject]:
        def run(c: sqlite3.Connection) -> list[DirectoryObject]:
            if kind is None:
                rows = c.execute("SELECT * FROM directory_objects ORDER BY kind, name").fetchall()
            else:
                rows = c.execute("SELECT * FROM directory_objects WHERE kind = ? ORDER BY name",
                                 (kind,)).fetchall()
            return [DirectoryObject(r["guid"], r["kind"], r["name"], json.loads(r["data"]),
                                    r["created"], r["changed"]) for r in rows]
        return await self._read(run)

    async def put_object(self, obj: DirectoryObject, keys: list[str]) -> DirectoryObject:
        return (await self.put_objects([(obj, keys)]))[0]

    async def put_objects(self, items: list[tuple[DirectoryObject, list[str]]]
                          ) -> list[DirectoryObject]:
        """Create or replace several directory objects in one transaction."""
        now = self.clock.now()

        def one(c: sqlite3.Connection, obj: DirectoryObject, keys: list[str]) -> DirectoryObject:
            for key in keys:
                row = c.execute("SELECT k.guid, o.name FROM directory_keys k LEFT JOIN"
                                " directory_objects o ON o.guid = k.guid WHERE k.key = ?",
                                (key,)).fetchone()
                if row is not None and row["guid"] != obj.guid:
                    raise DuplicateKeyError(key, row["name"] or row["guid"])
            old = c.execute("SELECT created FROM directory_objects WHERE guid = ?",
                            (obj.guid,)).fetchone()
            created = old["created"] if old else now
            c.execute("DELETE FROM directory_keys WHERE guid = ?", (obj.guid,))
            c.executemany("INSERT INTO directory_keys (key, guid) VALUES (?, ?)",
                          [(k, obj.guid) for k in dict.fromkeys(keys)])
            c.execute("INSERT OR REPLACE INTO directory_objects (guid, kind, name, data,"
                      " created, changed) VALUES (?,?,?,?,?,?)",
                      (obj.guid, obj.kind, obj.name, json.dumps(obj.data), created, now))
            return DirectoryObject(obj.guid, obj.kind, obj.name, obj.data, created, now)

        def run(c: sqlite3.Connection) -> list[DirectoryObject]:
            out = [one(c, obj, keys) for obj, keys in items]
            c.execute("UPDATE config_version SET version = version + 1")
            return out
        return await self._write(run)

    async def delete_object(self, guid: str) -> None:
        def run(c: sqlite3.Connection) -> None:
            cur = c.execute("DELETE FROM directory_objects WHERE guid = ?", (guid,))
            if cur.rowcount == 0:
                raise NotFoundError(guid)
            c.execute("DELETE FROM directory_keys WHERE guid = ?", (guid,))
            c.execute("UPDATE config_version SET version = version + 1")
        await self._write(run)

    # -- messages ----------------------------------------------------------------------

    def _queue_id(self, c: sqlite3.Connection, key: QueueKey, now: float) -> int:
        row = c.execute("SELECT id FROM queues WHERE node = ? AND delivery_type = ? AND"
                        " next_hop_domain = ? AND next_hop_connector = ?",
                        (self.node, key.delivery_type, key.next_hop_domain,
                         key.next_hop_connector)).fetchone()
        if row is not None:
            return int(row[0])
        cur = c.execute("INSERT INTO queues (node, delivery_type, next_hop_domain,"
                        " next_hop_connector, created) VALUES (?,?,?,?,?)",
                        (self.node, key.delivery_type, key.next_hop_domain,
                         key.next_hop_connector, now))
        return int(cur.lastrowid or 0)

    def _store(self, c: sqlite3.Connection, messages: list[NewMessage],
               now: float) -> list[int | None | BaseException]:
        return insert_messages(c, self.node, messages, now, self._queue_id)

    def _store_all(self, c: sqlite3.Connection, messages: list[NewMessage],
                   now: float) -> list[int | None]:
        """Store messages that must all be stored (a failure fails the whole job)."""
        results = self._store(c, messages, now)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    def _add_deliveries(self, c: sqlite3.Connection, mid: int, deliveries: list[NewDelivery],
                        created: float, now: float) -> None:
        insert_deliveries(c, mid, deliveries, created, now,
                          lambda key: self._queue_id(c, key, now))

    @staticmethod
    def _delete_if_done(c: sqlite3.Connection, message_id: int) -> None:
        if c.execute("SELECT 1 FROM deliveries WHERE message_id = ? LIMIT 1",
                     (message_id,)).fetchone() is None:
            c.execute("DELETE FROM message_content WHERE message_id = ?", (message_id,))
            c.execute("DELETE FROM recipients WHERE message_id = ?", (message_id,))
            c.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    async def submit(self, messages: list[NewMessage]) -> list[int | None]:
        """Store the messages in the next group commit (coalesced with other sessions'
        submissions, each with its own outcome: see sqlite_coalesce) and return the new
        message ids (None for a message whose source_key was already stored). If any message
        cannot be stored this raises; callers that must know which ones were stored use
        `submit_futures`."""
        now = self.clock.now()
        futs = [self._submissions.submit_async(m, now) for m in messages]
        if len(futs) == 1:
            return [await futs[0]]
        return list(await asyncio.gather(*futs))

    def submit_futures(self, messages: list[NewMessage]) -> list[cf.Future[int | None]]:
        """Like submit, for callers in worker threads: one future per message."""
        now = self.clock.now()
        return [self._submissions.submit(m, now) for m in messages]

    def submit_batch(self, messages: list[NewMessage]
                     ) -> cf.Future[list[int | None | BaseException]]:
        """Store many messages in one job (one statement per table). The future resolves
        after the commit to one result per message: its id, None when its source_key was
        already stored, 0 when it had no deliveries, or the exception that kept it out."""
        now = self.clock.now()
        return self._writer.submit(functools.partial(self._store, messages=messages, now=now))

    async def ready_queues(self, now: float) -> list[int]:
        """This node's queues that are neither Suspended nor waiting for their retry time
        and hold a delivery that is due. One statement: the scheduler asks often."""
        return await self._read(lambda c: [r[0] for r in c.execute(
            "SELECT id FROM queues q WHERE node = ? AND status != 'Suspended' AND"
            " (next_retry_time IS NULL OR next_retry_time <= ?) AND EXISTS (SELECT 1 FROM"
            " deliveries WHERE queue_id = q.id AND status IN ('Ready', 'Retry') AND"
            " next_attempt <= ?) ORDER BY id", (self.node, now, now))])

    async def claim(self, queue_id: int, limit: int, owner: str, lease: float,
                    now: float) -> list[ClaimedDelivery]:
        def run(c: sqlite3.Connection) -> list[ClaimedDelivery]:
            # Due Ready/Retry deliveries, and Active ones whose lease expired (their claimer
            # died or hung): those are taken over as `recovering`. Nothing from a Suspended
            # queue: checked here, in the claim's own transaction, so a queue suspended a
            # moment ago gives nothing more. Rows are read as JSON in one step each (see
            # sqlite_bulk).
            rows = select_json(
                c, "SELECT json_array(id, message_id, token, created, retry_count,"
                   " recovering OR status = 'Active', crash_count) AS r FROM deliveries"
                   " WHERE queue_id = ? AND ((status IN ('Ready', 'Retry') AND"
                   " next_attempt <= ?) OR (status = 'Active' AND lease_until < ?)) AND"
                   " NOT EXISTS (SELECT 1 FROM queues WHERE id = ? AND status = 'Suspended')"
                   " ORDER BY next_attempt, id LIMIT ?", (queue_id, now, now, queue_id, limit))
            if not rows:
                return []
            # A message that was being delivered when the node died is tried alone, with
            # nothing else of this node in flight: if it kills the node again, it alone is
            # to blame (poison detection). Meanwhile nothing else is claimed.
            suspects = [i for i, r in enumerate(rows) if r[6]]
            if suspects or self._in_flight(c, suspects_only=True):
                if self._in_flight(c):
                    return []
                rows = rows[:1] if suspects and suspects[0] == 0 else rows[:suspects[0]]
            ids = [r[0] for r in rows]
            in_list(c, "UPDATE deliveries SET recovering = recovering OR status = 'Active',"
                       " status = 'Active', lease_owner = ?, lease_until = ? WHERE id IN ({in})",
                    ids, (owner, now + lease))
            return _claimed(c, [[queue_id, *r] for r in rows])
        return await self._write(run)

    def _in_flight(self, c: sqlite3.Connection, suspects_only: bool = False) -> bool:
        """Whether this node is delivering anything (or, with suspects_only, a message
        that was in flight when the node last died)."""
        return c.execute(
            "SELECT 1 FROM deliveries WHERE status = 'Active' AND crash_count >= ? AND"
            " queue_id IN (SELECT id FROM queues WHERE node = ?) LIMIT 1",
            (1 if suspects_only else 0, self.node)).fetchone() is not None

    def _complete_one(self, c: sqlite3.Connection, res: DeliveryResult, now: float) -> None:
        if res.delivered:
            c.executemany("UPDATE recipients SET status = 'Delivered' WHERE id = ?",
                          [(i,) for i in res.delivered])
        if res.failed:
            c.executemany("UPDATE recipients SET status = 'Failed', last_error = ? WHERE id = ?",
                          [(err, i) for i, err in res.failed])
        if res.awaiting_until is not None and not res.deferred:
            c.execute("UPDATE deliveries SET status = 'AwaitingConfirmation', next_attempt = ?,"
                      " last_error = ?, lease_owner = NULL, lease_until = NULL, recovering = 0,"
                      " pending = CASE WHEN pending = 'Suspend' THEN NULL ELSE pending END"
                      " WHERE id = ?", (res.awaiting_until, res.note, res.delivery_id))
            insert_events(c, res.tracking, now)
            self._store_all(c, res.new_messages, now)
            return
        if res.deferred:
            c.executemany("UPDATE recipients SET status = 'Retry', last_error = ? WHERE id = ?",
                          [(err, i) for i, err in res.deferred])
            c.execute("UPDATE deliveries SET status = 'Retry', next_attempt = ?,"
                      " retry_count = retry_count + 1, last_error = ?, lease_owner = NULL,"
                      " lease_until = NULL, recovering = 0, crash_count = crash_count + ?"
                      " WHERE id = ?",
                      (res.next_attempt or now, res.deferred[0][1], res.failures,
                       res.delivery_id))
            _settle_pending(c, [res.delivery_id])
            if res.poison:
                sqlite_queues.move(c, [res.delivery_id],
                                   self._queue_id(c, POISON_QUEUE, now), "Suspended")
        else:
            c.execute("DELETE FROM deliveries WHERE id = ?", (res.delivery_id,))
            c.execute("UPDATE recipients SET delivery_id = NULL WHERE delivery_id = ?",
                      (res.delivery_id,))
            self._delete_if_done(c, res.message_id)
        insert_events(c, res.tracking, now)
        self._store_all(c, res.new_messages, now)

    async def complete(self, results: list[DeliveryResult]) -> None:
        now = self.clock.now()

        def run(c: sqlite3.Connection) -> None:
            # The common case (every recipient delivered, nothing to add) is done for the
            # whole batch with a few statements; anything else one delivery at a time.
            simple = [r for r in results if not (r.failed or r.deferred or r.new_messages
                                                 or r.awaiting_until is not None)]
            simple_ids = {id(r) for r in simple}
            for res in results:
                if id(res) not in simple_ids:
                    self._complete_one(c, res, now)
            if simple:
                self._complete_delivered(c, simple, now)
        await self._write(run)

    def _complete_delivered(self, c: sqlite3.Connection, results: list[DeliveryResult],
                            now: float) -> None:
        in_list(c, "DELETE FROM deliveries WHERE id IN ({in})",
                [r.delivery_id for r in results])
        mids = sorted({r.message_id for r in results})
        left = {int(m) for m in select_in_json(
            c, "SELECT DISTINCT json_array(message_id) ->> 0 AS r FROM deliveries"
               " WHERE message_id IN ({in})", mids)}
        # Messages with deliveries to other next hops keep their content; their delivered
        # recipients are marked. The others are gone.
        in_list(c, "UPDATE recipients SET status = 'Delivered', delivery_id = NULL"
                   " WHERE id IN ({in})",
                [i for r in results if r.message_id in left for i in r.delivered])
        done = [m for m in mids if m not in left]
        in_list(c, "DELETE FROM message_content WHERE message_id IN ({in})", done)
        in_list(c, "DELETE FROM recipients WHERE message_id IN ({in})", done)
        in_list(c, "DELETE FROM messages WHERE id IN ({in})", done)
        insert_events(c, [e for r in results for e in r.tracking], now)

    async def reroute(self, delivery_id: int, message_id: int, deliveries: list[NewDelivery],
                      tracking: list[TrackingEvent], related: list[NewMessage],
                      only_idle: bool = False) -> bool:
        """Replace a delivery by the deliveries of a new routing decision (after a
        connector was removed, disabled or made too small, or on resubmission), with NDRs
        and tracking. With `only_idle`, a delivery being delivered right now is left alone
        (returns False)."""
        now = self.clock.now()

        def run(c: sqlite3.Connection) -> bool:
            row = c.execute("SELECT created, status FROM deliveries WHERE id = ?",
                            (delivery_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"delivery {delivery_id}")
            if only_idle and row["status"] == "Active":
                return False
            c.execute("DELETE FROM recipients WHERE delivery_id = ? AND status IN"
                      " ('Ready', 'Retry')", (delivery_id,))
            c.execute("DELETE FROM deliveries WHERE id = ?", (delivery_id,))
            self._add_deliveries(c, message_id, deliveries, row["created"], now)
            insert_events(c, tracking, now)
            self._store_all(c, related, now)
            if not deliveries:
                self._delete_if_done(c, message_id)
            return True
        return await self._write(run)

    async def release(self, delivery_ids: list[int], last_error: str | None = None) -> None:
        """Put claimed deliveries back as they were before the claim (no attempt counted),
        with the queue's error as their LastError when given."""
        def run(c: sqlite3.Connection) -> None:
            # `recovering`: a hand-off may have happened without being recorded (e.g. the
            # folder fsync failed after a rename); the next attempt checks first.
            c.executemany("UPDATE deliveries SET status = CASE WHEN retry_count > 0 THEN"
                          " 'Retry' ELSE 'Ready' END, lease_owner = NULL, lease_until = NULL,"
                          " recovering = 1, last_error = coalesce(?, last_error)"
                          " WHERE id = ? AND status = 'Active'",
                          [(last_error, i) for i in delivery_ids])
            _settle_pending(c, delivery_ids)
        await self._write(run)

    async def renew(self, delivery_ids: list[int], owner: str, until: float) -> int:
        """Extend the lease of deliveries `owner` still holds (Active) to `until`, so that
        a delivery longer than the lease is not taken over as if its claimer had died.
        Returns how many were renewed."""
        def run(c: sqlite3.Connection) -> int:
            before = c.total_changes
            in_list(c, "UPDATE deliveries SET lease_until = ? WHERE status = 'Active' AND"
                       " lease_owner = ? AND id IN ({in})", delivery_ids, (until, owner))
            return c.total_changes - before
        return await self._write(run)

    async def recover(self, node: str) -> list[tuple[int, int]]:
        """After a restart: deliveries this node had claimed go back to the queue, marked
        `recovering` so the deliverer first checks whether the hand-off already happened,
        with one more crash counted. Returns (delivery id, crash count) for each."""
        return await self._write(lambda c: sqlite_queues.recover(c, node))

    # -- queue and message management ------------------------------------------------

    async def list_messages(self, query: MessageQuery) -> list[MessageInfo]:
        return await self._read(lambda c: sqlite_queues.list_messages(c, self.node, query))

    async def suspend_deliveries(self, ids: list[int]) -> dict[int, str]:
        return await self._write(lambda c: sqlite_queues.suspend(c, ids))

    async def resume_deliveries(self, ids: list[int], now: float) -> dict[int, str]:
        return await self._write(lambda c: sqlite_queues.resume(c, ids, now))

    async def finish_idle(self, results: list[DeliveryResult],
                          pending_if_active: str | None = None) -> list[int]:
        """Record outcomes (removal, expiry) for deliveries not being delivered right now;
        an Active one gets `pending_if_active` instead (PendingRemove)."""
        now = self.clock.now()
        return await self._write(lambda c: sqlite_queues.finish_idle(
            c, results, pending_if_active, lambda c2, res: self._complete_one(c2, res, now)))

    async def mark_delay_notified(self, ids: list[int], new_messages: list[NewMessage],
                                  tracking: list[TrackingEvent]) -> None:
        now = self.clock.now()

        def run(c: sqlite3.Connection) -> None:
            sqlite_queues.mark_delay_notified(c, ids)
            self._store_all(c, new_messages, now)
            insert_events(c, tracking, now)
        await self._write(run)

    async def poison(self, ids: list[int], tracking: list[TrackingEvent]) -> None:
        """Move deliveries to this node's Poison queue, permanently suspended."""
        now = self.clock.now()

        def run(c: sqlite3.Connection) -> None:
            qid = self._queue_id(c, POISON_QUEUE, now)
            sqlite_queues.move(c, ids, qid, "Suspended")
            insert_events(c, tracking, now)
        await self._write(run)

    async def awaiting_queues(self) -> dict[int, float]:
        """This node's queues with messages awaiting confirmation, each with the earliest
        time one of them is due."""
        def run(c: sqlite3.Connection) -> dict[int, float]:
            return {r[0]: r[1] for r in c.execute(
                "SELECT d.queue_id, min(d.next_attempt) FROM deliveries d INDEXED BY"
                " deliveries_awaiting JOIN queues q ON q.id = d.queue_id WHERE d.status ="
                " 'AwaitingConfirmation' AND q.node = ? GROUP BY d.queue_id", (self.node,))}
        return await self._read(run)

    async def awaiting(self, queue_ids: list[int]) -> list[tuple[ClaimedDelivery, float]]:
        """The deliveries of these queues that await their gateway's confirmation, each
        with the time its confirmation is due."""
        def run(c: sqlite3.Connection) -> list[tuple[ClaimedDelivery, float]]:
            rows = select_in_json(
                c, "SELECT json_array(queue_id, id, message_id, token, created, retry_count,"
                   " 0, crash_count, next_attempt) AS r FROM deliveries WHERE status ="
                   " 'AwaitingConfirmation' AND queue_id IN ({in})", queue_ids)
            due = {r[1]: r[8] for r in rows}
            return [(d, due[d.id]) for d in _claimed(c, [r[:8] for r in rows])] if rows else []
        return await self._read(run)

    async def confirm(self, results: list[DeliveryResult]) -> list[int]:
        """Record the outcome of confirmed hand-offs, for deliveries that still await their
        confirmation (not removed meanwhile). Returns the ids recorded."""
        now = self.clock.now()

        def run(c: sqlite3.Connection) -> list[int]:
            done = []
            for res in results:
                row = c.execute("SELECT status FROM deliveries WHERE id = ?",
                                (res.delivery_id,)).fetchone()
                if row is None or row["status"] != "AwaitingConfirmation":
                    continue
                self._complete_one(c, res, now)
                done.append(res.delivery_id)
            return done
        return await self._write(run)

    async def set_queue_state(self, queue_id: int, state: QueueState,
                              force: bool = False) -> bool:
        """Set a queue's state. A Suspended queue keeps its state unless `force` (only an
        administrator's resume ends a suspension). Returns whether it changed."""
        def run(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "UPDATE queues SET status = ?, last_error = ?, retry_count = ?,"
                " first_retry_time = ?, last_retry_time = ?, next_retry_time = ?"
                " WHERE id = ? AND (? OR status != 'Suspended')",
                (state.status, state.last_error, state.retry_count, state.first_retry_time,
                 state.last_retry_time, state.next_retry_time, queue_id, force))
            return cur.rowcount > 0
        return await self._write(run)

    @staticmethod
    def _queue_info(r: sqlite3.Row, count: int) -> QueueInfo:
        return QueueInfo(
            id=r["id"], node=r["node"], delivery_type=r["delivery_type"],
            next_hop_domain=r["next_hop_domain"], next_hop_connector=r["next_hop_connector"],
            status=r["status"], message_count=count, last_error=r["last_error"],
            retry_count=r["retry_count"], first_retry_time=r["first_retry_time"],
            last_retry_time=r["last_retry_time"], next_retry_time=r["next_retry_time"])

    async def queue(self, queue_id: int) -> QueueInfo:
        def run(c: sqlite3.Connection) -> QueueInfo:
            r = c.execute("SELECT * FROM queues WHERE id = ?", (queue_id,)).fetchone()
            if r is None:
                raise NotFoundError(f"queue {queue_id}")
            n = c.execute("SELECT COUNT(*) FROM deliveries WHERE queue_id = ?",
                          (queue_id,)).fetchone()[0]
            return self._queue_info(r, n)
        return await self._read(run)

    async def list_queues(self, node: str | None = None) -> list[QueueInfo]:
        def run(c: sqlite3.Connection) -> list[QueueInfo]:
            counts = dict(c.execute(
                "SELECT queue_id, COUNT(*) FROM deliveries GROUP BY queue_id").fetchall())
            if node is None:
                rows = c.execute("SELECT * FROM queues ORDER BY id").fetchall()
            else:
                rows = c.execute("SELECT * FROM queues WHERE node = ? ORDER BY id",
                                 (node,)).fetchall()
            return [self._queue_info(r, counts.get(r["id"], 0)) for r in rows]
        return await self._read(run)

    def iter_content(self, message_id: int) -> Iterator[bytes]:
        """The stored message bytes, one chunk at a time (for use in worker threads)."""
        conn = self._reader()
        count = conn.execute("SELECT COUNT(*) FROM message_content WHERE message_id = ?",
                             (message_id,)).fetchone()[0]
        if count == 0:
            raise NotFoundError(f"content of message {message_id}")
        for seq in range(count):
            row = conn.execute("SELECT data FROM message_content WHERE message_id = ? AND"
                               " seq = ?", (message_id, seq)).fetchone()
            if row is None:
                # Never hand on a truncated message as if it were whole.
                raise StoreError(f"content of message {message_id} changed while read")
            yield bytes(row[0])

    # -- tracking ----------------------------------------------------------------------

    async def add_tracking(self, events: list[TrackingEvent]) -> None:
        now = self.clock.now()
        await self._write(lambda c: insert_events(c, events, now))

    async def search_tracking(self, **criteria: Any) -> list[TrackingEvent]:
        """Search tracking events. Criteria: message_id, event_id, source, sender,
        recipient (substring of any recipient), recipients (any of them is one of the
        event's recipients, case-insensitive), subject (case-insensitive substring), start,
        end (epoch; end exclusive), internal_message_id, result_size (default 1000)."""
        where: list[str] = []
        args: list[Any] = []
        if criteria.get("message_id") is not None:
            where.append("message_id_hash = ?")
            args.append(message_id_hash(str(criteria["message_id"])))
        for name, column in (("message_id", "message_id"), ("event_id", "event_id"),
                             ("source", "source"), ("internal_message_id",
                                                    "internal_message_id")):
            if criteria.get(name) is not None:
                where.append(f"{column} = ? COLLATE NOCASE" if name != "internal_message_id"
                             else f"{column} = ?")
                args.append(criteria[name])
        if criteria.get("sender") is not None:
            where.append("sender = ? COLLATE NOCASE")
            args.append(criteria["sender"])
        if criteria.get("recipient") is not None:
            where.append("recipients LIKE ? ESCAPE '\\'")
            args.append(_contains(str(criteria["recipient"])))
        if criteria.get("recipients"):
            wanted = [str(r) for r in criteria["recipients"]]
            where.append("EXISTS (SELECT 1 FROM json_each(recipients) WHERE value COLLATE "
                         f"NOCASE IN ({','.join('?' * len(wanted))}))")
            args.extend(wanted)
        if criteria.get("subject") is not None:
            where.append("subject LIKE ? ESCAPE '\\'")
            args.append(_contains(str(criteria["subject"])))
        if criteria.get("start") is not None:
            where.append("timestamp >= ?")
            args.append(criteria["start"])
        if criteria.get("end") is not None:
            where.append("timestamp < ?")
            args.append(criteria["end"])
        sql = "SELECT * FROM tracking_events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY timestamp, id LIMIT ?"
        size = criteria.get("result_size")
        args.append(1000 if size is None else int(size))
        return await self._read(lambda c: [_row_to_event(r) for r in c.execute(sql, args)])

    # -- housekeeping ------------------------------------------------------------------

    async def forget_pickup_keys(self, older_than: float) -> int:
        return await self._write(lambda c: c.execute(
            "DELETE FROM pickup_seen WHERE created < ?", (older_than,)).rowcount)

    # -- tracking log ------------------------------------------------------------------

    async def tracking_log_lines(self, after_id: int, limit: int, subjects: bool,
                                 version: str) -> list[tuple[int, str]]:
        """Up to `limit` events above `after_id` as lines of the CSV tracking log, by
        increasing id. Ids are the rowids of `tracking_events`; SQLite's single writer
        assigns them in commit order, so a reader that remembers the last id it saw misses
        nothing."""
        return await self._read(lambda c: sqlite_tracking_log.log_lines(
            c, after_id, limit, subjects, version))
