"""The message tracking log as files, in Exchange's format (reference §6.1).

Contract:
- Files `MSGTRK<yyyymmdd>-<n>.LOG` in one folder; the date is the UTC date (from the
  injected clock) on which the file was created and `n` restarts at 1 each day. A file
  only ever receives lines on its own UTC day: at midnight the next line goes to a new
  file, as does a line that would take the file over `max_file_size` (a file holds at
  least one event, so a single line larger than the limit still gets written).
- Each file starts with `#Software:`, `#Version:`, `#Log-type: Message Tracking Log`,
  `#Date:` (creation time, ISO 8601 UTC) and `#Fields:` with Exchange's 30 fields in
  Exchange's order; then one CSV line (csv module quoting, CRLF) per event.
  `recipient-address` and `recipient-status` are `;`-joined, `log-id` is the event's id
  in the store, columns mailgate does not record are empty.
- Every event of the store is written exactly once, in the order of its id: the writer
  reads events above the last id written (`Store.tracking_after`) and, after each batch
  is fsynced, records `{last id, file, committed size}` in a state file next to the logs
  (temp + fsync + rename). Bytes past the committed size are a batch that was not
  recorded (a crash between the two) and are cut off before the next write, then written
  again. Without a state file the last `log-id` in the newest log file says where to go
  on; without either, writing starts at the first event in the store.
- Circular logging: the oldest files go when the folder's `MSGTRK*.LOG` files exceed
  `max_directory_size`, and files go once they are older than `max_age`, a file's age
  counting from the end of its UTC day (the last moment a line can have gone into it).
  The file being written is never deleted. Checked at start, after each new file and
  every few minutes.
- `run()` wakes once a second; an idle tick is one indexed read of the store. File work
  runs in a worker thread so the event loop never waits for a disk.

Limits as Exchange's Set-TransportService MessageTrackingLog* settings: sizes in bytes,
ages in seconds, None (or a zero age) meaning no limit.

The ids come from `tracking_events.id` (a rowid, assigned by SQLite's one writer at a
time in commit order). Deleting the newest events would let SQLite reuse their ids;
any future pruning of tracking events must keep the newest row.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import itertools
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from mailgate import __version__
from mailgate.aio import log_failure
from mailgate.clock import Clock, SystemClock, iso, utc
from mailgate.directory import OrganizationCache
from mailgate.organization import TransportService
from mailgate.store import Store

log = logging.getLogger(__name__)

FIELDS = (
    "date-time", "client-ip", "client-hostname", "server-ip", "server-hostname",
    "source-context", "connector-id", "source", "event-id", "internal-message-id",
    "message-id", "network-message-id", "recipient-address", "recipient-status",
    "total-bytes", "recipient-count", "related-recipient-address", "reference",
    "message-subject", "sender-address", "return-path", "message-info", "directionality",
    "tenant-id", "original-client-ip", "original-server-ip", "custom-data",
    "transport-traffic-type", "log-id", "schema-version",
)
LOG_ID = FIELDS.index("log-id")
PREFIX = "MSGTRK"
STATE_FILE = "mailgate-tracking-log.state"
_NAME = re.compile(r"MSGTRK(\d{8})-(\d+)\.LOG")
_DAY = 86400.0
MB = 1024 * 1024
DEFAULT_MAX_AGE = 30 * _DAY
DEFAULT_MAX_DIRECTORY_SIZE = 1000 * MB
DEFAULT_MAX_FILE_SIZE = 10 * MB
CLEANUP_INTERVAL = 300.0   # seconds of clock time between age/size checks when idle
BATCH_SIZE = 1000


@dataclass
class LogPosition:
    """What the log holds: every event up to `last_id`, in the first `size` bytes of
    `file` and the files before it."""

    last_id: int = 0
    file: str | None = None
    size: int = 0


@dataclass(frozen=True)
class LogFile:
    day: str       # yyyymmdd
    number: int
    path: Path

    @property
    def order(self) -> tuple[str, int]:
        return (self.day, self.number)


def log_files(folder: Path) -> list[LogFile]:
    """The tracking log files in `folder`, oldest first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = _NAME.fullmatch(name)
        if m:
            found.append(LogFile(m.group(1), int(m.group(2)), folder / name))
    return sorted(found, key=lambda f: f.order)


def _day(ts: float) -> str:
    return utc(ts).strftime("%Y%m%d")


def _text(value: object) -> str:
    return "" if value is None else str(value)


