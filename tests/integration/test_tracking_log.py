"""The daily CSV message tracking log (mailgate/tracking_log.py, reference §6.1) on real
files in a temp folder, fed from a real SQLite store, with a fake clock for dates.

Checked: Exchange's header lines and field order, CSV quoting, rollover by size and by
UTC date, circular logging by age and by folder size, and that every event is written
exactly once across restarts and crashes.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
import logging
from pathlib import Path
from typing import AsyncIterator

import pytest

from mailgate import __version__
from mailgate.clock import FakeClock
from mailgate.store import TrackingEvent
from mailgate.store.sqlite import SqliteStore
from mailgate.tracking_log import STATE_FILE, TrackingLogWriter

# Reference §6.1, in order.
EXCHANGE_FIELDS = [
    "date-time", "client-ip", "client-hostname", "server-ip", "server-hostname",
    "source-context", "connector-id", "source", "event-id", "internal-message-id",
    "message-id", "network-message-id", "recipient-address", "recipient-status",
    "total-bytes", "recipient-count", "related-recipient-address", "reference",
    "message-subject", "sender-address", "return-path", "message-info", "directionality",
    "tenant-id", "original-client-ip", "original-server-ip", "custom-data",
    "transport-traffic-type", "log-id", "schema-version",
]
DAY = 86400.0


def utc(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "mailgate.db", node="testnode")
    yield s
    await s.close()


def folder_of(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "MessageTracking"


async def add(store: SqliteStore, count: int, clock: FakeClock, **fields: object) -> None:
    await store.add_tracking([
        TrackingEvent("RECEIVE", "PICKUP", timestamp=clock.now(),
                      message_id=f"<m{i}@contoso.test>",
                      recipients=["alice@contoso.test"], sender="bob@contoso.test",
                      **fields)  # type: ignore[arg-type]
        for i in range(count)])


def log_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("MSGTRK*.LOG"))


def read_log(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header lines, one dict per event line) of a tracking log file."""
    text = path.read_bytes().decode("utf-8")
    header = []
    rest = text
    while rest.startswith("#"):
        line, rest = rest.split("\r\n", 1)
        header.append(line)
    rows = list(csv.reader(rest.splitlines(keepends=True)))
    return header, [dict(zip(EXCHANGE_FIELDS, row, strict=True)) for row in rows]


def all_log_ids(folder: Path) -> list[int]:
    """The log-id of every line, file by file in name order (day, then number)."""
    def order(p: Path) -> tuple[str, int]:
        day, number = p.stem[len("MSGTRK"):].split("-")
        return day, int(number)
    ids = []
    for path in sorted(folder.glob("MSGTRK*.LOG"), key=order):
        ids += [int(r["log-id"]) for r in read_log(path)[1]]
    return ids


# -- format ------------------------------------------------------------------------------


async def test_header_lines_and_fields_are_exchanges(store: SqliteStore,
                                                     tmp_path: Path) -> None:
    """A new file starts with #Software, #Version, #Log-type, #Date (creation time in
    ISO 8601 UTC) and #Fields listing Exchange's 30 fields in Exchange's order; lines
    end in CRLF and the file is named MSGTRK<UTC yyyymmdd>-1.LOG."""
    clock = FakeClock(utc("2026-11-29T10:15:30.25"))
    folder = folder_of(tmp_path)
    await add(store, 1, clock)
    assert await TrackingLogWriter(store, folder, clock).write_pending() == 1
    assert log_names(folder) == ["MSGTRK20261129-1.LOG"]
    raw = (folder / "MSGTRK20261129-1.LOG").read_bytes()
    assert raw.count(b"\r\n") == 6 and raw.endswith(b"\r\n")
    header, rows = read_log(folder / "MSGTRK20261129-1.LOG")
    assert header == [
        f"#Software: mailgate {__version__}",
        f"#Version: {__version__}",
        "#Log-type: Message Tracking Log",
        "#Date: 2026-11-29T10:15:30.250Z",
        "#Fields: " + ",".join(EXCHANGE_FIELDS),
    ]
    assert len(rows) == 1


