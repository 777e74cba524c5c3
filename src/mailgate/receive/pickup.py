"""The Pickup directory (PRODUCT §4.5, reference §2.2–2.4, §2.7).

A foreign system drops `*.eml` files; the node claims each complete file by renaming it,
turns it into a message, and deletes the file only after the message is committed. How it
differs from Exchange (each documented in the README):

- new files are noticed within ~100 ms (inotify, with a poll as fallback);
- a file still open for writing is not read (a Linux read lease cannot be taken on it; where
  leases are unavailable, the file must be unchanged for a second);
- a claimed file is renamed `<name>.<node>.tmp` (not `.tmp`, so writers may use `.tmp` for
  their own temporary files), and a file that survived a crash is recognised by its identity
  and content hash, so it is never submitted twice;
- a bad file becomes `<name>.bad` with `<name>.bad.reason` beside it;
- the rate limit is off by default.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import datetime as dt
import email.utils
import errno
import fcntl
import hashlib
import io
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from mailgate import tracking
from mailgate.aio import wait_event
from mailgate.clock import Clock, utc
from mailgate.core import status
from mailgate.core.status import Status
from mailgate.directory import OrganizationCache
from mailgate.dsn import FailedRecipient
from mailgate.faults import crash_point
from mailgate.ids import message_id_uuid, time_ordered_hex16
from mailgate.organization import Organization
from mailgate.receive.pickup_parse import (
    PickupError,
    normalise_line_endings,
    parse_pickup,
    read_header_block,
)
from mailgate.receive.submit import Inbound, InboundRecipient, Submitter
from mailgate.receive.watch import FolderWatch
from mailgate.store import NewMessage, Store, StoreError

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
STABLE_SECONDS = 1.0
MAX_BATCHES_IN_FLIGHT = 3
PREPARERS = 2
SMALL_FILE = 64 * 1024
STORE_TIMEOUT = 60.0
SEEN_RETENTION = 30 * 86400.0  # how long a claimed file is remembered after its commit
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)


def _node_tag(node: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", node) or "node"


@dataclass
class _Claimed:
    name: str            # the file name as dropped
    tmp: Path            # where it is now (claimed): <name>.<node>-<token>.tmp
    fd: int
    st: os.stat_result
    token: str


@dataclass
class PickupCounters:
    submitted: int = 0
    duplicates: int = 0
    bad: int = 0
    ndr: int = 0


@dataclass
class _Prepared:
    claimed: _Claimed
    message: NewMessage


@dataclass
class PickupDirectory:
    store: Store
    orgs: OrganizationCache
    submitter: Submitter
    clock: Clock
    data_dir: Path
    hostname: str
    on_submitted: Callable[[], None] = lambda: None
    poll_interval: float = 1.0
    batch: int = 200
    counters: PickupCounters = field(default_factory=PickupCounters)

    def __post_init__(self) -> None:
        self.node = self.store.node
        self._tag = _node_tag(self.node)
        self._leftover = re.compile(
            r"^(?P<orig>.+\.eml)\." + re.escape(self._tag) + r"-(?P<token>[0-9a-f]{16})\.tmp$",
            re.I)
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
        self._deleter = cf.ThreadPoolExecutor(1, thread_name_prefix="mailgate-pickup-delete")

    # -- main loop -------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                org = await self.orgs.get()
                path = org.transport.resolve(self.data_dir, org.transport.pickup_directory_path)
                if path != self._path:
                    await self._switch(path)
                more = False
                if time.monotonic() >= self._prune_at:
                    # Claim records only matter while a claimed file may still be on disk.
                    self._prune_at = time.monotonic() + 3600.0
                    try:
                        await self.store.forget_pickup_keys(self.clock.now() - SEEN_RETENTION)
                    except StoreError as exc:
                        log.warning("cannot prune old Pickup claim records: %s", exc)
                if path is not None and time.monotonic() >= self._pause_until:
                    try:
                        more = await self.process_once(org, path)
                    except StoreError as exc:
                        log.error("Pickup paused for 5 s: the store failed: %s", exc)
                        self._pause_until = time.monotonic() + 5.0
                    except Exception:  # noqa: BLE001 - never let one bad batch stop Pickup
                        log.exception("Pickup batch failed; retrying in 1 s")
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
            log.info("Pickup directory disabled")
            return
        path.mkdir(parents=True, exist_ok=True)
        log.info("Pickup directory: %s", path)
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
        try:
            # A scan lists the whole folder; its names are worked through batch by batch
            # before the next scan, so a backlog of thousands costs one listing, not one
            # per batch. Files that arrive meanwhile come after the backlog anyway.
            if not self._backlog:
                self._backlog = await asyncio.to_thread(self._candidates, path)
        except FileNotFoundError:
            # The folder vanished (deleted, volume unmounted): say so once, make it again.
            if not self._missing_logged:
                log.warning("Pickup directory %s does not exist; creating it", path)
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

    async def _settle(self, prepared: list[_Prepared],
                      future: cf.Future[list[int | None | BaseException]]) -> None:
        results: list[int | None | BaseException]
        try:
            results = await asyncio.wrap_future(future)
        except Exception as exc:  # noqa: BLE001 - the whole batch was not stored
            results = [exc] * len(prepared)
        done: list[_Claimed] = []
        failed: list[_Claimed] = []
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
            log.error("Pickup paused for 5 s: the store failed: %s", error)
            self._pause_until = time.monotonic() + 5.0

    def _finish_all(self, done: list[_Claimed], failed: list[_Claimed]) -> None:
        for c in done:
            crash_point("pickup-after-commit")
            self._finish(c)
        for c in failed:
            self._unclaim(c)

    def _finish(self, c: _Claimed) -> None:
        try:
            os.unlink(c.tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot delete Pickup file %s after submission: %s", c.tmp, exc)
        finally:
            os.close(c.fd)
            self._inflight.discard(c.tmp.name)

    def _unclaim(self, c: _Claimed) -> None:
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
                       allowance: int) -> list[_Prepared]:
        """Claim and prepare files in order until `allowance` messages are prepared; files
        that are not ready do not count, so they never hold back the files behind them."""
        out: list[_Prepared] = []
        for name in names:
            if len(out) >= allowance:
                break
            try:
                claimed = self._claim(path, name)
            except OSError as exc:
                log.warning("Pickup: cannot claim %s: %s", name, exc)
                continue
            if claimed is None:
                continue
            self._not_ready.pop(name, None)
            try:
                prepared = self._prepare(org, claimed)
            except PickupError as exc:
                self._reject(org, claimed, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a file must never stop the loop
                log.exception("Pickup: unexpected error on %s", name)
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

    def _claim(self, path: Path, name: str) -> _Claimed | None:
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
                log.warning("Pickup: %s is not readable; left in place and retried", src)
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
                self._badmail_name(path, name, f"{name} has {st.st_nlink} hard links; a Pickup"
                                               " file must have exactly one")
                return None
            if not leftover and not self._complete(fd, st):
                os.close(fd)
                self._later(name)
                return None
            if leftover:
                self._inflight.add(name)
                return _Claimed(leftover.group("orig"), Path(src), fd, st,
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
            crash_point("pickup-after-claim")
            return _Claimed(name, Path(folder, tmp_name), fd, st, token)
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

    def _prepare(self, org: Organization, c: _Claimed) -> _Prepared:
        ts = org.transport
        now = self.clock.now()
        # A small file (the usual case) is read once and kept in memory until it is
        # committed; a large one is read in chunks, now and again when it is stored.
        small = os.pread(c.fd, SMALL_FILE + 1, 0) if c.st.st_size <= SMALL_FILE else None
        if small is not None and len(small) > SMALL_FILE:
            small = None  # grew since fstat: treat as large
        with (io.BytesIO(small) if small is not None else open(c.fd, "rb", closefd=False)) as f:
            f.seek(0)
            head, body_offset = read_header_block(f, ts.pickup_directory_max_header_size)
        received = self._received(now)
        domain = org.default_domain.domain_name if org.default_domain else self.hostname
        msg = parse_pickup(head, received=received,
                           max_recipients=ts.pickup_directory_max_recipients_per_message,
                           now=utc(int(now)),
                           make_message_id=lambda: f"<{message_id_uuid()}@{domain}>",
                           body_offset=body_offset)
        body: bytes | None = None
        if small is not None:
            digest = hashlib.sha256(small).hexdigest()
            body = b"".join(normalise_line_endings([small[body_offset:]]))
            body_size = len(body)
        else:
            digest, body_size = self._digest(c.fd, body_offset)
        size = len(msg.header) + body_size
        if ts.max_message_size is not None and size > ts.max_message_size:
            raise PickupError(
                f"message is {size} bytes, larger than MaxMessageSize "
                f"({ts.max_message_size} bytes)",
                ndr=str(status.S552_TOO_LARGE.with_text(
                    f"message too big ({size} bytes, the limit is {ts.max_message_size})")),
                sender=msg.sender, recipients=msg.recipients, subject=msg.subject,
                message_id=msg.message_id)
        # Time-ordered (the token leads), so the claim records are appended, not scattered.
        key = f"{c.token}:{self._tag}:{c.st.st_size}:{digest}"
        fd = c.fd
        header = msg.header

        def content() -> Iterator[bytes]:
            yield header
            if body is not None:
                yield body
            else:
                yield from normalise_line_endings(_read_from(fd, body_offset))

        receive = tracking.event(
            tracking.RECEIVE, tracking.PICKUP, message_id=msg.message_id,
            recipients=msg.recipients, sender=msg.sender, return_path=msg.sender,
            subject=msg.subject, source_context=c.name, server_hostname=self.hostname,
            timestamp=now)
        inbound = Inbound(sender=msg.sender,
                          recipients=[InboundRecipient(r) for r in msg.recipients],
                          content=content, size=size, header=_strip_blank(header),
                          source="PICKUP", source_context=c.name, message_id=msg.message_id,
                          subject=msg.subject, source_key=key, date_received=now,
                          receive_events=[receive])
        return _Prepared(c, self.submitter.prepare(org, inbound, now))

    def _received(self, now: float) -> bytes:
        """Our Received: field (formatted once per second: it is the same for a batch)."""
        second = int(now)
        if self._received_cache[0] != second:
            self._received_cache = (second, (
                f"Received: from localhost by {self.hostname} with mailgate Pickup;"
                f" {email.utils.format_datetime(utc(second))}\r\n").encode())
        return self._received_cache[1]

    @staticmethod
    def _digest(fd: int, body_offset: int) -> tuple[str, int]:
        """One pass over a large file: the hash of all of it and the size of its body
        once line endings are normalised."""
        h = hashlib.sha256()

        def body() -> Iterator[bytes]:
            offset = 0
            for chunk in _read_from(fd, 0):
                h.update(chunk)
                if offset + len(chunk) > body_offset:
                    yield chunk[max(0, body_offset - offset):]
                offset += len(chunk)

        size = sum(len(piece) for piece in normalise_line_endings(body()))
        return h.hexdigest(), size

    # -- failures --------------------------------------------------------------------

    def _reject(self, org: Organization, c: _Claimed, exc: PickupError) -> None:
        if exc.ndr and exc.sender:
            self._ndr(org, c, exc)
        else:
            self._badmail(c, exc.reason)

    def _ndr(self, org: Organization, c: _Claimed, exc: PickupError) -> None:
        """Exchange answers a limit violation by a valid sender with an NDR and deletes the
        file; the NDR is committed before the file goes."""
        st = Status.parse(exc.ndr or "550 5.0.0 rejected")
        now = self.clock.now()
        recipients = [FailedRecipient(r, st) for r in exc.recipients]
        with open(c.fd, "rb", closefd=False) as f:
            f.seek(0)
            header = f.read(64 * 1024).split(b"\n\n")[0].split(b"\r\n\r\n")[0]
        inbound = Inbound(sender=exc.sender or "", recipients=[], content=lambda: [b""],
                          size=c.st.st_size, header=header, source="PICKUP",
                          source_context=c.name, message_id=exc.message_id,
                          subject=exc.subject, date_received=now)
        ndr = self.submitter.ndr(org, inbound, recipients, now)
        fail = tracking.event(tracking.FAIL, tracking.PICKUP, source_context=c.name,
                              sender=exc.sender, recipients=[r.address for r in recipients],
                              recipient_status=[str(st)], server_hostname=self.hostname,
                              timestamp=now)
        marker = NewMessage(from_address=exc.sender or "", content=lambda: [b""],
                            deliveries=[], tracking=[fail],
                            related=[ndr] if ndr is not None else [])
        try:
            self.store.submit_futures([marker])[0].result(STORE_TIMEOUT)
        except (StoreError, cf.CancelledError, cf.TimeoutError) as err:
            log.error("Pickup: cannot store the NDR for %s (%s); file kept", c.name, err)
            self._unclaim(c)
            return
        self.counters.ndr += 1
        self._finish(c)

    def _bad_target(self, path: Path, name: str) -> Path:
        """`<name>.bad`, or `<name><datetime>.bad` when that name or its `.reason` file is
        taken: nothing is ever overwritten."""
        base = name[:-4] if name.lower().endswith(".eml") else name
        target = path / f"{base}.bad"
        while os.path.lexists(target) or os.path.lexists(f"{target}.reason"):
            stamp = dt.datetime.now().strftime("%Y%m%d%H%M%S%f")
            target = path / f"{base}{stamp}.bad"
        return target

    def _badmail(self, c: _Claimed, reason: str) -> None:
        path = c.tmp.parent
        try:
            self._move_bad(path, c.tmp, c.name, reason)
        finally:
            os.close(c.fd)
            self._inflight.discard(c.tmp.name)

    def _badmail_name(self, path: Path, name: str, reason: str) -> None:
        self._move_bad(path, path / name, name, reason)

    def _move_bad(self, path: Path, current: Path, name: str, reason: str) -> None:
        target = self._bad_target(path, name)
        try:
            os.rename(current, target)
        except OSError as exc:
            log.error("Pickup: cannot rename %s to %s: %s", current, target.name, exc)
            return
        reason_line = " ".join(reason.split())
        try:
            # Never through a planted link, never over an existing file.
            fd = os.open(f"{target}.reason",
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644)
            with open(fd, "w", encoding="utf-8") as f:
                f.write(reason_line + "\n")
        except OSError as exc:
            log.error("Pickup: cannot write %s.reason: %s", target.name, exc)
        self.counters.bad += 1
        log.warning("Pickup: %s is badmail (%s): %s", name, target.name, reason_line)
        event = tracking.event(tracking.BADMAIL, tracking.PICKUP, source_context=name,
                               message_info=reason_line, server_hostname=self.hostname,
                               timestamp=self.clock.now())
        try:
            self.store.submit_futures([NewMessage(
                from_address="", content=lambda: [b""], deliveries=[],
                tracking=[event])])[0].result(STORE_TIMEOUT)
        except (StoreError, cf.TimeoutError) as exc:
            log.error("Pickup: cannot record the BADMAIL event for %s: %s", name, exc)


def _read_from(fd: int, offset: int) -> Iterator[bytes]:
    while True:
        chunk = os.pread(fd, READ_CHUNK, offset)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


def _strip_blank(header: bytes) -> bytes:
    return header[:-4] if header.endswith(b"\r\n\r\n") else header.rstrip(b"\r\n")
