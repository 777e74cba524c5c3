"""Mailbox delivery into Maildir (`<data_dir>/mailboxes/<primary address>/Maildir/`).

Each recipient gets one file: written in `tmp/`, fsynced, renamed into `new/`, and `new/`
fsynced before the delivery is recorded. The file name is derived from the queued delivery,
so after a crash a file that already reached `new/` (or was moved to `cur/` by a reader) is
recognised and not delivered twice. Line endings are LF, as Maildir readers expect, and
`Return-Path:` and `Delivered-To:` are prepended as a local delivery agent does.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from mailgate.deliver.files import fsync_dir, is_regular_file, prepend, write_temp
from mailgate.faults import crash_point
from mailgate.store import ClaimedDelivery, ClaimedRecipient

_SAFE = set("abcdefghijklmnopqrstuvwxyz0123456789.-_+@")


def mailbox_folder_name(primary_smtp_address: str) -> str:
    """A folder name for an address that can never escape the mailboxes folder and always
    fits a file name (≤ 255 bytes): unsafe characters are %-escaped, and a name that would be
    too long is cut and made unique with a hash of the address."""
    out = []
    for ch in primary_smtp_address.lower():
        out.append(ch if ch in _SAFE else "".join(f"%{b:02X}" for b in ch.encode()))
    name = "".join(out)
    if name in {"", ".", ".."}:
        name = name.replace(".", "%2E") or "%00"
    if len(name) > 200:
        digest = hashlib.sha256(primary_smtp_address.lower().encode()).hexdigest()[:16]
        name = f"{name[:180]}~{digest}"
    return name


def crlf_to_lf(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Stored CRLF line endings to LF, correct across chunk boundaries."""
    carry = b""
    for chunk in chunks:
        data = carry + chunk
        carry = b""
        if data.endswith(b"\r"):
            data, carry = data[:-1], b"\r"
        yield data.replace(b"\r\n", b"\n")
    if carry:
        yield carry


@dataclass
class MaildirOutcome:
    recipient: ClaimedRecipient
    file_name: str


class MaildirStore:
    """The mailboxes of this node."""

    def __init__(self, root: Path, hostname: str | None = None) -> None:
        self.root = root
        self.hostname = (hostname or socket.gethostname()).replace("/", "_").replace(":", "_")

    def maildir(self, primary_smtp_address: str) -> Path:
        return self.root / mailbox_folder_name(primary_smtp_address) / "Maildir"

    def move(self, old_primary: str, new_primary: str) -> None:
        """The mailbox's primary address changed: its Maildir follows (if the new folder
        does not exist yet). A delivery racing the rename fails and is retried."""
        old, new = self.root / mailbox_folder_name(old_primary), \
            self.root / mailbox_folder_name(new_primary)
        if old != new and old.is_dir() and not os.path.lexists(new):
            os.rename(old, new)

    def ensure(self, maildir: Path) -> None:
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)

    def file_name(self, delivery: ClaimedDelivery, recipient: ClaimedRecipient) -> str:
        return f"{int(delivery.created)}.M{delivery.token}R{recipient.id}.{self.hostname}"

    def already_delivered(self, maildir: Path, name: str) -> bool:
        if is_regular_file(maildir / "new" / name):
            return True
        try:
            with os.scandir(maildir / "cur") as it:
                return any(e.name == name or e.name.startswith(name + ":") for e in it)
        except FileNotFoundError:
            return False

    def deliver(self, delivery: ClaimedDelivery, recipient: ClaimedRecipient,
                primary_smtp_address: str, content: Iterable[bytes]) -> tuple[str, Path]:
        """Write one message into the mailbox; returns (file name, maildir). The caller
        fsyncs each touched `new/` folder once per batch (see `sync`)."""
        maildir = self.maildir(primary_smtp_address)
        name = self.file_name(delivery, recipient)
        if delivery.recovering and self.already_delivered(maildir, name):
            return name, maildir
        self.ensure(maildir)
        prefix = (f"Return-Path: <{delivery.from_address}>\n"
                  f"Delivered-To: {primary_smtp_address}\n").encode("utf-8", "surrogateescape")
        tmp, _ = write_temp(maildir / "tmp", name, prepend(prefix, crlf_to_lf(content)),
                            mode=0o600)
        os.rename(tmp, maildir / "new" / name)
        crash_point("maildir-after-rename")
        return name, maildir

    @staticmethod
    def sync(maildirs: Iterable[Path]) -> None:
        for maildir in set(maildirs):
            fsync_dir(maildir / "new")

