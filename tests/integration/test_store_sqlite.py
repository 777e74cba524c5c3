"""The embedded SQLite store on a real database file (store/sqlite.py, PRODUCT §5).

Every check of durability reads the database through a fresh, separate `sqlite3`
connection, so that what is asserted is what another process would see on disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator

import pytest

from mailgate.clock import FakeClock
from mailgate.store import (
    DeliveryResult,
    DirectoryObject,
    DuplicateKeyError,
    MessageQuery,
    NewDelivery,
    NewMessage,
    NewRecipient,
    NotFoundError,
    QueueKey,
    StoreError,
    TrackingEvent,
    open_store,
)
from mailgate.store.sqlite import CHUNK_SIZE, INLINE_CONTENT, SqliteStore
from mailgate.store.sqlite_schema import MIGRATIONS

MIB = 1024 * 1024
T0 = 1_800_000_000.0
FAX = QueueKey("NonSmtpGatewayDelivery", "Fax", "11111111-1111-1111-1111-111111111111")
SMS = QueueKey("NonSmtpGatewayDelivery", "Sms", "22222222-2222-2222-2222-222222222222")
MBX = QueueKey("SmtpDeliveryToMailbox", "contoso.test")


# -- helpers -------------------------------------------------------------------------------


def body(text: str = "hello") -> bytes:
    return (f"From: a@contoso.test\r\nTo: b@contoso.test\r\nSubject: {text}\r\n\r\n"
            f"{text}\r\n").encode()


def message(data: bytes = b"", queues: Iterable[QueueKey] = (FAX,), *,
            recipients: Iterable[str] = ("FAX:+15551234",), source_key: str | None = None,
            tracking: list[TrackingEvent] | None = None,
            chunks: Iterable[bytes] | None = None, **kw: object) -> NewMessage:
    data = data or body()
    rcpts = list(recipients)
    return NewMessage(
        from_address="a@contoso.test",
        content=(lambda: (c for c in chunks)) if chunks is not None else (lambda: iter([data])),
        deliveries=[NewDelivery(q, [NewRecipient(r) for r in rcpts]) for q in queues],
        tracking=tracking or [],
        internet_message_id=f"<{uuid.uuid4().hex}@contoso.test>",
        subject="hello", source_key=source_key, **kw)  # type: ignore[arg-type]


class Db:
    """A separate connection to the store's file: what another process sees on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        conn = sqlite3.connect(self.path)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def one(self, sql: str, args: tuple[object, ...] = ()) -> object:
        rows = self.rows(sql, args)
        assert len(rows) == 1, rows
        return rows[0][0]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "mailgate.db"


@pytest.fixture
def db(db_path: Path) -> Db:
    return Db(db_path)


@pytest.fixture
async def store(db_path: Path, clock: FakeClock) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(db_path, node="n1", clock=clock)
    try:
        yield s
    finally:
        await s.close()


async def queue_id(store: SqliteStore, key: QueueKey) -> int:
    for q in await store.list_queues():
        if (q.delivery_type, q.next_hop_domain, q.next_hop_connector) == (
                key.delivery_type, key.next_hop_domain, key.next_hop_connector):
            return q.id
    raise AssertionError(f"no queue for {key}")


# -- schema and connections ----------------------------------------------------------------