async def test_a_line_holds_the_event_in_field_order(store: SqliteStore,
                                                     tmp_path: Path) -> None:
    """Each value sits in its Exchange column: ISO time, ';'-joined recipients and their
    statuses in the same order, recipient count, the store's event id as log-id, and
    empty columns for what mailgate does not record."""
    clock = FakeClock(utc("2026-11-29T10:00:00"))
    await store.add_tracking([TrackingEvent(
        "DELIVER", "GATEWAY", timestamp=utc("2026-11-29T09:59:58.5"),
        message_id="<one@contoso.test>", internal_message_id=42,
        recipients=["FAX:+15551234", "FAX:+15559876"],
        recipient_status=["250 2.0.0 OK", "250 2.0.0 OK too"],
        sender="alice@contoso.test", return_path="alice@contoso.test", subject="Fax",
        total_bytes=1234, source_context="20261129T095958Z-1.eml", connector_id="Fax",
        server_hostname="mg1.contoso.test", reference="<ref@contoso.test>",
        related_recipient_address="bob@contoso.test", message_info="2026-11-29T09:00:00Z",
        directionality="Originating")])
    [(event_id, _)] = await store.tracking_log_lines(0, 10, True, "1")
    folder = folder_of(tmp_path)
    await TrackingLogWriter(store, folder, clock).write_pending()
    [row] = read_log(folder / "MSGTRK20261129-1.LOG")[1]
    assert row == {
        "date-time": "2026-11-29T09:59:58.500Z", "client-ip": "", "client-hostname": "",
        "server-ip": "", "server-hostname": "mg1.contoso.test",
        "source-context": "20261129T095958Z-1.eml", "connector-id": "Fax",
        "source": "GATEWAY", "event-id": "DELIVER", "internal-message-id": "42",
        "message-id": "<one@contoso.test>", "network-message-id": "",
        "recipient-address": "FAX:+15551234;FAX:+15559876",
        "recipient-status": "250 2.0.0 OK;250 2.0.0 OK too",
        "total-bytes": "1234", "recipient-count": "2",
        "related-recipient-address": "bob@contoso.test", "reference": "<ref@contoso.test>",
        "message-subject": "Fax", "sender-address": "alice@contoso.test",
        "return-path": "alice@contoso.test", "message-info": "2026-11-29T09:00:00Z",
        "directionality": "Originating", "tenant-id": "", "original-client-ip": "",
        "original-server-ip": "", "custom-data": "", "transport-traffic-type": "",
        "log-id": str(event_id), "schema-version": __version__,
    }


async def test_subjects_with_commas_quotes_and_newlines_are_quoted(
        store: SqliteStore, tmp_path: Path) -> None:
    """A subject with commas, double quotes, a line break or a leading '#' is one quoted
    CSV value (quotes doubled) that reads back unchanged, and the lines after it still
    parse."""
    clock = FakeClock(utc("2026-11-29T10:00:00"))
    subjects = ['Re: "budget", Q4, final', "two\r\nlines", "#not a header\nreally",
                "plain", "caf\u00e9, \u00fcber"]
    for subject in subjects:
        await add(store, 1, clock, subject=subject)
    folder = folder_of(tmp_path)
    await TrackingLogWriter(store, folder, clock).write_pending()
    path = folder / "MSGTRK20261129-1.LOG"
    raw = path.read_text(encoding="utf-8")
    assert '"Re: ""budget"", Q4, final"' in raw
    rows = read_log(path)[1]
    assert [r["message-subject"] for r in rows] == subjects
    assert [r["recipient-address"] for r in rows] == ["alice@contoso.test"] * 5


async def test_subject_logging_can_be_turned_off(store: SqliteStore, tmp_path: Path) -> None:
    """With MessageTrackingLogSubjectLoggingEnabled false the message-subject column is
    empty and everything else is written."""
    clock = FakeClock(utc("2026-11-29T10:00:00"))
    await add(store, 1, clock, subject="secret plans")
    folder = folder_of(tmp_path)
    await TrackingLogWriter(store, folder, clock, subject_logging=False).write_pending()
    path = folder / "MSGTRK20261129-1.LOG"
    assert b"secret" not in path.read_bytes()
    [row] = read_log(path)[1]
    assert row["message-subject"] == "" and row["message-id"] == "<m0@contoso.test>"


# -- rollover ----------------------------------------------------------------------------


async def test_a_full_file_rolls_over_to_the_next_number(store: SqliteStore,
                                                         tmp_path: Path) -> None:
    """When the next line would take a file over MaxFileSize the log goes on in
    MSGTRK<day>-2.LOG, -3, ...: no file exceeds the limit, each has the header lines,
    and the events are spread over them in order, each once."""
    clock = FakeClock(utc("2026-11-29T10:00:00"))
    await add(store, 30, clock, subject="x" * 100)
    folder = folder_of(tmp_path)
    limit = 2000
    await TrackingLogWriter(store, folder, clock, max_file_size=limit).write_pending()
    names = log_names(folder)
    assert len(names) > 3
    assert names == sorted(f"MSGTRK20261129-{n}.LOG" for n in range(1, len(names) + 1))
    for name in names:
        assert (folder / name).stat().st_size <= limit
        header, rows = read_log(folder / name)
        assert len(header) == 5 and rows
    assert all_log_ids(folder) == list(range(1, 31))


