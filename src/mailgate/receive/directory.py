"""A submission directory: the file-claiming service that Pickup and Replay share
(PRODUCT §4.5 and §5, reference §2.1–2.2, §2.7, §2.9).

A foreign system drops `*.eml` files into a folder; the service claims each complete file by
renaming it, turns it into a message (the subclass's `_prepare`: how a file is parsed is all
that differs between Pickup and Replay), and deletes the file only after the message is
committed. Guarantees, the same for every directory:

- the folder is the one its TransportService setting names (`_path_value`), re-read while
  running: a new path is used at once (and created), the old folder is left alone, `$null`
  disables the service, and a folder that disappears is created again;
- new files are noticed within ~100 ms (inotify wakes the scanner; the scan, every second
  otherwise, is what is authoritative); one listing is worked through batch by batch;
- only regular `*.eml` files with one link are read, and only once complete (a Linux read
  lease cannot be taken while a writer has the file open; where leases are unavailable the
  file must be unchanged for a second); symbolic links, FIFOs, sockets, directories and hard
  links are renamed to `.bad` without being read (a symbolic link is never followed);
- a claimed file is renamed `<name>.<node>-<token>.tmp` (not `.tmp`, so writers may use
  `.tmp` for their own temporary files); the subclass gives each message a `source_key`
  made of the token and the content hash, and the store refuses a key it has already
  committed, so a claimed file that survives a crash (before or after its commit) is
  submitted exactly once after the restart;
- batches are committed by the store's group commit while the next batch is read; a file is
  deleted only after its batch is committed, and given back (renamed to its dropped name)
  if the store failed;
- a file that cannot be submitted becomes `<name>.bad` with `<name>.bad.reason`
  (`badmail.py`) and a BADMAIL tracking event; when the parser says an NDR is due (`ndr`
  with a valid sender), the NDR is committed and then the file deleted;
- `PickupDirectoryMaxMessagesPerMinute` limits each directory on its own (default:
  unlimited).
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures as cf
import email.utils
import errno
import fcntl
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator

from mailgate import tracking
from mailgate.aio import log_failure, wait_event
from mailgate.clock import Clock, utc
from mailgate.core.status import Status
from mailgate.directory import OrganizationCache
from mailgate.dsn import FailedRecipient
from mailgate.faults import crash_point
from mailgate.ids import time_ordered_hex16
from mailgate.organization import Organization, TransportService
from mailgate.receive.backpressure import DiskSpace
from mailgate.receive.badmail import move_to_badmail, one_line
from mailgate.receive.filecontent import read_from
from mailgate.receive.pickup_parse import PickupError, normalise_line_endings
from mailgate.receive.submit import Inbound, Submitter
from mailgate.receive.watch import FolderWatch
from mailgate.store import NewMessage, Store, StoreError

log = logging.getLogger(__name__)

STABLE_SECONDS = 1.0
MAX_BATCHES_IN_FLIGHT = 3
PREPARERS = 2
STORE_TIMEOUT = 60.0
SEEN_RETENTION = 30 * 86400.0  # how long a claimed file is remembered after its commit
NDR_HEADER_BYTES = 64 * 1024  # how much of a refused file's header an NDR quotes at most
_BLANK_LINE = re.compile(rb"\n\r?\n")
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)


def node_tag(node: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", node) or "node"


@dataclass
class Claimed:
    name: str            # the file name as dropped
    tmp: Path            # where it is now (claimed): <name>.<node>-<token>.tmp
    fd: int
    st: os.stat_result
    token: str


@dataclass
class DirectoryCounters:
    submitted: int = 0
    duplicates: int = 0
    bad: int = 0
    ndr: int = 0


@dataclass
class Prepared:
    claimed: Claimed
    message: NewMessage


@dataclass
class SubmissionDirectory(abc.ABC):
    """The service for one directory; a subclass names its setting and parses its files."""

    LABEL: ClassVar[str]    # "Pickup", "Replay": in log lines, Received: fields, thread names
    SOURCE: ClassVar[str]   # the tracking source of RECEIVE, FAIL and BADMAIL events
    CRASH: ClassVar[str]    # prefix of the crash points "<CRASH>-after-claim", "-after-commit"

    store: Store
    orgs: OrganizationCache
    submitter: Submitter
    clock: Clock
    data_dir: Path
    hostname: str
    on_submitted: Callable[[], None] = lambda: None
    poll_interval: float = 1.0
    batch: int = 200
    counters: DirectoryCounters = field(default_factory=DirectoryCounters)
    disk: DiskSpace | None = None     # back pressure: paused while the disk is nearly full

    def __post_init__(self) -> None:
        self.node = self.store.node
        self._tag = node_tag(self.node)
        self._leftover = re.compile(
            r"^(?P<orig>.+\.eml)\." + re.escape(self._tag) + r"-(?P<token>[0-9a-f]{16})\.tmp$",
            re.I)
        self._after_claim = f"{self.CRASH}-after-claim"
        self._disk_low_logged = False
        self._after_commit = f"{self.CRASH}-after-commit"
        self._wake = asyncio.Event()
        self._unreadable: set[str] = set()
        # Files not ready yet (still being written, unreadable): name -> (next try, delay).
        self._not_ready: dict[str, tuple[float, float]] = {}
        self._tokens = 0.0
        self._tokens_at = 0.0
        self._path: Path | None = None
        self._watch: FolderWatch | None = None
        self._pause_until = 0.0
        self._inflight: set[str] = set()       # claimed files not yet settled
        self._order: dict[str, int] = {}       # first-seen order of waiting files
        self._seq = 0
        self._backlog: list[str] = []          # names of the last scan not yet tried
        self._received_cache: tuple[int, bytes] = (-1, b"")
        self._prune_at = 0.0
        self._missing_logged = False
        self._settling: set[asyncio.Task[None]] = set()
        self._deleter = cf.ThreadPoolExecutor(
            1, thread_name_prefix=f"mailgate-{self.LABEL.lower()}-delete")

    # -- what a subclass provides ----------------------------------------------------

    @abc.abstractmethod
    def _path_value(self, ts: TransportService) -> str | None:
        """The directory's setting (None: disabled)."""

    @abc.abstractmethod
    def _prepare(self, org: Organization, c: Claimed) -> Prepared:
        """Parse the claimed file into the message to store; PickupError when it cannot be
        submitted (badmail, or an NDR when `ndr` and `sender` are set)."""

    def _folder(self, org: Organization) -> Path | None:
        """The folder to watch now."""
        return org.transport.resolve(self.data_dir, self._path_value(org.transport))

    def _ndr_original(self, c: Claimed, head: bytes,
                      exc: PickupError) -> tuple[int, str | None, str | None]:
        """Where the original message starts in the file whose header block (at most
        NDR_HEADER_BYTES) is `head`, and the Subject and Message-ID an NDR for `exc` names.
        The whole file is the message, unless a subclass says otherwise."""
        return 0, exc.subject, exc.message_id

    # -- main loop -------------------------------------------------------------------

    async def run(self) -> None:
        label = self.LABEL
        try:
            while True:
                try:
                    org = await self.orgs.get()
                    path = self._folder(org)
                    if path != self._path:
                        await self._switch(path)
                except Exception as exc:  # noqa: BLE001 - e.g. out of descriptors: retried
                    log_failure(log, f"{label}: cannot read the settings, retrying in 1 s", exc)
                    await asyncio.sleep(1.0)
                    continue
                more = False
                if time.monotonic() >= self._prune_at:
                    # Claim records only matter while a claimed file may still be on disk.
                    self._prune_at = time.monotonic() + 3600.0
                    try:
                        await self.store.forget_pickup_keys(self.clock.now() - SEEN_RETENTION)
                    except StoreError as exc:
                        log.warning("cannot prune old %s claim records: %s", label, exc)
                if path is not None and time.monotonic() >= self._pause_until:
                    try:
                        more = await self.process_once(org, path)
                    except StoreError as exc:
                        log.error("%s paused for 5 s: the store failed: %s", label, exc)
                        self._pause_until = time.monotonic() + 5.0
                    except Exception as exc:  # noqa: BLE001 - one bad batch must not stop it
                        log_failure(log, f"{label} batch failed, retrying in 1 s", exc)
                        self._pause_until = time.monotonic() + 1.0
                if more:
                    await asyncio.sleep(0)
                    continue
                wait = self.poll_interval if not self._not_ready else min(self.poll_interval, 0.2)
                await wait_event(self._wake, wait)
                self._wake.clear()
        finally:
            if self._watch is not None:
                self._watch.close()
            # Files of batches being committed are deleted (or given back) before we stop.
            await asyncio.shield(self.drain())
            self._deleter.shutdown(wait=True)

    async def _switch(self, path: Path | None) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self._path = path
        self._backlog = []
        if path is None:
            log.info("%s directory disabled", self.LABEL)
            return
        path.mkdir(parents=True, exist_ok=True)
        log.info("%s directory: %s", self.LABEL, path)
        # Notifications only wake the scanner sooner; the scan is what is authoritative.
        watch = FolderWatch(path, self._wake)
        if watch.start():
            self._watch = watch

    # -- one batch -------------------------------------------------------------------

    def _candidates(self, path: Path) -> list[str]:
        """Our leftover claimed files first, then `*.eml` files in the order they were first
        seen (names found by the same scan in name order). No stat per file: a folder of
        thousands of files is listed in milliseconds."""
        leftovers: list[str] = []
        fresh: list[str] = []
        order: dict[str, int] = {}
        now = time.monotonic()
        with os.scandir(path) as it:
            for entry in it:
                n = entry.name
                if n in self._inflight:
                    continue
                if self._leftover.match(n):
                    leftovers.append(n)
                elif n[-4:].lower() == ".eml" and not n.startswith("."):
                    retry = self._not_ready.get(n)
                    if retry is not None and retry[0] > now:
                        order[n] = self._order.get(n, 0)
                        continue
                    seq = self._order.get(n)
                    if seq is None:
                        fresh.append(n)
                    else:
                        order[n] = seq
        for n in sorted(fresh):
            self._seq += 1
            order[n] = self._seq
        self._order = order
        self._not_ready = {n: v for n, v in self._not_ready.items() if n in order}
        due = [n for n in order if n not in self._not_ready or self._not_ready[n][0] <= now]
        return leftovers + sorted(due, key=order.__getitem__)

    def _rate_allowance(self, org: Organization) -> int:
        rate = org.transport.pickup_directory_max_messages_per_minute
        if rate is None:
            return self.batch
        now = time.monotonic()
        if self._tokens_at == 0.0:
            self._tokens = float(rate)
        else:
            self._tokens = min(float(rate), self._tokens + (now - self._tokens_at) * rate / 60.0)
        self._tokens_at = now
        return min(self.batch, int(self._tokens))

    async def process_once(self, org: Organization, path: Path) -> bool:
        """Claim and submit up to one batch of files. Returns True when more files are
        waiting. The commit of a batch is awaited in the background (`_settle`), so the next
        batch is read while the previous one is being committed."""
        allowance = self._rate_allowance(org)
        if allowance <= 0:
            return False
        if self.disk is not None and self.disk.low():
            if not self._disk_low_logged:
                log.warning("%s paused: the disk of %s is nearly full", self.LABEL,
                            self.data_dir)
                self._disk_low_logged = True
            return False
        self._disk_low_logged = False
        try:
            # A scan lists the whole folder; its names are worked through batch by batch
            # before the next scan, so a backlog of thousands costs one listing, not one
            # per batch. Files that arrive meanwhile come after the backlog anyway.
            if not self._backlog:
                self._backlog = await asyncio.to_thread(self._candidates, path)
        except FileNotFoundError:
            # The folder vanished (deleted, volume unmounted): say so once, make it again.
            if not self._missing_logged:
                log.warning("%s directory %s does not exist; creating it", self.LABEL, path)
                self._missing_logged = True
            try:
                path.mkdir(parents=True, exist_ok=True)
                self._missing_logged = False
                await self._switch(path)
            except OSError as exc:
                log.debug("cannot create %s: %s", path, exc)
            return False
        if not self._backlog:
            return False
        names, self._backlog = self._backlog[:allowance], self._backlog[allowance:]
        # Read the configuration after listing the folder: a file dropped after a CLI
        # change returned is routed with that change.
        org = await self.orgs.get(fresh=True)
        # Two preparers work on alternate files: while one waits in a system call (open,
        # rename, read), the other parses.
        if allowance >= 2 * PREPARERS and len(names) > 1:
            share = allowance // PREPARERS
            parts = await asyncio.gather(*(
                asyncio.to_thread(self._prepare_batch, org, path, names[k::PREPARERS], share)
                for k in range(PREPARERS)))
            prepared = [p for part in parts for p in part]
            allowance = share * PREPARERS
        else:
            prepared = await asyncio.to_thread(self._prepare_batch, org, path, names, allowance)
        if prepared:
            if org.transport.pickup_directory_max_messages_per_minute is not None:
                self._tokens -= len(prepared)
            future = self.store.submit_batch([p.message for p in prepared])
            task = asyncio.create_task(self._settle(prepared, future))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
            while len(self._settling) >= MAX_BATCHES_IN_FLIGHT:
                await asyncio.wait(self._settling, return_when=asyncio.FIRST_COMPLETED)
        # More waiting if the backlog holds names or this batch used its whole allowance;
        # files that are not ready yet are retried on their own schedule, not in a busy loop.
        return bool(self._backlog) or len(prepared) >= allowance

    async def drain(self) -> None:
        """Wait until every submitted batch has settled (committed and files deleted)."""
        while self._settling:
            await asyncio.wait(self._settling)

    async def _settle(self, prepared: list[Prepared],
                      future: cf.Future[list[int | None | BaseException]]) -> None:
        results: list[int | None | BaseException]
        try:
            results = await asyncio.wrap_future(future)
        except Exception as exc:  # noqa: BLE001 - the whole batch was not stored
            results = [exc] * len(prepared)
        done: list[Claimed] = []
        failed: list[Claimed] = []
        error: BaseException | None = None
        for p, result in zip(prepared, results):
            if isinstance(result, BaseException):
                error = result
                failed.append(p.claimed)
                continue
            if result is None:
                self.counters.duplicates += 1
            else:
                self.counters.submitted += 1
            done.append(p.claimed)
        if done:
            self.on_submitted()
        # The messages are committed: only now may their files go. Deleting frees blocks
        # (slow with online discard), so it runs on its own thread, off the critical path.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._deleter, self._finish_all, done, failed)
        if error is not None:
            log.error("%s paused for 5 s: the store failed: %s", self.LABEL, error)
            self._pause_until = time.monotonic() + 5.0

    def _finish_all(self, done: list[Claimed], failed: list[Claimed]) -> None:
        for c in done:
            crash_point(self._after_commit)
            self._finish(c)
        for c in failed:
            self._unclaim(c)

    def _finish(self, c: Claimed) -> None:
        try:
            os.unlink(c.tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot delete %s file %s after submission: %s", self.LABEL, c.tmp, exc)
        finally:
            os.close(c.fd)
            self._inflight.discard(c.tmp.name)

    def _unclaim(self, c: Claimed) -> None:
        """Give a claimed file back (the store failed): it is tried again later."""
        os.close(c.fd)
        target = c.tmp.with_name(c.name)
        if not target.exists():
            try:
                os.rename(c.tmp, target)
            except OSError:
                pass
        self._inflight.discard(c.tmp.name)

    # -- per file (worker thread) ----------------------------------------------------

    def _prepare_batch(self, org: Organization, path: Path, names: list[str],
                       allowance: int) -> list[Prepared]:
        """Claim and prepare files in order until `allowance` messages are prepared; files
        that are not ready do not count, so they never hold back the files behind them."""
        out: list[Prepared] = []
        for name in names:
            if len(out) >= allowance:
                break
            try:
                claimed = self._claim(path, name)
            except OSError as exc:
                log.warning("%s: cannot claim %s: %s", self.LABEL, name, exc)
                continue
            if claimed is None:
                continue
            self._not_ready.pop(name, None)
            try:
                prepared = self._prepare(org, claimed)
            except PickupError as exc:
                try:
                    self._reject(org, claimed, exc)
                except Exception as err:  # noqa: BLE001 - e.g. an NDR that cannot be built
                    # The file's content reaches the DSN builder: whatever it does with
                    # hostile input, the file ends as badmail, never stuck claimed.
                    log.exception("%s: cannot answer %s with an NDR", self.LABEL, name)
                    self._badmail(claimed, f"{exc.reason} (no NDR could be sent: "
                                           f"{type(err).__name__})")
                continue
            except Exception as exc:  # noqa: BLE001 - a file must never stop the loop
                log.exception("%s: unexpected error on %s", self.LABEL, name)
                self._badmail(claimed, f"internal error while reading the file: "
                                       f"{type(exc).__name__}")
                continue
            out.append(prepared)
        return out

    def _later(self, name: str) -> None:
        """Try `name` again later, backing off from 0.1 s to 2 s."""
        _, delay = self._not_ready.get(name, (0.0, 0.05))
        delay = min(2.0, delay * 2)
        self._not_ready[name] = (time.monotonic() + delay, delay)

    def _claim(self, path: Path, name: str) -> Claimed | None:
        """Open, check and rename the file. None when it is not (yet) ours to take."""
        folder = str(path)
        src = f"{folder}/{name}"
        leftover = self._leftover.match(name) if name.endswith(".tmp") else None
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except PermissionError:
            if name not in self._unreadable:
                self._unreadable.add(name)
                log.warning("%s: %s is not readable; left in place and retried",
                            self.LABEL, src)
            self._later(name)
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EMLINK):
                kind = "a symbolic link" if exc.errno in (errno.ELOOP, errno.EMLINK) else \
                    "not a regular file (socket or device)"
                self._badmail_name(path, name, f"{name} is {kind}; only regular files are read")
                return None
            raise
        self._unreadable.discard(name)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = ("a directory" if stat.S_ISDIR(st.st_mode) else
                        "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file")
                os.close(fd)
                self._badmail_name(path, name, f"{name} is {kind}; only regular files are read")
                return None
            if st.st_nlink > 1:
                os.close(fd)
                self._badmail_name(path, name, f"{name} has {st.st_nlink} hard links; a "
                                               f"{self.LABEL} file must have exactly one")
                return None
            if not leftover and not self._complete(fd, st):
                os.close(fd)
                self._later(name)
                return None
            if leftover:
                self._inflight.add(name)
                return Claimed(leftover.group("orig"), Path(src), fd, st,
                               leftover.group("token"))
            # The claim token makes the claimed name unique and identifies this claim: a
            # file that survives a crash keeps it, a file dropped again gets a new one.
            token = time_ordered_hex16()
            tmp_name = f"{name}.{self._tag}-{token}.tmp"
            self._inflight.add(tmp_name)
            try:
                os.rename(src, f"{folder}/{tmp_name}")
            except FileNotFoundError:
                self._inflight.discard(tmp_name)
                os.close(fd)
                return None  # another node claimed it first
            crash_point(self._after_claim)
            return Claimed(name, Path(folder, tmp_name), fd, st, token)
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise

    @staticmethod
    def _complete(fd: int, st: os.stat_result) -> bool:
        """True when no process has the file open for writing."""
        try:
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EBUSY):
                return False
            # No lease possible here (not the owner, NFS...): fall back to stability.
            return time.time() - st.st_mtime >= STABLE_SECONDS
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
        return True

    def _received(self, now: float) -> bytes:
        """Our Received: field (formatted once per second: it is the same for a batch)."""
        second = int(now)
        if self._received_cache[0] != second:
            self._received_cache = (second, (
                f"Received: from localhost by {self.hostname} with mailgate {self.LABEL};"
                f" {email.utils.format_datetime(utc(second))}\r\n").encode())
        return self._received_cache[1]

    # -- failures --------------------------------------------------------------------

    def _reject(self, org: Organization, c: Claimed, exc: PickupError) -> None:
        if exc.ndr and exc.sender:
            self._ndr(org, c, exc)
        else:
            self._badmail(c, exc.reason)

    def _ndr(self, org: Organization, c: Claimed, exc: PickupError) -> None:
        """Exchange answers some problems of a file with a valid sender by an NDR and deletes
        the file (reference §2.7); the NDR is committed before the file goes."""
        st = Status.parse(exc.ndr or "550 5.0.0 rejected")
        now = self.clock.now()
        recipients = [FailedRecipient(r, st) for r in exc.recipients]
        # The original is attached (reference §2.7), or only its header when it is large.
        head = os.pread(c.fd, NDR_HEADER_BYTES, 0)
        m = _BLANK_LINE.search(head)
        head = head[:m.start() + 1] if m is not None else head
        start, subject, message_id = self._ndr_original(c, head, exc)
        header = b"".join(normalise_line_endings([head[start:]])).rstrip(b"\r\n")
        fd = c.fd

        def original() -> Iterator[bytes]:
            return normalise_line_endings(read_from(fd, start))
        inbound = Inbound(sender=exc.sender or "", recipients=[], content=original,
                          size=c.st.st_size - start, header=header, source=self.SOURCE,
                          source_context=c.name, message_id=message_id,
                          subject=subject, date_received=now)
        ndr = self.submitter.ndr(org, inbound, recipients, now)
        fail = tracking.event(tracking.FAIL, self.SOURCE, source_context=c.name,
                              sender=exc.sender, recipients=[r.address for r in recipients],
                              recipient_status=[str(st)], message_id=message_id,
                              subject=subject, server_hostname=self.hostname, timestamp=now)
        marker = NewMessage(from_address=exc.sender or "", content=lambda: [b""],
                            deliveries=[], tracking=[fail],
                            related=[ndr] if ndr is not None else [])
        try:
            self.store.submit_futures([marker])[0].result(STORE_TIMEOUT)
        except (StoreError, cf.CancelledError, cf.TimeoutError) as err:
            log.error("%s: cannot store the NDR for %s (%s); file kept", self.LABEL, c.name, err)
            self._unclaim(c)
            return
        self.counters.ndr += 1
        self._finish(c)

    def _badmail(self, c: Claimed, reason: str) -> None:
        try:
            self._to_badmail(c.tmp.parent, c.tmp, c.name, reason)
        finally:
            os.close(c.fd)
            self._inflight.discard(c.tmp.name)

    def _badmail_name(self, path: Path, name: str, reason: str) -> None:
        self._to_badmail(path, path / name, name, reason)

    def _to_badmail(self, path: Path, current: Path, name: str, reason: str) -> None:
        target = move_to_badmail(path, current, name, reason, self.LABEL)
        if target is None:
            return
        reason_line = one_line(reason)
        self.counters.bad += 1
        log.warning("%s: %s is badmail (%s): %s", self.LABEL, name, target.name, reason_line)
        event = tracking.event(tracking.BADMAIL, self.SOURCE, source_context=name,
                               message_info=reason_line, server_hostname=self.hostname,
                               timestamp=self.clock.now())
        try:
            self.store.submit_futures([NewMessage(
                from_address="", content=lambda: [b""], deliveries=[],
                tracking=[event])])[0].result(STORE_TIMEOUT)
        except (StoreError, cf.TimeoutError) as exc:
            log.error("%s: cannot record the BADMAIL event for %s: %s", self.LABEL, name, exc)


def strip_blank(header: bytes) -> bytes:
    """A rewritten header without its closing empty line (what an NDR quotes)."""
    return header[:-4] if header.endswith(b"\r\n\r\n") else header.rstrip(b"\r\n")
