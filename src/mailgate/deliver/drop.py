"""Foreign connector delivery: the Drop directory writer (PRODUCT §4.6).

File contract: `<UTC yyyymmddThhmmssZ>-<unique id>.eml`, created under a hidden temporary
name in the same folder, fsynced, renamed, folder fsynced. Content: the envelope in Replay
syntax (X-Sender, one X-Receiver per recipient, X-EndOfInjectedXHeaders), then the message
exactly as stored. The name is fixed when the message enters the queue, so after a crash the
writer can tell that a file was already handed off and does not write it twice.

Failures that concern the folder rather than one message (missing folder, quota, I/O error)
raise `DropDirectoryError`; the queue then goes to Retry with LastError naming the cause
(Exchange events 8008, 8005, 8004).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence, TypeVar

from mailgate.clock import utc
from mailgate.core import status
from mailgate.core.address import xtext
from mailgate.core.status import Status
from mailgate.deliver.files import (
    can_sync_filesystem,
    fsync_dir,
    is_regular_file,
    prepend,
    sweep_temps,
    sync_filesystem,
    write_temp,
)
from mailgate.faults import crash_on_subject, crash_point
from mailgate.store import ClaimedDelivery


SWEEP_INTERVAL = 3600.0
SYNCFS_BATCH = 8  # from this many files on, one syncfs beats an fsync per file
T = TypeVar("T")
R = TypeVar("R")


class DropDirectoryError(Exception):
    """A connection failure of the Foreign connector (queue-level, retried)."""

    def __init__(self, st: Status, detail: str) -> None:
        super().__init__(detail)
        self.status = st
        self.detail = detail

    @property
    def last_error(self) -> str:
        return f"{self.status.code} {self.status.enhanced} {self.detail}"


def drop_file_name(delivery: ClaimedDelivery) -> str:
    stamp = utc(delivery.created).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{delivery.token}.eml"


def _clean(value: str) -> str:
    # Addresses were validated on the way in; this guarantees no value can ever end a line.
    return "".join(ch if ord(ch) >= 32 and ord(ch) != 127 else "?" for ch in value)


class _Recipient(Protocol):
    address: str
    notify: str | None
    orcpt: str | None


def envelope_header(delivery: ClaimedDelivery) -> bytes:
    """The Replay-syntax envelope that precedes the message in a Drop file."""
    return replay_envelope(delivery.from_address, delivery.ret, delivery.envid,
                           delivery.recipients)


def replay_envelope(from_address: str, ret: str | None, envid: str | None,
                    recipients: Sequence[_Recipient]) -> bytes:
    """X-Sender, one X-Receiver per recipient and X-EndOfInjectedXHeaders: the envelope
    of a Drop file and of an exported message (the Replay directory's format)."""
    sender = f"X-Sender: <{_clean(from_address)}>"
    if ret:
        sender += f" RET={_clean(ret)}"
    if envid:
        sender += f" ENVID={xtext(envid)}"
    lines = [sender]
    for r in recipients:
        line = f"X-Receiver: <{_clean(r.address)}>"
        if r.notify:
            line += f" NOTIFY={_clean(r.notify)}"
        if r.orcpt:
            line += f" ORCPT={_clean(r.orcpt)}"
        lines.append(line)
    block = "".join(line + "\r\n" for line in lines).encode("utf-8", "surrogateescape")
    return block + f"X-EndOfInjectedXHeaders: {len(block)}\r\n".encode()


@dataclass
class DropOutcome:
    delivery: ClaimedDelivery
    file_name: str
    size: int


class DropDirectory:
    """Writes Drop files into one folder, enforcing DropDirectoryQuota."""

    def __init__(self, path: Path, quota: int | None) -> None:
        self.path = path
        self.quota = quota
        self._usage: int | None = None
        self._usage_at = 0.0
        self._swept_at = 0.0

    def _measure(self) -> int:
        total = 0
        with os.scandir(self.path) as it:
            for entry in it:
                if entry.name.lower().endswith(".eml"):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_size
        return total

    def _check_quota(self, size: int, planned: int = 0) -> None:
        """Refuse a file of `size` bytes if it, the folder's `*.eml` files and the `planned`
        bytes of this batch not yet written would exceed DropDirectoryQuota."""
        if self.quota is None:
            return
        now = time.monotonic()
        # The folder only shrinks behind our back (the gateway deletes), so a cached total
        # plus our own writes errs on the safe side; re-measure when it would refuse.
        if (self._usage is None or now - self._usage_at > 1.0
                or self._usage + planned + size > self.quota):
            self._usage = self._measure()
            self._usage_at = now
        if self._usage + planned + size > self.quota:
            raise DropDirectoryError(
                status.S452_DROP_QUOTA,
                f"drop directory quota exceeded: {self.path} holds {self._usage + planned} "
                f"bytes, the next file needs {size}, DropDirectoryQuota is {self.quota} bytes "
                f"(event 8005)")

    def _io_error(self, exc: OSError) -> DropDirectoryError:
        if isinstance(exc, FileNotFoundError):
            return DropDirectoryError(status.S451_DROP_MISSING,
                                      f"drop directory {self.path} does not exist (event 8008)")
        return DropDirectoryError(
            status.S451_DROP_IO, f"I/O error writing to the drop directory {self.path}: "
                                 f"{exc.strerror or exc} (event 8004)")

    def check(self) -> None:
        if not self.path.is_dir():
            raise DropDirectoryError(
                status.S451_DROP_MISSING,
                f"drop directory {self.path} does not exist (event 8008)")

    def deliver(self, deliveries: list[ClaimedDelivery],
                content: Callable[[ClaimedDelivery], Iterator[bytes]]) -> tuple[list[DropOutcome],
                                                                   DropDirectoryError | None]:
        """Hand each delivery off as one file. Returns the outcomes of the deliveries that
        were handed off (durably) and, if the folder failed, the error that stopped it; the
        deliveries without an outcome were not handed off."""
        outcomes: list[DropOutcome] = []
        try:
            self.check()
        except DropDirectoryError as exc:
            return outcomes, exc
        if time.monotonic() - self._swept_at > SWEEP_INTERVAL or not self._swept_at:
            # Temporary files of a write that a crash interrupted (T43).
            self._swept_at = time.monotonic()
            sweep_temps(self.path)
        error: DropDirectoryError | None = None
        # Decide what fits first (quota), then write the files, then make them durable,
        # then rename them into place.
        todo: list[tuple[ClaimedDelivery, str, bytes]] = []
        planned = 0  # bytes of this batch's files, not on disk yet
        for d in deliveries:
            name = drop_file_name(d)
            if d.recovering and is_regular_file(self.path / name):
                # Written before a crash, not yet recorded: it is already handed off.
                outcomes.append(DropOutcome(d, name, (self.path / name).stat().st_size))
                continue
            head = envelope_header(d)
            try:
                self._check_quota(len(head) + d.size, planned)
            except DropDirectoryError as exc:
                error = exc
                break
            except OSError as exc:
                error = self._io_error(exc)
                break
            planned += len(head) + d.size
            todo.append((d, name, head))

        # A batch is made durable with one syncfs after writing all its files; a small
        # batch (or a system without syncfs) gets an fsync per file.
        batched = len(todo) >= SYNCFS_BATCH and can_sync_filesystem()

        def write(item: tuple[ClaimedDelivery, str, bytes]) -> tuple[Path, int]:
            d, _, head = item
            crash_on_subject(d.subject)
            return write_temp(self.path, d.token, prepend(head, content(d)), sync=not batched)

        results = [_capture(write)(item) for item in todo]
        if batched:
            try:
                sync_filesystem(self.path)
            except OSError as exc:
                # Nothing of this batch is known to be on disk: hand none of it off.
                for res, _ in results:
                    if res is not None:
                        _unlink_quietly(res[0])
                return outcomes, self._io_error(exc)
        renamed = False
        failed: DropDirectoryError | None = None
        for (d, name, _), (res, write_error) in zip(todo, results):
            if write_error is not None or failed is not None or res is None:
                # Keep the queue's order: nothing after the first failed write is handed off.
                if failed is None and write_error is not None:
                    failed = self._io_error(write_error)
                if res is not None:
                    _unlink_quietly(res[0])
                continue
            tmp, size = res
            try:
                os.rename(tmp, self.path / name)
            except OSError as exc:
                failed = self._io_error(exc)
                _unlink_quietly(tmp)
                continue
            renamed = True
            crash_point("drop-after-rename")
            if self._usage is not None:
                self._usage += size
            outcomes.append(DropOutcome(d, name, size))
        error = failed or error
        if renamed:
            try:
                fsync_dir(self.path)
            except OSError as exc:
                # The renames may not be durable: report nothing as handed off.
                return [], DropDirectoryError(
                    status.S451_DROP_IO,
                    f"I/O error syncing the drop directory {self.path}: {exc.strerror or exc}"
                    f" (event 8004)")
        return outcomes, error



def _capture(fn: Callable[[T], R]) -> Callable[[T], tuple[R | None, OSError | None]]:
    def run(item: T) -> tuple[R | None, OSError | None]:
        try:
            return fn(item), None
        except OSError as exc:
            return None, exc
    return run


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