async def test_a_line_larger_than_max_file_size_still_gets_written(
        store: SqliteStore, tmp_path: Path) -> None:
    """A limit smaller than one line cannot stop the log: each file then holds one
    event (no empty files, no endless rollover)."""
    clock = FakeClock(utc("2026-11-29T10:00:00"))
    await add(store, 3, clock)
    folder = folder_of(tmp_path)
    await TrackingLogWriter(store, folder, clock, max_file_size=10).write_pending()
    assert log_names(folder) == [f"MSGTRK20261129-{n}.LOG" for n in (1, 2, 3)]
    assert all_log_ids(folder) == [1, 2, 3]


async def test_a_new_utc_day_starts_a_new_file(store: SqliteStore, tmp_path: Path) -> None:
    """The file's date is the UTC date of writing (the clock's), numbered from 1 each day:
    an event from 23:59:59.9 written after midnight goes into the new day's file."""
    clock = FakeClock(utc("2026-11-29T23:59:59.5"))
    folder = folder_of(tmp_path)
    writer = TrackingLogWriter(store, folder, clock, max_file_size=900)
    await add(store, 3, clock)
    await writer.write_pending()
    before = log_names(folder)
    assert before[0] == "MSGTRK20261129-1.LOG" and len(before) >= 2
    clock.advance(0.4)
    await add(store, 1, clock)      # an event from the old day ...
    clock.advance(0.2)              # ... written just after midnight
    await add(store, 1, clock)
    await writer.write_pending()
    assert log_names(folder) == before + ["MSGTRK20261130-1.LOG"]
    header, rows = read_log(folder / "MSGTRK20261130-1.LOG")
    assert header[3] == "#Date: 2026-11-30T00:00:00.100Z"
    assert [r["date-time"] for r in rows] == ["2026-11-29T23:59:59.900Z",
                                              "2026-11-30T00:00:00.100Z"]
    assert all_log_ids(folder) == [1, 2, 3, 4, 5]


# -- circular logging --------------------------------------------------------------------


async def test_files_older_than_max_age_are_deleted(store: SqliteStore,
                                                    tmp_path: Path) -> None:
    """A file goes once MaxAge has passed since the end of its UTC day; younger files
    and files that are not tracking logs stay."""
    clock = FakeClock(utc("2026-11-01T12:00:00"))
    folder = folder_of(tmp_path)
    writer = TrackingLogWriter(store, folder, clock, max_age=2 * DAY)
    for _ in range(4):                       # Nov 1, 2, 3, 4
        await add(store, 1, clock)
        await writer.write_pending()
        clock.advance(DAY)
    (folder / "notes.txt").write_text("keep me")
    (folder / "CONNECTLOG20261101-1.LOG").write_text("not ours")
    clock = FakeClock(utc("2026-11-04T00:00:01"))  # Nov 1 ended 3 days ago, Nov 2 two days
    writer.clock = clock
    deleted = writer.delete_old_files()
    assert [p.name for p in deleted] == ["MSGTRK20261101-1.LOG"]
    assert log_names(folder) == ["MSGTRK20261102-1.LOG", "MSGTRK20261103-1.LOG",
                                 "MSGTRK20261104-1.LOG"]
    assert (folder / "notes.txt").exists() and (folder / "CONNECTLOG20261101-1.LOG").exists()
    assert TrackingLogWriter(store, folder, clock, max_age=0).delete_old_files() == []


async def test_oldest_files_go_when_the_folder_is_over_max_directory_size(
        store: SqliteStore, tmp_path: Path) -> None:
    """Over MaxDirectorySize the oldest log files are deleted until the rest fit; only
    MSGTRK*.LOG files count, and the file being written today is never deleted."""
    clock = FakeClock(utc("2026-11-29T10:00:00"))
    folder = folder_of(tmp_path)
    folder.mkdir(parents=True)
    (folder / "big-unrelated.bin").write_bytes(b"x" * 100_000)
    await add(store, 40, clock, subject="y" * 200)
    writer = TrackingLogWriter(store, folder, clock, max_file_size=3000,
                               max_directory_size=7000)
    await writer.write_pending()
    names = log_names(folder)
    sizes = {n: (folder / n).stat().st_size for n in names}
    writer.delete_old_files()
    kept = log_names(folder)
    assert len(names) > len(kept) > 1
    assert kept == names[-len(kept):]          # the newest ones ...
    assert sum(sizes[n] for n in kept) <= 7000
    # ... and no more were deleted than needed.
    assert sum(sizes[n] for n in names[-len(kept) - 1:]) > 7000
    assert (folder / "big-unrelated.bin").exists()
    # A limit below the current file's size still keeps the current file.
    writer.max_directory_size = 1
    writer.delete_old_files()
    assert log_names(folder) == [names[-1]]
    assert writer.position is not None and writer.position.file == names[-1]


