"""Where test messages ended up (alice's Maildir and the Fax Drop directory, found by the
X-Test-Id header each test message carries), badmail and tracking: helpers shared by the
Pickup and Replay tests."""

from __future__ import annotations

import asyncio
import os
import re
from collections import Counter
from pathlib import Path

from mailgate.store import TrackingEvent
from mailgate.store.sqlite import SqliteStore
from tests.conftest import NODE, MailgateEnv, wait_for

ALICE = "alice@contoso.test"


def mailbox_files(env: MailgateEnv, address: str = ALICE) -> list[Path]:
    md = env.maildir(address)
    return sorted(p for sub in ("new", "cur") if (md / sub).is_dir()
                  for p in (md / sub).iterdir() if p.is_file())


def drop_files(env: MailgateEnv, connector: str = "Fax") -> list[Path]:
    folder = env.drop / connector
    return sorted(folder.glob("*.eml")) if folder.is_dir() else []


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header, body) of a delivered file (LF in Maildir, CRLF in Drop files)."""
    m = re.search(rb"\r?\n\r?\n", data)
    assert m is not None, data[:500]
    return data[:m.start() + 1], data[m.end():]


def x_test_ids(path: Path) -> list[str]:
    head, _ = split_message(path.read_bytes())
    return [v.decode() for v in re.findall(rb"(?mi)^X-Test-Id: *(\S+)\r?$", head)]


def delivered(env: MailgateEnv) -> Counter[str]:
    """How many times each X-Test-Id reached alice's Maildir or the Fax Drop directory."""
    out: Counter[str] = Counter()
    for p in [*mailbox_files(env), *drop_files(env)]:
        out.update(x_test_ids(p))
    return out


def wait_bad(folder: Path, base: str, timeout: float = 10.0) -> str:
    """Wait for `<base>.bad` and its reason file; return the (one-line) reason."""
    reason = folder / f"{base}.bad.reason"
    wait_for(lambda: (folder / f"{base}.bad").is_symlink() or (folder / f"{base}.bad").exists(),
             timeout=timeout, what=f"{base}.bad")
    wait_for(lambda: reason.exists() and reason.read_text().endswith("\n"), timeout=timeout,
             what=f"{base}.bad.reason")
    text = reason.read_text(encoding="utf-8")
    assert text.count("\n") == 1, f"the reason must be one line: {text!r}"
    return text.strip()


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def tracking(env: MailgateEnv, **criteria: object) -> list[TrackingEvent]:
    store = SqliteStore(env.data / "mailgate.db", NODE)
    try:
        return asyncio.run(store.search_tracking(**criteria))
    finally:
        store.close_sync()


def wait_gone(path: Path, timeout: float = 10.0) -> None:
    wait_for(lambda: not os.path.lexists(path), timeout=timeout, what=f"{path.name} to go")
