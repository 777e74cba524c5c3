"""A Foreign connector's Drop directory that is full or missing: the queue goes to Retry
with a LastError naming the cause, and delivery resumes once the gateway catches up
(PRODUCT §4.6), through the real node and CLI."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tests.conftest import MailgateEnv, NodeThread, drop_file, wait_for

DROP_NAME = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{32}\.eml$")


def fax(i: int, extra: bytes = b"") -> bytes:
    # +1666... never collides with alice's FAX:+15550001 proxy address.
    return (f"From: bob@fabrikam.test\nTo: IMCEAFAX-+2B1666000{i}@contoso.test\n"
            f"Subject: fax {i}\nX-Test-Id: {i}\n").encode() + extra + b"\n" + b"x" * 900 + b"\n"


def fax_queue(env: MailgateEnv) -> dict[str, object]:
    queues = json.loads(env.cli("queue", "get", "--json").stdout)
    [q] = [q for q in queues if q["DeliveryType"] == "NonSmtpGatewayDelivery"]
    return q  # type: ignore[no-any-return]


def emls(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.eml")) if folder.is_dir() else []


def test_quota_puts_the_queue_in_retry_until_files_are_consumed(demo_env: MailgateEnv) -> None:
    """Quota reached: files stop, the queue is in Retry with the reason; once the gateway
    deletes files, the remaining messages are written."""
    env = demo_env
    env.cli("transport-service", "set", "--transient-failure-retry-interval", "1s")
    # Room for three files of ~1.2 KB.
    env.cli("foreign-connector", "set", "Fax", "--drop-directory-quota", "4000")
    node = NodeThread(env)
    try:
        for i in range(6):
            drop_file(env.pickup, f"f{i}.eml", fax(i))
        folder = env.drop / "Fax"
        wait_for(lambda: len(emls(folder)) == 3, timeout=10, what="three drop files")
        q = wait_for(lambda: (lambda q: q if q["Status"] == "Retry" else None)(fax_queue(env)),
                     timeout=10, what="the queue in Retry")
        assert "quota" in q["LastError"] and "8005" in q["LastError"]  # type: ignore[index]
        assert q["MessageCount"] == 3  # type: ignore[index]
        assert sum(p.stat().st_size for p in emls(folder)) <= 4000
        # The gateway consumes the files; the rest follow at the next retry.
        seen = {p.read_bytes() for p in emls(folder)}
        for p in emls(folder):
            p.unlink()
        wait_for(lambda: len(emls(folder)) == 3, timeout=10, what="the other three files")
        seen |= {p.read_bytes() for p in emls(folder)}
        ids = {re.search(rb"X-Test-Id: (\d+)", data).group(1) for data in seen}  # type: ignore[union-attr]
        assert ids == {str(i).encode() for i in range(6)}
        wait_for(lambda: fax_queue(env)["MessageCount"] == 0, what="an empty queue")
        q = wait_for(lambda: (lambda q: q if q["Status"] == "Ready" else None)(fax_queue(env)),
                     timeout=10, what="the queue Ready again")
        assert q["LastError"] is None  # type: ignore[index]
    finally:
        node.stop()


def test_missing_drop_directory_is_retried_until_it_exists(demo_env: MailgateEnv,
                                                           tmp_path: Path) -> None:
    """A missing Drop directory is never created by mailgate: the queue waits in Retry with
    LastError naming the folder; once an administrator creates it, delivery happens."""
    env = demo_env
    target = tmp_path / "gateway" / "out"
    env.cli("transport-service", "set", "--transient-failure-retry-interval", "1s")
    result = env.cli("foreign-connector", "set", "Fax", "--drop-directory", str(target))
    assert "does not exist" in result.stderr  # warned at configuration time
    node = NodeThread(env)
    try:
        drop_file(env.pickup, "f.eml", fax(1))
        q = wait_for(lambda: (lambda q: q if q["Status"] == "Retry" else None)(fax_queue(env)),
                     timeout=10, what="the queue in Retry")
        assert str(target) in q["LastError"] and "8008" in q["LastError"]  # type: ignore[index]
        assert not target.exists()
        target.mkdir(parents=True)
        [f] = wait_for(lambda: emls(target), timeout=10, what="the drop file")  # type: ignore[misc]
        assert b"X-Test-Id: 1" in f.read_bytes()
    finally:
        node.stop()


def test_hostile_message_ids_and_planted_links_never_escape_the_folder(
        demo_env: MailgateEnv, tmp_path: Path) -> None:
    """Attacker-controlled header values never reach file names, and a symlink planted in
    the Drop directory is neither followed nor replaced (T42)."""
    env = demo_env
    folder = env.drop / "Fax"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"untouched")
    os.symlink(victim, folder / "planted.eml")
    node = NodeThread(env)
    try:
        hostile = [b"Message-ID: <../../../../tmp/pwn>", b"Message-ID: <" + b"a" * 300 + b">",
                   b"Subject: a/b/../../c", b"Message-ID: <x/y@z>"]
        for i, header in enumerate(hostile * 5):
            drop_file(env.pickup, f"h{i}.eml", fax(i, header + b"\n"))
        wait_for(lambda: len([p for p in folder.iterdir() if DROP_NAME.match(p.name)]) == 20,
                 timeout=10, what="20 drop files")
    finally:
        node.stop()
    names = sorted(p.name for p in folder.iterdir())
    assert names.count("planted.eml") == 1
    assert all(DROP_NAME.match(n) or n == "planted.eml" for n in names)
    assert all((folder / n).is_file() and not (folder / n).is_symlink()
               for n in names if n != "planted.eml")
    assert (folder / "planted.eml").is_symlink() and victim.read_bytes() == b"untouched"
    assert not Path("/tmp/pwn").exists()