async def test_an_idle_current_file_from_an_earlier_day_ages_out(
        store: SqliteStore, tmp_path: Path) -> None:
    """The last file written stops being protected once its day is over: an idle node's
    old log is deleted by age, and the next event starts a new file."""
    clock = FakeClock(utc("2026-11-01T12:00:00"))
    folder = folder_of(tmp_path)
    writer = TrackingLogWriter(store, folder, clock, max_age=DAY)
    await add(store, 1, clock)
    await writer.write_pending()
    clock.advance(3 * DAY)
    assert [p.name for p in writer.delete_old_files()] == ["MSGTRK20261101-1.LOG"]
    await add(store, 1, clock)
    await writer.write_pending()
    assert log_names(folder) == ["MSGTRK20261104-1.LOG"]
    assert all_log_ids(folder) == [2]


# -- exactly once ------------------------------------------------------------------------


async def test_restart_goes_on_without_duplicates_or_gaps(store: SqliteStore,
                                                         tmp_path: Path) -> None:
    """A new writer on the same folder (a node restart) appends after the last event
    written, to the same day's file: every event once, in order. The state file is
    JSON with the last id, and no temp file is left."""
    clock = FakeClock(utc("2026-11-29T10:00:00"))
    folder = folder_of(tmp_path)
    await add(store, 3, clock)
    assert await TrackingLogWriter(store, folder, clock).write_pending() == 3
    await add(store, 2, clock)
    second = TrackingLogWriter(store, folder, clock)
    assert await second.write_pending() == 2
    assert await second.write_pending() == 0
    assert log_names(folder) == ["MSGTRK20261129-1.LOG"]
    assert all_log_ids(folder) == [1, 2, 3, 4, 5]
    state = json.loads((folder / STATE_FILE).read_text())
    assert state["last_id"] == 5 and state["file"] == "MSGTRK20261129-1.LOG"
    assert state["size"] == (folder / "MSGTRK20261129-1.LOG").stat().st_size
    assert sorted(p.name for p in folder.iterdir()) == ["MSGTRK20261129-1.LOG", STATE_FILE]


async def test_lines_written_before_a_crash_but_not_recorded_are_not_repeated(
        store: SqliteStore, tmp_path: Path) -> None:
    """A crash after lines reached the file but before the state recorded them (and a
    torn last line) leaves bytes past the recorded size: the next writer cuts them and
    writes those events again, once."""
    clock = FakeClock(utc("2026-11-29T10:00:00"))
    folder = folder_of(tmp_path)
    await add(store, 3, clock)
    await TrackingLogWriter(store, folder, clock).write_pending()
    recorded = (folder / STATE_FILE).read_bytes()
    await add(store, 2, clock)
    await TrackingLogWriter(store, folder, clock).write_pending()
    # Back to the moment before the state's rename, with half a line more on disk.
    (folder / STATE_FILE).write_bytes(recorded)
    with open(folder / "MSGTRK20261129-1.LOG", "ab") as fh:
        fh.write(b"2026-11-29T10:00:00.000Z,,,,host,ctx,,PICK")
    await TrackingLogWriter(store, folder, clock).write_pending()
    assert all_log_ids(folder) == [1, 2, 3, 4, 5]


async def test_without_its_state_file_the_log_goes_on_after_the_last_log_id(
        store: SqliteStore, tmp_path: Path) -> None:
    """If the state file is lost, the highest log-id in the newest file says where the
    log stopped: nothing is written twice, and it goes on in a new file."""
    clock = FakeClock(utc("2026-11-29T10:00:00"))
    folder = folder_of(tmp_path)
    await add(store, 3, clock, subject="#1\n#2")
    await TrackingLogWriter(store, folder, clock).write_pending()
    (folder / STATE_FILE).unlink()
    await add(store, 2, clock)
    await TrackingLogWriter(store, folder, clock).write_pending()
    assert log_names(folder) == ["MSGTRK20261129-1.LOG", "MSGTRK20261129-2.LOG"]
    assert all_log_ids(folder) == [1, 2, 3, 4, 5]