class TrackingLogWriter:
    """Appends the store's tracking events to the daily CSV files in `folder`."""

    def __init__(self, store: Store, folder: Path, clock: Clock | None = None, *,
                 max_age: float | None = DEFAULT_MAX_AGE,
                 max_directory_size: int | None = DEFAULT_MAX_DIRECTORY_SIZE,
                 max_file_size: int = DEFAULT_MAX_FILE_SIZE,
                 subject_logging: bool = True,
                 interval: float = 1.0, batch_size: int = BATCH_SIZE) -> None:
        if max_file_size < 1:
            raise ValueError("max_file_size must be at least 1 byte")
        self.store = store
        self.folder = Path(folder)
        self.clock = clock or SystemClock()
        self.max_age = max_age or None
        self.max_directory_size = max_directory_size
        self.max_file_size = max_file_size
        self.subject_logging = subject_logging
        self.interval = interval
        self.batch_size = batch_size
        self._position: LogPosition | None = None   # None until read from the folder
        self._last_cleanup: float | None = None
        self._last_error: str | None = None

    # -- the background task ------------------------------------------------------------

    async def run(self) -> None:
        """Write new events once a second until cancelled. Failures (full disk, a missing
        store) are logged when they start and when they end; nothing is lost meanwhile,
        since the position only moves after a batch is on disk."""
        while True:
            try:
                await self.write_pending()
                if self._cleanup_due():
                    await asyncio.to_thread(self.delete_old_files)
                if self._last_error is not None:
                    log.info("message tracking log: writing again to %s", self.folder)
                    self._last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the log must not stop the node
                if str(exc) != self._last_error:
                    log.error("message tracking log: cannot write to %s: %s",
                              self.folder, exc)
                self._last_error = str(exc)
            await asyncio.sleep(self.interval)

    async def write_pending(self) -> int:
        """Write every event the store has beyond the log's position; returns how many."""
        if self._position is None:
            self._position = await asyncio.to_thread(self._load_position)
        written = 0
        while True:
            batch = await self.store.tracking_log_lines(
                self._position.last_id, self.batch_size, self.subject_logging, __version__)
            if not batch:
                return written
            await asyncio.to_thread(self._append, batch)
            written += len(batch)
            if len(batch) < self.batch_size:
                return written

    @property
    def position(self) -> LogPosition | None:
        return self._position

    # -- position ---------------------------------------------------------------------

    def _load_position(self) -> LogPosition:
        state = self.folder / STATE_FILE
        try:
            data = json.loads(state.read_text(encoding="utf-8"))
            return LogPosition(last_id=int(data["last_id"]), file=data.get("file"),
                               size=int(data.get("size", 0)))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("message tracking log: ignoring unreadable %s (%s)", state, exc)
        return self._position_from_logs()

    def _position_from_logs(self) -> LogPosition:
        """The highest log-id in the newest file that has one; a new file follows, so
        that a partly written last line is never appended to."""
        for f in reversed(log_files(self.folder)):
            with open(f.path, encoding="utf-8", errors="replace", newline="") as fh:
                # Header lines only at the top: a quoted subject may hold a line with '#'.
                body = itertools.dropwhile(lambda line: line.startswith("#"), fh)
                ids = [int(row[LOG_ID]) for row in csv.reader(body)
                       if len(row) == len(FIELDS) and row[LOG_ID].isdigit()]
            if ids:
                log.warning("message tracking log: no %s; going on after event %d, the "
                            "last in %s", STATE_FILE, max(ids), f.path.name)
                return LogPosition(last_id=max(ids))
        return LogPosition()

    def _commit(self, position: LogPosition) -> None:
        """Record `position` durably: write a temp file, fsync, rename over the state."""
        tmp = self.folder / f".{STATE_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(position)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / STATE_FILE)
        self._fsync_folder()
        self._position = position

    def _fsync_folder(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- writing ----------------------------------------------------------------------

    def _append(self, batch: list[tuple[int, str]]) -> None:
        """Append `batch` (increasing ids, all above the position), then commit."""
        assert self._position is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        last_id = self._position.last_id
        day = _day(self.clock.now())
        name, fh, size, fresh = self._open_for(self._position, day)
        try:
            for event_id, line in self._lines(batch):
                if not fresh and size + len(line) > self.max_file_size:
                    self._close(fh)
                    self._commit(LogPosition(last_id, name, size))
                    name, fh, size, fresh = self._new_file(day, last_id)
                fh.write(line)
                size += len(line)
                last_id = event_id
                fresh = False
            self._close(fh)
        except BaseException:
            fh.close()
            raise
        self._commit(LogPosition(last_id, name, size))

    def _open_for(self, position: LogPosition, day: str
                  ) -> tuple[str, BinaryIO, int, bool]:
        """The file to append to (name, handle at the committed size, size, whether it
        was just made): the position's file while it is today's, else a new one."""
        if position.file is not None:
            path = self.folder / position.file
            self._cut_uncommitted_tail(path, position.size)
            m = _NAME.fullmatch(position.file)
            if m is not None and m.group(1) == day and position.size < self.max_file_size:
                try:
                    fh = open(path, "r+b")
                except FileNotFoundError:
                    pass   # deleted by hand: go on in a new file
                else:
                    if fh.seek(0, os.SEEK_END) == position.size:
                        return position.file, fh, position.size, False
                    fh.close()   # shortened by hand: leave it as it is
        return self._new_file(day, position.last_id)

    @staticmethod
    def _cut_uncommitted_tail(path: Path, committed: int) -> None:
        try:
            with open(path, "r+b") as fh:
                if fh.seek(0, os.SEEK_END) > committed:
                    fh.truncate(committed)
                    fh.flush()
                    os.fsync(fh.fileno())
        except FileNotFoundError:
            pass

    def _new_file(self, day: str, last_id: int) -> tuple[str, BinaryIO, int, bool]:
        """Create the day's next file with its header lines and make it the position's
        file (so a crash before its first commit leaves nothing to repeat)."""
        number = max((f.number for f in log_files(self.folder) if f.day == day),
                     default=0) + 1
        name = f"{PREFIX}{day}-{number}.LOG"
        header = self._header().encode("utf-8")
        fh = open(self.folder / name, "xb")
        try:
            fh.write(header)
            fh.flush()
            os.fsync(fh.fileno())
            self._commit(LogPosition(last_id, name, len(header)))
        except BaseException:
            fh.close()
            raise
        # A new file is when Exchange looks at the folder's limits too.
        self._last_cleanup = None
        return name, fh, len(header), True

    def _header(self) -> str:
        lines = [f"#Software: mailgate {__version__}",
                 f"#Version: {__version__}",
                 "#Log-type: Message Tracking Log",
                 f"#Date: {iso(self.clock.now())}",
                 f"#Fields: {','.join(FIELDS)}"]
        return "".join(line + "\r\n" for line in lines)

    @staticmethod
    def _close(fh: BinaryIO) -> None:
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()

    @staticmethod
    def _lines(batch: list[tuple[int, str]]) -> Iterator[tuple[int, bytes]]:
        # The store renders each line (store/sqlite_tracking_log.py).
        for event_id, line in batch:
            yield event_id, line.encode("utf-8")

    # -- circular logging --------------------------------------------------------------

    def _cleanup_due(self) -> bool:
        return (self._last_cleanup is None
                or self.clock.now() - self._last_cleanup >= CLEANUP_INTERVAL)

    def delete_old_files(self) -> list[Path]:
        """Delete the files past `max_age`, then the oldest while the folder's log files
        exceed `max_directory_size`; never the file being written. Returns what went."""
        now = self.clock.now()
        self._last_cleanup = now
        every = log_files(self.folder)
        # Only today's file can still grow; an older "current" file never will again.
        current = self._position.file if self._position else None
        files = [f for f in every if not (f.path.name == current and f.day == _day(now))]
        doomed: list[LogFile] = []
        if self.max_age is not None:
            doomed = [f for f in files if now - self._day_end(f.day) > self.max_age]
        if self.max_directory_size is not None:
            total = sum(self._size(f.path) for f in every if f not in doomed)
            for f in files:
                if total <= self.max_directory_size:
                    break
                if f not in doomed:
                    doomed.append(f)
                    total -= self._size(f.path)
        deleted = []
        for f in doomed:
            try:
                f.path.unlink()
                deleted.append(f.path)
            except FileNotFoundError:
                pass
        if deleted:
            log.info("message tracking log: deleted %s",
                     ", ".join(p.name for p in deleted))
        return deleted

    @staticmethod
    def _day_end(day: str) -> float:
        start = dt.datetime.strptime(day, "%Y%m%d").replace(tzinfo=dt.timezone.utc)
        return start.timestamp() + _DAY

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0


class TrackingLogService:
    """Runs the TrackingLogWriter the transport settings ask for, and starts it again with
    the new settings when MessageTrackingLog* settings change while the node runs."""

    def __init__(self, store: Store, orgs: OrganizationCache, data_dir: Path,
                 clock: Clock, check_every: float = 5.0) -> None:
        self.store = store
        self.orgs = orgs
        self.data_dir = data_dir
        self.clock = clock
        self.check_every = check_every
        self.writer: TrackingLogWriter | None = None

    def _wanted(self, ts: TransportService) -> tuple[Any, ...] | None:
        if not ts.message_tracking_log_enabled or ts.message_tracking_log_path is None:
            return None
        return (ts.resolve(self.data_dir, ts.message_tracking_log_path),
                ts.message_tracking_log_max_age, ts.message_tracking_log_max_directory_size,
                ts.message_tracking_log_max_file_size,
                ts.message_tracking_log_subject_logging_enabled)

    async def run(self) -> None:
        current: tuple[Any, ...] | None = None
        task: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    wanted = self._wanted((await self.orgs.get()).transport)
                except Exception as exc:  # noqa: BLE001 - e.g. out of descriptors: retried
                    log_failure(log, "message tracking log: cannot read the settings", exc)
                    await asyncio.sleep(self.check_every)
                    continue
                if wanted != current:
                    if task is not None:
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                        task, self.writer = None, None
                    if wanted is not None:
                        folder, age, dir_size, file_size, subjects = wanted
                        self.writer = TrackingLogWriter(
                            self.store, folder, self.clock, max_age=age,
                            max_directory_size=dir_size, max_file_size=file_size,
                            subject_logging=subjects)
                        task = asyncio.create_task(self.writer.run(), name="tracking-log")
                    current = wanted
                await asyncio.sleep(self.check_every)
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