def test_schema_created_and_user_version_is_number_of_migrations(db_path: Path, db: Db) -> None:
    """Opening a new store creates the schema and records its version in user_version."""
    s = SqliteStore(db_path, node="n1")
    s.close_sync()
    assert db.one("PRAGMA user_version") == len(MIGRATIONS)
    tables = {r[0] for r in db.rows("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"config_version", "directory_objects", "directory_keys", "queues", "messages",
            "message_content", "deliveries", "recipients", "pickup_seen",
            "tracking_events"} <= tables


async def test_reopening_keeps_data_and_does_not_migrate_again(db_path: Path, db: Db) -> None:
    """A second open of an existing store neither re-runs migrations nor loses data."""
    s = SqliteStore(db_path, node="n1")
    await s.put_object(DirectoryObject("g1", "ForeignConnector", "Fax", {"x": 1}), ["fax"])
    await s.close()
    schema_before = db.rows("SELECT sql FROM sqlite_master ORDER BY name")

    s = SqliteStore(db_path, node="n1")
    try:
        assert [o.name for o in await s.list_objects()] == ["Fax"]
        assert await s.config_version() == 1
    finally:
        await s.close()
    assert db.one("PRAGMA user_version") == len(MIGRATIONS)
    assert db.rows("SELECT sql FROM sqlite_master ORDER BY name") == schema_before


def test_store_with_newer_schema_is_refused(db_path: Path, db: Db) -> None:
    """A database migrated by a newer mailgate is refused with StoreError, and left alone."""
    SqliteStore(db_path, node="n1").close_sync()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        SqliteStore(db_path, node="n1")
    assert db.one("PRAGMA user_version") == len(MIGRATIONS) + 1


def test_open_store_refuses_unknown_url(tmp_path: Path) -> None:
    """Only sqlite:/// URLs are supported; anything else is a StoreError, not a crash."""
    with pytest.raises(StoreError, match="unsupported"):
        open_store("postgres://db/mailgate", node="n1")
    s = open_store(f"sqlite:///{tmp_path / 'x.db'}", node="n1")
    assert isinstance(s, SqliteStore)
    s.close_sync()  # type: ignore[attr-defined]


async def test_connections_use_wal_and_synchronous_full(store: SqliteStore) -> None:
    """The writer and the reader connections run in WAL mode with synchronous=FULL (2)."""
    writer = await asyncio.wrap_future(store._writer.submit(
        lambda c: (c.execute("PRAGMA journal_mode").fetchone()[0],
                   c.execute("PRAGMA synchronous").fetchone()[0])))
    reader = await store._read(
        lambda c: (c.execute("PRAGMA journal_mode").fetchone()[0],
                   c.execute("PRAGMA synchronous").fetchone()[0]))
    assert writer == ("wal", 2)
    assert reader == ("wal", 2)


# -- group commit ----------------------------------------------------------------------


async def test_group_commit_takes_far_fewer_commits_than_messages(
        store: SqliteStore, db_path: Path) -> None:
    """200 concurrent submits share a few commits, and each future resolves after its commit."""
    n = 200
    seen: list[tuple[int | None, int]] = []
    lock = threading.Lock()

    def on_done(fut: cf.Future[int | None]) -> None:
        # Runs as soon as the writer resolves the future: the row must already be on disk.
        mid = fut.result()
        conn = sqlite3.connect(db_path)
        try:
            count = conn.execute("SELECT COUNT(*) FROM messages WHERE id = ?",
                                 (mid,)).fetchone()[0]
        finally:
            conn.close()
        with lock:
            seen.append((mid, count))

    before = store.commits
    futs = store.submit_futures([message(body(f"m{i}")) for i in range(n)])
    for f in futs:
        f.add_done_callback(on_done)
    ids = [await asyncio.wrap_future(f) for f in futs]
    commits = store.commits - before
    print(f"\ngroup commit: {n} messages in {commits} commits")
    assert len(set(ids)) == n and all(isinstance(i, int) and i > 0 for i in ids)
    assert commits <= n // 10
    # A callback may still be running in the writer thread when the last await returns.
    deadline = time.monotonic() + 10
    while len(seen) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert sorted(seen) == sorted((i, 1) for i in ids)
    assert Db(db_path).one("SELECT COUNT(*) FROM messages") == n


async def test_failing_job_does_not_undo_the_rest_of_its_group(
        store: SqliteStore, db: Db) -> None:
    """A job that raises is rolled back alone; the other jobs of its group commit."""
    started, go = threading.Event(), threading.Event()

    def blocker(c: sqlite3.Connection) -> None:
        started.set()
        assert go.wait(10)

    def bad(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO pickup_seen (source_key, created) VALUES ('bad', 0)")
        raise ValueError("job failed")

    groups: list[int] = []

    def good(key: str) -> None:
        def run(c: sqlite3.Connection) -> str:
            groups.append(store._writer.commits)
            c.execute("INSERT INTO pickup_seen (source_key, created) VALUES (?, 0)", (key,))
            return key
        return run  # type: ignore[return-value]

    def bad_in_group(c: sqlite3.Connection) -> None:
        groups.append(store._writer.commits)
        bad(c)

    first = store._writer.submit(blocker)
    assert await asyncio.to_thread(started.wait, 10)
    # The writer is busy: these three are queued and will be taken as one group.
    futs = [store._writer.submit(good("g1")), store._writer.submit(bad_in_group),
            store._writer.submit(good("g2"))]
    before = store.commits
    go.set()
    await asyncio.wrap_future(first)
    assert await asyncio.wrap_future(futs[0]) == "g1"
    with pytest.raises(ValueError, match="job failed"):
        await asyncio.wrap_future(futs[1])
    assert await asyncio.wrap_future(futs[2]) == "g2"
    assert len(set(groups)) == 1, "the three jobs ran in one group"
    assert store.commits - before <= 2
    assert sorted(r[0] for r in db.rows("SELECT source_key FROM pickup_seen")) == ["g1", "g2"]


async def test_jobs_that_arrive_while_a_group_runs_join_it(store: SqliteStore) -> None:
    """A job submitted while a group is running (within LATE_JOIN) is committed with it,
    not in a commit of its own after it."""
    joined = threading.Event()

    def first(c: sqlite3.Connection) -> int:
        late.append(store._writer.submit(lambda c: joined.set() or 2))
        time.sleep(0.001)  # the late job is queued well within the window
        return 1

    late: list[cf.Future[int]] = []
    before = store.commits
    fut = store._writer.submit(first)
    assert await asyncio.wrap_future(fut) == 1
    assert late and late[0].done() and late[0].result() == 2, "the late job joined"
    assert store.commits - before == 1


async def test_a_lone_failing_job_leaves_nothing_behind(store: SqliteStore, db: Db) -> None:
    """A job alone in its group runs without a savepoint: its failure rolls back the whole
    transaction, and the next job works normally."""
    def bad(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO pickup_seen (source_key, created) VALUES ('lone', 0)")
        raise ValueError("lone job failed")

    with pytest.raises(ValueError, match="lone job failed"):
        await asyncio.wrap_future(store._writer.submit(bad))
    assert db.one("SELECT COUNT(*) FROM pickup_seen") == 0
    assert (await store.submit([message(source_key="after")]))[0]


async def test_concurrent_submissions_are_stored_by_one_job(store: SqliteStore,
                                                              db: Db) -> None:
    """Messages submitted one at a time while the writer is busy are stored together (one
    insert per table, so far fewer statements than one job each), and each future still
    gets its own id after the commit."""
    started, go = threading.Event(), threading.Event()

    def blocker(c: sqlite3.Connection) -> None:
        started.set()
        assert go.wait(10)

    statements: list[str] = []
    # Jobs get the writer's connection: trace what it executes.
    await asyncio.wrap_future(store._writer.submit(
        lambda c: c.set_trace_callback(statements.append)))
    first = store._writer.submit(blocker)
    assert await asyncio.to_thread(started.wait, 10)
    futs = [store.submit_futures([message(body(f"c{i}"))])[0] for i in range(20)]
    go.set()
    await asyncio.wrap_future(first)
    ids = [await asyncio.wrap_future(f) for f in futs]
    await asyncio.wrap_future(store._writer.submit(lambda c: c.set_trace_callback(None)))
    assert len(set(ids)) == 20 and all(isinstance(i, int) and i > 0 for i in ids)
    inserts = [s for s in statements if s.startswith("INSERT INTO messages")]
    assert len(inserts) == 1, inserts
    assert db.one("SELECT COUNT(*) FROM messages") == 20


async def test_a_bad_message_among_coalesced_submissions_fails_alone(
        store: SqliteStore, db: Db) -> None:
    """When one of several coalesced messages cannot be stored, it alone fails; the others
    are stored (retried one by one after the multi-row insert failed)."""
    started, go = threading.Event(), threading.Event()

    def blocker(c: sqlite3.Connection) -> None:
        started.set()
        assert go.wait(10)

    def broken() -> Iterator[bytes]:
        yield b"Subject: x\r\n\r\npart"
        raise OSError(5, "Input/output error")

    bad = NewMessage(from_address="a@contoso.test", content=broken,
                     deliveries=[NewDelivery(FAX, [NewRecipient("FAX:+1")])])
    # A message whose insert violates a constraint fails in SQL, not in its content.
    clash = message(body("clash"))
    clash.from_address = None  # type: ignore[assignment]  # NOT NULL in the schema
    first = store._writer.submit(blocker)
    assert await asyncio.to_thread(started.wait, 10)
    futs = store.submit_futures([message(body("a")), bad, message(body("b")), clash,
                                 message(body("c"))])
    go.set()
    await asyncio.wrap_future(first)
    outcomes = []
    for f in futs:
        try:
            outcomes.append(await asyncio.wrap_future(f))
        except (OSError, StoreError) as exc:
            outcomes.append(exc)
    assert isinstance(outcomes[1], OSError)
    assert isinstance(outcomes[3], StoreError), outcomes[3]
    good = [outcomes[i] for i in (0, 2, 4)]
    assert all(isinstance(i, int) and i > 0 for i in good), outcomes
    assert db.one("SELECT COUNT(*) FROM messages") == 3


async def test_async_submissions_of_one_group_resolve_even_if_one_waiter_left(
        store: SqliteStore, db: Db) -> None:
    """Coroutines awaiting submit: a group's results reach them all (one wake-up of the
    loop); one whose caller was cancelled meanwhile (a session that closed) does not stop
    the others, and its message is stored all the same."""
    started, go = threading.Event(), threading.Event()

    def blocker(c: sqlite3.Connection) -> None:
        started.set()
        assert go.wait(10)

    first = store._writer.submit(blocker)
    assert await asyncio.to_thread(started.wait, 10)
    tasks = [asyncio.create_task(store.submit([message(body(f"w{i}"))])) for i in range(3)]
    await asyncio.sleep(0.05)
    tasks[1].cancel()
    go.set()
    await asyncio.wrap_future(first)
    done = [await tasks[0], await tasks[2]]
    assert all(isinstance(r[0], int) and r[0] > 0 for r in done)
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    assert db.one("SELECT COUNT(*) FROM messages") == 3


async def test_submissions_to_a_closed_store_fail_at_once(db_path: Path) -> None:
    """A submission after close fails with StoreError instead of waiting forever."""
    s = SqliteStore(db_path, node="n1", clock=FakeClock(T0))
    await s.close()
    with pytest.raises(StoreError, match="closed"):
        await asyncio.wait_for(s.submit([message()]), 5)


async def test_submit_raises_store_error_for_sqlite_failures(store: SqliteStore) -> None:
    """A SQLite error inside a write job reaches the caller as StoreError."""
    fut = store._writer.submit(lambda c: c.execute("INSERT INTO no_such_table VALUES (1)"))
    with pytest.raises(StoreError, match="no_such_table"):
        await asyncio.wrap_future(fut)


# -- submit: dedupe, content -----------------------------------------------------------


async def test_source_key_is_stored_once(store: SqliteStore, db: Db) -> None:
    """The same source_key submitted twice stores one message; the second result is None."""
    first = await store.submit([message(source_key="pickup:1:abc")])
    second = await store.submit([message(source_key="pickup:1:abc")])
    assert isinstance(first[0], int) and first[0] > 0
    assert second == [None]
    assert db.one("SELECT COUNT(*) FROM messages") == 1


async def test_source_key_in_one_group_is_stored_once(store: SqliteStore, db: Db) -> None:
    """Two submits of one key in the same group commit still store the message once."""
    futs = store.submit_futures([message(source_key="k"), message(source_key="k")])
    results = [await asyncio.wrap_future(f) for f in futs]
    assert results.count(None) == 1
    assert any(isinstance(r, int) and r > 0 for r in results)
    assert db.one("SELECT COUNT(*) FROM messages") == 1


async def test_source_key_remembered_after_delivery(store: SqliteStore, clock: FakeClock,
                                                    db: Db) -> None:
    """After the message was delivered and deleted, its source_key still refuses a resubmit."""
    [mid] = await store.submit([message(source_key="pickup:dev:ino:sha")])
    [d] = await store.claim(await queue_id(store, FAX), 10, "n1", 60, clock.now())
    await store.complete([DeliveryResult(d.id, mid, delivered=[r.id for r in d.recipients])])
    assert db.one("SELECT COUNT(*) FROM messages") == 0
    assert await store.submit([message(source_key="pickup:dev:ino:sha")]) == [None]
    assert db.one("SELECT COUNT(*) FROM messages") == 0
    assert db.one("SELECT COUNT(*) FROM deliveries") == 0


async def test_message_without_deliveries_stores_only_tracking(store: SqliteStore,
                                                               db: Db) -> None:
    """A NewMessage with no deliveries returns 0 and stores its tracking events only."""
    called = []

    def content() -> Iterator[bytes]:
        called.append(True)
        yield b"never stored"

    m = NewMessage(from_address="a@contoso.test", content=content, deliveries=[],
                   tracking=[TrackingEvent("RECEIVE", "PICKUP", message_id="<m@x>"),
                             TrackingEvent("FAIL", "ROUTING", message_id="<m@x>")])
    assert await store.submit([m]) == [0]
    assert db.one("SELECT COUNT(*) FROM messages") == 0
    assert db.one("SELECT COUNT(*) FROM message_content") == 0
    assert sorted(r[0] for r in db.rows("SELECT event_id FROM tracking_events")) == [
        "FAIL", "RECEIVE"]
    assert called == []


def odd_pieces(total: int) -> Iterator[bytes]:
    sizes = [1, 7, 4093, 65_537, 333_333, 999_999, 1_048_577]
    sent, i = 0, 0
    while sent < total:
        n = min(sizes[i % len(sizes)], total - sent)
        yield bytes((sent + k) * 31 % 251 for k in range(n)) if n < 5000 else (
            os.urandom(n))
        sent += n
        i += 1


@pytest.mark.parametrize("size", [0, 1, MIB, MIB + 1, 5 * MIB + 12_345])
async def test_content_stored_in_1mib_chunks_and_read_back_identical(
        store: SqliteStore, db: Db, size: int) -> None:
    """Content is re-chunked to 1 MiB rows and iter_content yields the same bytes back."""
    assert CHUNK_SIZE == MIB
    pieces = list(odd_pieces(size)) if size > MIB + 1 else [os.urandom(size)]
    data = b"".join(pieces)
    [mid] = await store.submit([message(chunks=pieces)])
    lengths = [r[0] for r in db.rows(
        "SELECT length(data) FROM message_content WHERE message_id = ? ORDER BY seq", (mid,))]
    expected = [MIB] * (size // MIB) + ([size % MIB] if size % MIB or size == 0 else [])
    assert lengths == expected
    assert db.one("SELECT size FROM messages WHERE id = ?", (mid,)) == size
    out = await asyncio.to_thread(lambda: list(store.iter_content(mid)))
    assert all(len(c) <= MIB for c in out)
    assert b"".join(out) == data


async def test_iter_content_of_unknown_message_raises_not_found(store: SqliteStore) -> None:
    """Reading the content of a message that does not exist is NotFoundError."""
    with pytest.raises(NotFoundError):
        list(store.iter_content(424242))


async def test_content_error_rolls_back_the_whole_message(store: SqliteStore, db: Db) -> None:
    """A content source that fails mid-way stores nothing of that message (not even its key)."""
    def content() -> Iterator[bytes]:
        yield b"x" * (MIB + 10)
        raise OSError(5, "Input/output error")

    m = NewMessage(from_address="a@contoso.test", content=content,
                   deliveries=[NewDelivery(FAX, [NewRecipient("FAX:+1")])], source_key="k1")
    with pytest.raises(OSError):
        await store.submit([m])
    for table in ("messages", "message_content", "deliveries", "recipients", "pickup_seen"):
        assert db.one(f"SELECT COUNT(*) FROM {table}") == 0, table
    # The key was not burnt: the same file can be submitted again.
    assert (await store.submit([message(source_key="k1")]))[0]


# -- claim, complete, release, recover, reroute ------------------------------------------


async def test_claim_returns_only_due_deliveries_of_that_queue(
        store: SqliteStore, clock: FakeClock) -> None:
    """claim takes Ready/Retry deliveries of its queue that are due, and marks them Active."""
    fax_ids = await store.submit([message(body(f"f{i}")) for i in range(3)])
    await store.submit([message(queues=[SMS], recipients=["SMS:+1"])])
    fq, sq = await queue_id(store, FAX), await queue_id(store, SMS)
    # Defer one fax delivery into the future: it is in Retry but not due.
    [d0] = await store.claim(fq, 1, "n1", 60, clock.now())
    await store.complete([DeliveryResult(d0.id, d0.message_id,
                                         deferred=[(d0.recipients[0].id, "451 busy")],
                                         next_attempt=clock.now() + 600)])

    claimed = await store.claim(fq, 100, "n1", 60, clock.now())
    assert sorted(d.message_id for d in claimed) == sorted(fax_ids[1:])
    assert all(d.queue_id == fq for d in claimed)
    assert all(len(d.recipients) == 1 and d.recipients[0].address == "FAX:+15551234"
               for d in claimed)
    rows = await store._read(lambda c: c.execute(
        "SELECT status, lease_owner, lease_until FROM deliveries WHERE id IN (%s)"
        % ",".join(str(d.id) for d in claimed)).fetchall())
    assert {tuple(r) for r in rows} == {("Active", "n1", clock.now() + 60)}
    assert await store.claim(fq, 100, "n1", 60, clock.now()) == []

    clock.advance(600)
    # The deferred delivery is due again, and the others' 60 s leases have expired: a
    # claimer that died or hung loses them, and they come back marked `recovering`.
    again = {d.id: d for d in await store.claim(fq, 100, "n1", 60, clock.now())}
    assert set(again) == {d0.id} | {d.id for d in claimed}
    assert again[d0.id].retry_count == 1 and not again[d0.id].recovering
    assert all(again[d.id].recovering for d in claimed)
    [sms] = await store.claim(sq, 10, "n1", 60, clock.now())
    assert [r.address for r in sms.recipients] == ["SMS:+1"]


async def test_claim_carries_the_message_envelope(store: SqliteStore, clock: FakeClock) -> None:
    """A claimed delivery carries the message's envelope fields and recipient details."""
    m = message(body("env"), ret="HDRS", envid="ENV1", is_dsn=True)
    m.from_address = ""
    m.deliveries = [NewDelivery(FAX, [NewRecipient("FAX:+1", original="IMCEAFAX-+2B1@c.test",
                                                   orcpt="rfc822;x@c.test", notify="NEVER")])]
    [mid] = await store.submit([m])
    [d] = await store.claim(await queue_id(store, FAX), 10, "n1", 60, clock.now())
    assert (d.message_id, d.from_address, d.ret, d.envid, d.is_dsn, d.size) == (
        mid, "", "HDRS", "ENV1", True, len(body("env")))
    assert d.internet_message_id == m.internet_message_id and d.subject == "hello"
    assert len(d.token) == 32 and not d.recovering and d.retry_count == 0
    r = d.recipients[0]
    assert (r.address, r.original, r.orcpt, r.notify) == (
        "FAX:+1", "IMCEAFAX-+2B1@c.test", "rfc822;x@c.test", "NEVER")


async def test_a_claim_carries_small_messages_bytes_up_to_a_budget(
        store: SqliteStore, clock: FakeClock) -> None:
    """The bytes of small (one-chunk) messages come with the claim, but no more than
    INLINE_CONTENT in all: ten messages of 0.9 MiB are claimed together, four carry their
    bytes, the others are read (streamed) from the store when delivered. Before, a claim of
    100 such messages took 650 MB of memory."""
    data = [bytes([65 + i]) * (CHUNK_SIZE * 9 // 10) for i in range(10)]
    ids = await store.submit([message(d) for d in data])
    claimed = await store.claim(await queue_id(store, FAX), 100, "n1", 60, clock.now())
    assert [d.message_id for d in claimed] == ids
    inline = [d for d in claimed if d.content is not None]
    assert len(inline) == INLINE_CONTENT // (CHUNK_SIZE * 9 // 10) == 4
    for d, want in zip(claimed, data):
        got = d.content if d.content is not None else b"".join(store.iter_content(d.message_id))
        assert got == want


async def test_concurrent_claims_never_return_a_delivery_twice(
        store: SqliteStore, clock: FakeClock) -> None:
    """Claims racing on one queue share its deliveries out without overlap."""
    await store.submit([message(body(f"c{i}")) for i in range(50)])
    q = await queue_id(store, FAX)
    batches = await asyncio.gather(*(store.claim(q, 7, f"w{i}", 60, clock.now())
                                     for i in range(10)))
    ids = [d.id for b in batches for d in b]
    assert len(ids) == 50 and len(set(ids)) == 50


async def test_bifurcated_message_content_survives_first_completion(
        store: SqliteStore, clock: FakeClock, db: Db) -> None:
    """A message in two queues keeps its content until its last delivery completes."""
    data = body("bifurcated")
    [mid] = await store.submit([message(data, queues=[FAX, SMS],
                                        recipients=["FAX:+1"])])
    assert db.one("SELECT COUNT(*) FROM deliveries WHERE message_id = ?", (mid,)) == 2
    [d1] = await store.claim(await queue_id(store, FAX), 10, "n1", 60, clock.now())
    await store.complete([DeliveryResult(d1.id, mid, delivered=[r.id for r in d1.recipients])])
    assert db.one("SELECT COUNT(*) FROM deliveries WHERE id = ?", (d1.id,)) == 0
    assert db.one("SELECT COUNT(*) FROM messages WHERE id = ?", (mid,)) == 1
    assert b"".join(store.iter_content(mid)) == data

    [d2] = await store.claim(await queue_id(store, SMS), 10, "n1", 60, clock.now())
    await store.complete([DeliveryResult(d2.id, mid, delivered=[r.id for r in d2.recipients])])
    for table, col in (("messages", "id"), ("message_content", "message_id"),
                       ("recipients", "message_id"), ("deliveries", "message_id")):
        assert db.one(f"SELECT COUNT(*) FROM {table} WHERE {col} = ?", (mid,)) == 0, table
    with pytest.raises(NotFoundError):
        list(store.iter_content(mid))


async def test_failed_recipients_complete_the_delivery_with_its_ndr(
        store: SqliteStore, clock: FakeClock, db: Db) -> None:
    """Failed recipients are final: the delivery goes, and its NDR is stored in the same commit."""
    [mid] = await store.submit([message()])
    [d] = await store.claim(await queue_id(store, FAX), 10, "n1", 60, clock.now())
    ndr = message(body("ndr"), queues=[MBX], recipients=["a@contoso.test"], is_dsn=True)
    ndr.from_address = ""
    await store.complete([DeliveryResult(
        d.id, mid, failed=[(d.recipients[0].id, "550 5.1.2 no such fax")],
        new_messages=[ndr], tracking=[TrackingEvent("FAIL", "GATEWAY")])])
    assert db.rows("SELECT internet_message_id, from_address, is_dsn FROM messages") == [
        (ndr.internet_message_id, "", 1)]
    assert db.one("SELECT COUNT(*) FROM deliveries WHERE token = ?", (d.token,)) == 0
    assert db.one("SELECT COUNT(*) FROM tracking_events WHERE event_id = 'FAIL'") == 1


async def test_deferred_recipients_put_the_delivery_in_retry(
        store: SqliteStore, clock: FakeClock, db: Db) -> None:
    """Deferred recipients: Retry with next_attempt and retry_count+1; delivered ones stay done."""
    [mid] = await store.submit([message(recipients=["FAX:+1", "FAX:+2"])])
    q = await queue_id(store, FAX)
    [d] = await store.claim(q, 10, "n1", 60, clock.now())
    r1, r2 = d.recipients
    await store.complete([DeliveryResult(d.id, mid, delivered=[r1.id],
                                         deferred=[(r2.id, "451 4.3.0 line busy")],
                                         next_attempt=clock.now() + 300)])
    assert db.rows("SELECT status, next_attempt, retry_count, last_error, lease_owner,"
                   " recovering FROM deliveries WHERE id = ?", (d.id,)) == [
        ("Retry", clock.now() + 300, 1, "451 4.3.0 line busy", None, 0)]
    assert await store.claim(q, 10, "n1", 60, clock.now() + 299) == []
    [again] = await store.claim(q, 10, "n1", 60, clock.now() + 300)
    assert [r.id for r in again.recipients] == [r2.id]
    assert again.retry_count == 1
    await store.complete([DeliveryResult(again.id, mid, deferred=[(r2.id, "451 again")],
                                         next_attempt=clock.now() + 900)])
    assert db.one("SELECT retry_count FROM deliveries WHERE id = ?", (d.id,)) == 2


async def test_release_returns_deliveries_to_ready_marked_recovering(
        store: SqliteStore, clock: FakeClock, db: Db) -> None:
    """release puts claimed deliveries back (Ready, no lease) with recovering=1."""
    await store.submit([message(body(f"r{i}")) for i in range(2)])
    q = await queue_id(store, FAX)
    claimed = await store.claim(q, 10, "n1", 60, clock.now())
    [late] = await store.submit([message(body("not claimed"))])
    # Releasing an id that is not Active (never claimed) changes nothing about it.
    await store.release([d.id for d in claimed] + [claimed[-1].id + 1])
    assert db.rows("SELECT DISTINCT status, lease_owner, lease_until, recovering, retry_count"
                   " FROM deliveries WHERE message_id != ?", (late,)) == [
        ("Ready", None, None, 1, 0)]
    assert db.rows("SELECT status, recovering FROM deliveries WHERE message_id = ?",
                   (late,)) == [("Ready", 0)]
    again = await store.claim(q, 10, "n1", 60, clock.now())
    assert sorted(d.id for d in again if d.message_id != late) == sorted(
        d.id for d in claimed)
    assert [d.recovering for d in again if d.message_id == late] == [False]
    assert all(d.recovering for d in again if d.message_id != late)


async def test_recover_resets_active_deliveries_of_that_node_only(
        store: SqliteStore, db_path: Path, clock: FakeClock, db: Db) -> None:
    """recover(node) returns that node's Active deliveries to the queue, marked recovering
    with a crash counted; they are then claimed one at a time."""
    other = SqliteStore(db_path, node="n2", clock=clock)
    try:
        await store.submit([message(body(f"a{i}")) for i in range(3)])
        await other.submit([message(body("b"))])
        mine = [q.id for q in await store.list_queues("n1")]
        theirs = [q.id for q in await store.list_queues("n2")]
        assert len(mine) == 1 and len(theirs) == 1 and mine != theirs
        await store.claim(mine[0], 2, "n1", 60, clock.now())
        [t] = await other.claim(theirs[0], 10, "n2", 60, clock.now())

        assert len(await store.recover("n1")) == 2
        assert db.rows("SELECT status, recovering, COUNT(*) FROM deliveries WHERE queue_id = ?"
                       " GROUP BY status, recovering ORDER BY recovering", (mine[0],)) == [
            ("Ready", 0, 1), ("Ready", 1, 2)]
        assert db.rows("SELECT status, lease_owner, recovering FROM deliveries WHERE id = ?",
                       (t.id,)) == [("Active", "n2", 0)]
        # Each recovered delivery is claimed alone, with nothing else of the node in flight
        # (poison detection); then the rest together.
        claims = []
        for _ in range(3):
            got = await store.claim(mine[0], 10, "n1", 60, clock.now())
            assert await store.claim(mine[0], 10, "n1", 60, clock.now()) == []
            claims.append([d.recovering for d in got])
            await store.complete([DeliveryResult(d.id, d.message_id,
                                                 delivered=[r.id for r in d.recipients])
                                  for d in got])
        assert claims == [[True], [True], [False]]
    finally:
        await other.close()


async def test_reroute_moves_recipients_into_new_queues(
        store: SqliteStore, clock: FakeClock, db: Db) -> None:
    """reroute replaces a claimed delivery by new ones, keeping the content and recording events."""
    data = body("reroute")
    [mid] = await store.submit([message(data, recipients=["FAX:+1", "FAX:+2"])])
    [d] = await store.claim(await queue_id(store, FAX), 10, "n1", 60, clock.now())
    await store.reroute(d.id, mid, [NewDelivery(SMS, [NewRecipient("FAX:+1")]),
                                    NewDelivery(MBX, [NewRecipient("b@contoso.test")])],
                        [TrackingEvent("REDIRECT", "ROUTING", internal_message_id=mid)], [])
    assert db.one("SELECT COUNT(*) FROM deliveries WHERE token = ?", (d.token,)) == 0
    assert await store.claim(await queue_id(store, FAX), 10, "n1", 60, clock.now()) == []
    [s] = await store.claim(await queue_id(store, SMS), 10, "n1", 60, clock.now())
    [m] = await store.claim(await queue_id(store, MBX), 10, "n1", 60, clock.now())
    assert [r.address for r in s.recipients] == ["FAX:+1"]
    assert [r.address for r in m.recipients] == ["b@contoso.test"]
    assert s.message_id == m.message_id == mid
    assert s.created == d.created
    assert b"".join(store.iter_content(mid)) == data
    assert db.one("SELECT COUNT(*) FROM tracking_events WHERE event_id = 'REDIRECT'") == 1
    assert sorted(r[0] for r in db.rows(
        "SELECT address FROM recipients WHERE message_id = ?", (mid,))) == [
        "FAX:+1", "b@contoso.test"]


async def test_reroute_to_nowhere_deletes_the_message(
        store: SqliteStore, clock: FakeClock, db: Db) -> None:
    """Rerouting to no new deliveries deletes the message; a gone delivery is NotFound."""
    [mid] = await store.submit([message()])
    [d] = await store.claim(await queue_id(store, FAX), 10, "n1", 60, clock.now())
    await store.reroute(d.id, mid, [], [], [])
    assert db.one("SELECT COUNT(*) FROM messages") == 0
    assert db.one("SELECT COUNT(*) FROM message_content") == 0
    with pytest.raises(NotFoundError):
        await store.reroute(d.id, mid, [], [], [])


# -- queues ----------------------------------------------------------------------------


async def test_list_queues_counts_messages_per_queue(store: SqliteStore) -> None:
    """list_queues reports each queue with its message count (a bifurcated message in both)."""
    await store.submit([message(body(f"x{i}")) for i in range(3)])
    await store.submit([message(body("both"), queues=[FAX, SMS])])
    counts = {q.next_hop_domain: q.message_count for q in await store.list_queues()}
    assert counts == {"Fax": 4, "Sms": 1}
    assert (await store.queue(await queue_id(store, SMS))).message_count == 1
    assert all(q.node == "n1" and q.status == "Ready" for q in await store.list_queues())
    assert await store.list_queues("elsewhere") == []
    with pytest.raises(NotFoundError):
        await store.queue(999)


async def test_list_queues_stays_fast_with_100k_deliveries(
        store: SqliteStore, db_path: Path, clock: FakeClock) -> None:
    """With 100,000 queued deliveries list_queues answers quickly (measured, loose bound)."""
    # Create the queues through the store, then bulk-load rows through a separate connection.
    await store.submit([message(queues=[FAX, SMS, MBX], recipients=["FAX:+1"])])
    qids = [await queue_id(store, k) for k in (FAX, SMS, MBX)]
    n = 100_000
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        first = conn.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0] + 1
        conn.executemany(
            "INSERT INTO messages (id, node, from_address, date_received, source)"
            " VALUES (?, 'n1', 'a@contoso.test', ?, 'PICKUP')",
            ((first + i, T0) for i in range(n)))
        conn.executemany(
            "INSERT INTO deliveries (message_id, queue_id, token, created, next_attempt)"
            " VALUES (?, ?, ?, ?, ?)",
            ((first + i, qids[i % 3], uuid.uuid4().hex, T0, T0) for i in range(n)))
        conn.execute("COMMIT")
    finally:
        conn.close()
    started = time.perf_counter()
    queues = await store.list_queues()
    elapsed = time.perf_counter() - started
    print(f"\nlist_queues with {n + 3} deliveries: {elapsed * 1000:.1f} ms")
    assert sum(q.message_count for q in queues) == n + 3
    assert {q.id: q.message_count for q in queues} == {
        qids[0]: 33_335, qids[1]: 33_334, qids[2]: 33_334}
    assert elapsed < 5.0


# -- directory objects -----------------------------------------------------------------


async def test_put_object_enforces_unique_keys_and_bumps_config_version(
        store: SqliteStore) -> None:
    """A key owned by another object is refused with DuplicateKeyError naming key and owner."""
    assert await store.config_version() == 0
    fax = await store.put_object(
        DirectoryObject("g-fax", "ForeignConnector", "Fax", {"spaces": ["FAX:*"]}),
        ["connector:fax", "FAX:*"])
    assert fax.created == fax.changed == T0
    assert await store.config_version() == 1
    with pytest.raises(DuplicateKeyError) as info:
        await store.put_object(DirectoryObject("g-two", "ForeignConnector", "Fax2", {}),
                               ["connector:fax2", "FAX:*"])
    assert info.value.key == "FAX:*" and info.value.owner == "Fax"
    assert await store.config_version() == 1
    assert [o.guid for o in await store.list_objects()] == ["g-fax"]
    # The owner itself may keep (and change) its keys.
    again = await store.put_object(DirectoryObject("g-fax", "ForeignConnector", "Fax",
                                                   {"spaces": []}), ["connector:fax"])
    assert again.data == {"spaces": []} and again.created == T0
    assert await store.config_version() == 2
    # The released key is free again.
    await store.put_object(DirectoryObject("g-two", "ForeignConnector", "Fax2", {}), ["FAX:*"])
    assert await store.config_version() == 3


async def test_put_objects_is_all_or_nothing(store: SqliteStore) -> None:
    """put_objects stores every object or none; a clash inside the batch names the key."""
    with pytest.raises(DuplicateKeyError) as info:
        await store.put_objects([
            (DirectoryObject("g1", "Mailbox", "Julia", {}), ["smtp:julia@contoso.test"]),
            (DirectoryObject("g2", "Mailbox", "Jules", {}), ["smtp:julia@contoso.test"]),
        ])
    assert info.value.key == "smtp:julia@contoso.test" and info.value.owner == "Julia"
    assert await store.list_objects() == []
    assert await store.config_version() == 0
    done = await store.put_objects([
        (DirectoryObject("g1", "Mailbox", "Julia", {}), ["smtp:julia@contoso.test"]),
        (DirectoryObject("g2", "Mailbox", "Jules", {}), ["smtp:jules@contoso.test"]),
    ])
    assert [o.name for o in done] == ["Julia", "Jules"]
    assert [o.name for o in await store.list_objects("Mailbox")] == ["Jules", "Julia"]
    assert await store.config_version() == 1


async def test_delete_object(store: SqliteStore) -> None:
    """delete_object removes the object and frees its keys; a missing guid is NotFoundError."""
    await store.put_object(DirectoryObject("g1", "AcceptedDomain", "contoso", {}),
                           ["domain:contoso.test"])
    await store.delete_object("g1")
    assert await store.list_objects() == []
    assert await store.config_version() == 2
    with pytest.raises(NotFoundError):
        await store.delete_object("g1")
    assert await store.config_version() == 2
    await store.put_object(DirectoryObject("g2", "AcceptedDomain", "c2", {}),
                           ["domain:contoso.test"])


# -- tracking --------------------------------------------------------------------------


@pytest.fixture
async def events(store: SqliteStore) -> list[TrackingEvent]:
    evs = [
        TrackingEvent("RECEIVE", "PICKUP", T0 + 1, message_id="<one@contoso.test>",
                      sender="alice@contoso.test", recipients=["FAX:+15551234"]),
        TrackingEvent("DELIVER", "GATEWAY", T0 + 2, message_id="<one@contoso.test>",
                      sender="alice@contoso.test", recipients=["FAX:+15551234"]),
        TrackingEvent("RECEIVE", "SMTP", T0 + 3, message_id="<two@contoso.test>",
                      sender="bob@contoso.test",
                      recipients=["julia@contoso.test", "ops@fabrikam.test"]),
        TrackingEvent("FAIL", "ROUTING", T0 + 4, message_id="<two@contoso.test>",
                      sender="bob@contoso.test", recipients=["ops@fabrikam.test"]),
    ]
    await store.add_tracking(evs)
    return evs


async def test_search_tracking_by_each_criterion(store: SqliteStore,
                                                 events: list[TrackingEvent]) -> None:
    """search_tracking filters by message id, sender, recipient substring, event id and time."""
    async def ids(**criteria: object) -> list[tuple[str, float]]:
        return [(e.event_id, e.timestamp) for e in await store.search_tracking(**criteria)]

    assert await ids() == [(e.event_id, e.timestamp) for e in events]
    assert await ids(message_id="<ONE@contoso.test>") == [("RECEIVE", T0 + 1),
                                                          ("DELIVER", T0 + 2)]
    assert await ids(sender="Bob@Contoso.test") == [("RECEIVE", T0 + 3), ("FAIL", T0 + 4)]
    assert await ids(recipient="fabrikam") == [("RECEIVE", T0 + 3), ("FAIL", T0 + 4)]
    assert await ids(recipient="julia@") == [("RECEIVE", T0 + 3)]
    assert await ids(event_id="deliver") == [("DELIVER", T0 + 2)]
    assert await ids(start=T0 + 2, end=T0 + 4) == [("DELIVER", T0 + 2), ("RECEIVE", T0 + 3)]
    assert await ids(event_id="RECEIVE", sender="alice@contoso.test") == [("RECEIVE", T0 + 1)]
    assert await ids(result_size=2) == [("RECEIVE", T0 + 1), ("DELIVER", T0 + 2)]
    assert await ids(message_id="<nothing@x>") == []
    [e] = await store.search_tracking(event_id="FAIL")
    assert e.recipients == ["ops@fabrikam.test"] and e.source == "ROUTING"


async def test_submit_fills_tracking_size_and_internal_id(store: SqliteStore) -> None:
    """Tracking events stored with a message get its size and internal id when not set."""
    data = body("tracked")
    [mid] = await store.submit([message(data, tracking=[
        TrackingEvent("RECEIVE", "PICKUP", message_id="<t@x>")])])
    [e] = await store.search_tracking(message_id="<t@x>")
    assert (e.internal_message_id, e.total_bytes, e.timestamp) == (mid, len(data), T0)
    [e2] = await store.search_tracking(internal_message_id=mid)
    assert e2.event_id == "RECEIVE"


async def test_search_tracking_finds_non_ascii_recipient(store: SqliteStore) -> None:
    """A SMTPUTF8 recipient is found by a substring of its own spelling."""
    await store.add_tracking([TrackingEvent("RECEIVE", "SMTP", T0,
                                            recipients=["jörg@bücher.test"])])
    found = await store.search_tracking(recipient="jörg")
    assert [e.recipients for e in found] == [["jörg@bücher.test"]]


async def test_message_ids_are_never_reused(store: SqliteStore, clock: FakeClock) -> None:
    """A delivered and deleted message's id is not given to the next message."""
    [old] = await store.submit([message(body("old"), tracking=[
        TrackingEvent("RECEIVE", "PICKUP", message_id="<old@x>")])])
    [d] = await store.claim(await queue_id(store, FAX), 10, "n1", 60, clock.now())
    await store.complete([DeliveryResult(d.id, old, delivered=[r.id for r in d.recipients])])
    [new] = await store.submit([message(body("new"), tracking=[
        TrackingEvent("RECEIVE", "PICKUP", message_id="<new@x>")])])
    assert new != old
    assert [e.message_id for e in await store.search_tracking(internal_message_id=new)] == [
        "<new@x>"]


# -- message status transitions (queue engine, reference §4.3) -----------------------------


async def statuses(store: SqliteStore) -> dict[int, str]:
    return {m.message_id: m.status for m in await store.list_messages(MessageQuery(limit=None))}


async def test_suspend_resume_of_waiting_and_in_flight_messages(
        store: SqliteStore, clock: FakeClock) -> None:
    """Suspend: Ready → Suspended; Active → PendingSuspend, which becomes Suspended when the
    attempt fails back into the queue. Resume: Suspended → Ready (due now), PendingSuspend →
    Active. Suspended deliveries are never claimed."""
    a, b = await store.submit([message(), message()])
    q = await queue_id(store, FAX)
    [db_] = [d for d in await store.claim(q, 1, "n1", 60, clock.now())]
    assert db_.message_id == a
    await store.suspend_deliveries([db_.id])
    ids = {m.message_id: m.delivery_id for m in await store.list_messages(MessageQuery())}
    await store.suspend_deliveries([ids[b]])
    assert await statuses(store) == {a: "PendingSuspend", b: "Suspended"}
    assert await store.claim(q, 10, "n1", 60, clock.now()) == []
    await store.release([db_.id], "451 4.4.1 gateway down")
    assert await statuses(store) == {a: "Suspended", b: "Suspended"}
    await store.resume_deliveries([ids[a], ids[b]], clock.now())
    assert await statuses(store) == {a: "Ready", b: "Ready"}
    [again] = await store.claim(q, 1, "n1", 60, clock.now())
    await store.suspend_deliveries([again.id])
    await store.resume_deliveries([again.id], clock.now())
    assert (await statuses(store))[again.message_id] == "Active"


async def test_remove_waiting_now_and_in_flight_when_its_attempt_ends(
        store: SqliteStore, clock: FakeClock) -> None:
    """finish_idle records a removal at once for a waiting message; one in flight becomes
    PendingRemove (left for the node's maintenance once it fails back), and a delivery
    that succeeds meanwhile is simply delivered."""
    a, b, c = await store.submit([message(), message(), message()])
    q = await queue_id(store, FAX)
    flying = await store.claim(q, 2, "n1", 60, clock.now())
    assert [d.message_id for d in flying] == [a, b]
    infos = {m.message_id: m for m in await store.list_messages(MessageQuery())}
    results = [DeliveryResult(infos[m].delivery_id, m,
                              failed=[(r.id, "550 4.3.2 removed") for r in infos[m].recipients])
               for m in (a, b, c)]
    done = await store.finish_idle(results, "Remove")
    assert done == [infos[c].delivery_id]
    assert await statuses(store) == {a: "PendingRemove", b: "PendingRemove"}
    await store.release([flying[0].id])              # a fails back: now removable
    await store.complete([DeliveryResult(flying[1].id, b,
                                         delivered=[r.id for r in flying[1].recipients])])
    [m] = await store.list_messages(MessageQuery(statuses=["PendingRemove"]))
    assert (m.message_id, m.pending) == (a, "Remove")
    assert await store.finish_idle([results[0]]) == [infos[a].delivery_id]
    assert await statuses(store) == {}


async def test_list_messages_filters_in_sql_and_in_python_alike(store: SqliteStore) -> None:
    """An OPATH filter over columns runs in SQL; one over Recipients (a list) in Python;
    both honour the result size."""
    from mailgate.admin.messages import MESSAGE_SCHEMA
    from mailgate.core import opath

    await store.submit([message(recipients=[f"FAX:+{i}"]) for i in range(5)])
    by_size = opath.parse("Size -gt 10 -and Status -eq 'ready'", MESSAGE_SCHEMA)
    assert len(await store.list_messages(MessageQuery(filter=by_size, limit=3))) == 3
    by_rcpt = opath.parse("Recipients -like 'FAX:+3'", MESSAGE_SCHEMA)
    [m] = await store.list_messages(MessageQuery(filter=by_rcpt))
    assert m.recipients[0].address == "FAX:+3"
    none = opath.parse("FromAddress -like '*@fabrikam.test'", MESSAGE_SCHEMA)
    assert await store.list_messages(MessageQuery(filter=none)) == []