async def test_a_failed_write_loses_nothing(store: SqliteStore, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """While the folder cannot be written the background task logs the error once and
    keeps its position; when the folder is back, the waiting events are written, once."""
    clock = FakeClock(utc("2026-11-29T10:00:00"))
    folder = folder_of(tmp_path)
    writer = TrackingLogWriter(store, folder, clock, interval=0.05)
    await add(store, 2, clock)
    await writer.write_pending()
    folder.rename(tmp_path / "moved")
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("a file where the folder should be")
    await add(store, 2, clock)
    with caplog.at_level(logging.ERROR, logger="mailgate.tracking_log"):
        task = asyncio.create_task(writer.run())
        try:
            await asyncio.sleep(0.4)
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1 and "cannot write" in errors[0].getMessage()
            folder.unlink()
            for _ in range(100):
                if folder.exists() and all_log_ids(folder) == [3, 4]:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert all_log_ids(folder) == [3, 4]
    assert all_log_ids(tmp_path / "moved") == [1, 2]


# -- the background task -----------------------------------------------------------------


class CountingStore(SqliteStore):
    """The real store, counting how often the log asks it for new events."""

    reads = 0

    async def tracking_log_lines(self, after_id: int, limit: int, subjects: bool,
                                 version: str) -> list[tuple[int, str]]:
        self.reads += 1
        return await super().tracking_log_lines(after_id, limit, subjects, version)


async def test_run_writes_new_events_within_seconds_and_idles_cheaply(
        tmp_path: Path) -> None:
    """run() wakes once a second: a new event is in the file within about a second,
    and an idle second costs one read of the store (no busy loop)."""
    store = CountingStore(tmp_path / "mailgate.db", node="testnode")
    clock = FakeClock(utc("2026-11-29T10:00:00"))
    folder = folder_of(tmp_path)
    task = asyncio.create_task(TrackingLogWriter(store, folder, clock).run())
    try:
        await add(store, 1, clock)
        for _ in range(50):
            if folder.exists() and all_log_ids(folder) == [1]:
                break
            await asyncio.sleep(0.05)
        assert all_log_ids(folder) == [1]
        reads = store.reads
        await asyncio.sleep(2.5)
        assert 1 <= store.reads - reads <= 4
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


async def test_tracking_log_lines_returns_events_by_increasing_id(store: SqliteStore) -> None:
    """Store.tracking_log_lines(after_id, limit, ...) pages through the events in id order,
    whatever their timestamps, with ids that a later page starts after."""
    clock = FakeClock(utc("2026-11-29T10:00:00"))
    await add(store, 3, clock)
    await store.add_tracking([TrackingEvent("DEFER", "QUEUE", timestamp=utc("2020-01-01"))])
    first = await store.tracking_log_lines(0, 2, True, "1")
    assert [i for i, _ in first] == [1, 2]
    rest = await store.tracking_log_lines(first[-1][0], 10, True, "1")
    assert [i for i, _ in rest] == [3, 4]
    assert ",DEFER," in rest[-1][1] and "<m2@contoso.test>" in rest[0][1]
    assert all(line.endswith("\r\n") for _, line in first + rest)
    assert await store.tracking_log_lines(4, 10, True, "1") == []


async def test_lines_quote_like_the_csv_module_and_keep_times_to_the_millisecond(
        store: SqliteStore, tmp_path: Path) -> None:
    """Fields with commas, quotes, CR or LF are quoted with quotes doubled, exactly as
    Python's csv module does; times are truncated to milliseconds like `clock.iso`."""
    import csv
    import io

    from mailgate.clock import iso

    hostile = 'a, "b"\r\nc'
    stamps = [1_800_000_000.5774999, 1_800_000_000.0, 1_800_000_001.999]
    for i, ts in enumerate(stamps):
        await store.add_tracking([TrackingEvent(
            "FAIL", "QUEUE", timestamp=ts, subject=hostile, recipients=["x,y@z", 'q"@r'],
            recipient_status=["550 5.0.0 no, never"], sender=f"s{i}@contoso.test")])
    lines = await store.tracking_log_lines(0, 10, True, "0.1")
    for (_, line), ts in zip(lines, stamps):
        [row] = list(csv.reader(io.StringIO(line)))
        assert row[0] == iso(ts)
        assert row[18] == hostile
        assert row[12] == 'x,y@z;q"@r' and row[13] == "550 5.0.0 no, never"
        assert row[15] == "2"
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\r\n").writerow(row)
        assert line == buf.getvalue()
    no_subjects = await store.tracking_log_lines(0, 1, False, "0.1")
    assert list(csv.reader(io.StringIO(no_subjects[0][1])))[0][18] == ""