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
from typing import Callable, Iterable, Iterator

from mailgate.clock import utc
from mailgate.core import status
from mailgate.core.status import Status
from mailgate.deliver.files import fsync_dir, prepend, is_regular_file, write_temp
from mailgate.store import ClaimedDelivery


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


def _xtext_param(value: str) -> str:
    return "".join(ch if 33 <= ord(ch) <= 126 and ch not in "+=" else
                   "".join(f"+{b:02X}" for b in ch.encode()) for ch in value)


def _clean(value: str) -> str:
    # Addresses were validated on the way in; this guarantees no value can ever end a line.
    return "".join(ch if ord(ch) >= 32 and ord(ch) != 127 else "?" for ch in value)


def envelope_header(delivery: ClaimedDelivery) -> bytes:
    """The Replay-syntax envelope that precedes the message in a Drop file."""
    sender = f"X-Sender: <{_clean(delivery.from_address)}>"
    if delivery.ret:
        sender += f" RET={_clean(delivery.ret)}"
    if delivery.envid:
        sender += f" ENVID={_xtext_param(delivery.envid)}"
    lines = [sender]
    for r in delivery.recipients:
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

    def _check_quota(self, size: int) -> None:
        if self.quota is None:
            return
        now = time.monotonic()
        # The folder only shrinks behind our back (the gateway deletes), so a cached total
        # plus our own writes errs on the safe side; re-measure when it would refuse.
        if self._usage is None or now - self._usage_at > 1.0 or self._usage + size > self.quota:
            self._usage = self._measure()
            self._usage_at = now
        if self._usage + size > self.quota:
            raise DropDirectoryError(
                status.S452_DROP_QUOTA,
                f"drop directory quota exceeded: {self.path} holds {self._usage} bytes, the "
                f"next file needs {size}, DropDirectoryQuota is {self.quota} bytes "
                f"(event 8005)")

    def check(self) -> None:
        if not self.path.is_dir():
            raise DropDirectoryError(
                status.S451_DROP_MISSING,
                f"drop directory {self.path} does not exist (event 8008)")

    def deliver(self, deliveries: list[ClaimedDelivery],
                content: Callable[[int], Iterator[bytes]]) -> tuple[list[DropOutcome],
                                                                   DropDirectoryError | None]:
        """Hand each delivery off as one file. Returns the outcomes of the deliveries that
        were handed off (durably) and, if the folder failed, the error that stopped it; the
        deliveries without an outcome were not handed off."""
        outcomes: list[DropOutcome] = []
        try:
            self.check()
        except DropDirectoryError as exc:
            return outcomes, exc
        renamed = False
        error: DropDirectoryError | None = None
        for d in deliveries:
            name = drop_file_name(d)
            final = self.path / name
            if d.recovering and is_regular_file(final):
                # Written before a crash, not yet recorded: it is already handed off.
                outcomes.append(DropOutcome(d, name, final.stat().st_size))
                continue
            head = envelope_header(d)
            try:
                self._check_quota(len(head) + d.size)
                tmp, size = write_temp(self.path, d.token, prepend(head, content(d.message_id)))
                os.rename(tmp, final)
            except DropDirectoryError as exc:
                error = exc
                break
            except FileNotFoundError:
                error = DropDirectoryError(status.S451_DROP_MISSING,
                                           f"drop directory {self.path} does not exist (event 8008)")
                break
            except OSError as exc:
                error = DropDirectoryError(
                    status.S451_DROP_IO,
                    f"I/O error writing to the drop directory {self.path}: "
                    f"{exc.strerror or exc} (event 8004)")
                break
            renamed = True
            if self._usage is not None:
                self._usage += size
            outcomes.append(DropOutcome(d, name, size))
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

