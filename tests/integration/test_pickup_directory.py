"""The Pickup directory service (receive/pickup.py) on real folders with the real node.

Documented behaviour: README "The Pickup directory", PRODUCT §4.5 and §5, reference
exchange-transport.md §2.2-2.4, §2.7, §2.12 and reliability.md §2.12 with the catalogue
tests T32-T40. Most tests run the in-process node (NodeThread); the crash tests (kill -9,
MAILGATE_CRASH_AT crash points), the SIGTERM test and the unreadable-file test run the real
`mailgate serve` subprocess. Tests marked xfail(strict) document bugs (see their reasons).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import email
import email.policy
import email.utils
import os
import re
import signal
import socket
import stat as stat_mod
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

from mailgate.store import TrackingEvent
from tests.conftest import NODE, MailgateEnv, NodeThread, drop_file, wait_for
from tests.delivered import (
    listing,
    tracking,
    wait_bad,
    wait_gone,
    delivered,
    drop_files,
    mailbox_files,
    split_message,
    x_test_ids,
)

ALICE = "alice@contoso.test"
BAD_DATETIME_RE = r"\d{14,}"  # <name><datetime>.bad: yyyymmddHHMMSS plus a fraction


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _ignore_sigio() -> Iterator[None]:
    """The in-process node takes Linux read leases; a lease break sends SIGIO to the
    holder, whose default action would end the test process. `mailgate serve` ignores
    SIGIO itself (node.py), but it cannot from the node's background thread."""
    old = signal.signal(signal.SIGIO, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGIO, old)


def eml(test_id: str, *, frm: str = "bob@fabrikam.test", to: str | None = ALICE,
        subject: str | None = None, extra: bytes = b"", body: bytes | None = None) -> bytes:
    """A Pickup file (LF line endings) carrying a unique X-Test-Id."""
    head = f"From: {frm}\n".encode()
    if to is not None:
        head += f"To: {to}\n".encode()
    head += f"Subject: {subject or test_id}\nX-Test-Id: {test_id}\n".encode() + extra
    return head + b"\n" + (body if body is not None else f"Body of {test_id}.\n".encode())


def delivered_file(env: MailgateEnv, test_id: str, timeout: float = 10.0) -> Path:
    def find() -> Path | None:
        for p in [*mailbox_files(env), *drop_files(env)]:
            if test_id in x_test_ids(p):
                return p
        return None
    found = wait_for(find, timeout=timeout, what=f"delivery of {test_id}")
    assert isinstance(found, Path)
    return found


@contextlib.contextmanager
def running_node(env: MailgateEnv) -> Iterator[NodeThread]:
    """The in-process node, stopped when the block ends."""
    n = NodeThread(env)
    try:
        yield n
    finally:
        n.stop()


def assert_node_alive(env: MailgateEnv, n: NodeThread, test_id: str) -> None:
    """The node still runs and delivers a normal file within 10 s."""
    assert n._thread.is_alive(), "the node thread died"
    drop_file(env.pickup, f"{test_id}.eml", eml(test_id))
    delivered_file(env, test_id)
    wait_gone(env.pickup / f"{test_id}.eml")


# -- T35 partial files ---------------------------------------------------------------------


def test_t35_file_open_for_writing_is_read_only_when_complete(
        demo_env: MailgateEnv, node: NodeThread) -> None:
    """A file still open for writing is not read; it is delivered complete once closed."""
    path = demo_env.pickup / "slow.eml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"From: bob@fabrikam.test\nTo: alice@contoso.test\nSubject: slow\n"
                     b"X-Test-Id: slow\n\n")
        time.sleep(1.5)
        # Several scans (inotify + 0.2 s re-checks) have seen it: still untouched.
        assert listing(demo_env.pickup) == ["slow.eml"]
        assert delivered(demo_env)["slow"] == 0
        time.sleep(1.5)
        assert listing(demo_env.pickup) == ["slow.eml"]
        os.write(fd, b"The body, written after three seconds.\n")
    finally:
        os.close(fd)
    got = delivered_file(demo_env, "slow")
    _, body = split_message(got.read_bytes())
    assert body == b"The body, written after three seconds.\n"
    wait_gone(path)
    time.sleep(0.5)
    assert delivered(demo_env)["slow"] == 1
    assert listing(demo_env.pickup) == []


def test_t35_write_elsewhere_then_rename_is_picked_up_once(
        demo_env: MailgateEnv, node: NodeThread) -> None:
    """A writer's own `x.tmp` in the folder is ignored; after rename to x.eml it is sent once."""
    tmp = demo_env.pickup / "x.tmp"
    with open(tmp, "wb") as f:
        f.write(eml("renamed")[:40])
        f.flush()
        time.sleep(1.0)
        assert listing(demo_env.pickup) == ["x.tmp"]  # not a *.eml: never touched
        f.write(eml("renamed")[40:])
    os.rename(tmp, demo_env.pickup / "x.eml")
    got = delivered_file(demo_env, "renamed")
    assert split_message(got.read_bytes())[1] == b"Body of renamed.\n"
    wait_gone(demo_env.pickup / "x.eml")
    time.sleep(1.0)
    assert delivered(demo_env) == Counter({"renamed": 1})
    assert listing(demo_env.pickup) == []


# -- T36 hostile file types ----------------------------------------------------------------


def test_t36_hostile_file_types_are_badmail_and_never_read(
        demo_env: MailgateEnv, node: NodeThread, tmp_path: Path) -> None:
    """Symlink, hard link, FIFO, directory and socket named *.eml: never read, each .bad."""
    env = demo_env
    outside = tmp_path / "outside"
    outside.mkdir()
    # The secret is itself a valid Pickup message: if it were ever read it would be sent.
    secret_bytes = eml("SECRET", subject="TOPSECRET-7f3a", body=b"TOPSECRET-BODY-7f3a\n")
    secret = outside / "secret.eml"
    secret.write_bytes(secret_bytes)
    linked = outside / "linked.eml"
    linked.write_bytes(eml("HARDLINK", body=b"TOPSECRET-HARDLINK-7f3a\n"))
    secret_stat = os.stat(secret)

    p = env.pickup
    os.symlink(secret, p / "a.eml")
    os.link(linked, p / "b.eml")
    os.mkfifo(p / "c.eml")
    (p / "d.eml").mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(p / "e.eml"))
        drop_file(p, "valid.eml", eml("valid"))
        t0 = time.monotonic()
        delivered_file(env, "valid", timeout=5.0)  # the FIFO did not block the scanner
        assert time.monotonic() - t0 < 5.0

        reasons = {base: wait_bad(env.pickup, base) for base in "abcde"}
    finally:
        sock.close()
    assert "symbolic link" in reasons["a"], reasons["a"]
    assert "hard link" in reasons["b"], reasons["b"]
    assert "FIFO" in reasons["c"], reasons["c"]
    assert "directory" in reasons["d"], reasons["d"]
    assert "socket" in reasons["e"], reasons["e"]
    for base in "abcde":
        assert reasons[base].startswith(f"{base}.eml "), reasons[base]

    # The planted objects were renamed, not followed or replaced.
    assert (p / "a.bad").is_symlink() and os.readlink(p / "a.bad") == str(secret)
    assert os.stat(p / "b.bad").st_ino == os.stat(linked).st_ino
    assert stat_mod.S_ISFIFO(os.lstat(p / "c.bad").st_mode)
    assert (p / "d.bad").is_dir()
    assert stat_mod.S_ISSOCK(os.lstat(p / "e.bad").st_mode)
    # The symlink's target is untouched.
    assert secret.read_bytes() == secret_bytes
    after = os.stat(secret)
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns, after.st_nlink) == (
        secret_stat.st_ino, secret_stat.st_mtime_ns, secret_stat.st_ctime_ns, 1)
    assert linked.exists() and os.stat(linked).st_nlink == 2

    # Nothing of the targets was delivered, dropped or stored.
    time.sleep(0.5)
    assert delivered(env) == Counter({"valid": 1})
    outputs = [*env.data.joinpath("mailboxes").rglob("*"), *env.drop.rglob("*"),
               *env.data.glob("mailgate.db*")]
    for out in outputs:
        if out.is_file():
            data = out.read_bytes()
            assert b"TOPSECRET" not in data, out
    # One BADMAIL event each.
    bad = tracking(env, event_id="BADMAIL", source="PICKUP")
    assert Counter(e.source_context for e in bad) == Counter(
        {f"{b}.eml": 1 for b in "abcde"})
    assert sorted(listing(p)) == sorted(
        [f"{b}.bad" for b in "abcde"] + [f"{b}.bad.reason" for b in "abcde"])


# -- T37 zero-byte, unreadable, non-.eml files -----------------------------------------------


_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2


def _drop_dac_capabilities() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def start_serve_without_dac_override(env: MailgateEnv) -> subprocess.Popen[bytes]:
    """`mailgate serve` as root but without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so file
    modes apply to it as to an unprivileged service account (the tests run as root; the
    interpreter lives under /root, so switching to `nobody` is not possible here)."""
    log = open(env.log, "ab")
    env.proc = subprocess.Popen(
        [sys.executable, "-m", "mailgate", "-c", str(env.config), "serve"],
        cwd=env.root, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_drop_dac_capabilities)
    log.close()
    wait_for(lambda: b"started" in env.log.read_bytes() or env.proc.poll() is not None,
             timeout=20, what="mailgate serve to start")
    assert env.proc.poll() is None, env.log.read_text()
    return env.proc


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to simulate an unreadable file")
def test_t37_empty_unreadable_txt_and_uppercase_files(demo_env: MailgateEnv) -> None:
    """empty -> .bad (no sender); mode 000 -> left, logged once, sent once readable;
    .txt ignored; x.EML processed."""
    env = demo_env
    p = env.pickup
    (p / "empty.eml").write_bytes(b"")
    note = p / "note.txt"
    note.write_bytes(eml("note"))
    os.utime(note, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    note_stat = os.stat(note)
    noperm = p / "noperm.eml"
    noperm.write_bytes(eml("noperm"))
    os.chmod(noperm, 0)
    drop_file(p, "x.EML", eml("upper"))

    start_serve_without_dac_override(env)
    reason = wait_bad(env.pickup, "empty")
    assert "sender" in reason.lower(), reason
    delivered_file(env, "upper")
    wait_gone(p / "x.EML")

    time.sleep(2.0)  # > 1 s poll interval and many 0.2 s re-checks of the not-ready file
    assert noperm.exists() and os.stat(noperm).st_mode & 0o777 == 0
    assert delivered(env)["noperm"] == 0
    assert note.read_bytes() == eml("note")
    assert os.stat(note).st_mtime_ns == note_stat.st_mtime_ns
    assert listing(p) == sorted(["empty.bad", "empty.bad.reason", "note.txt", "noperm.eml"])
    assert env.log.read_text().count("noperm.eml is not readable") == 1

    os.chmod(noperm, 0o644)
    delivered_file(env, "noperm")
    wait_gone(noperm)
    time.sleep(0.5)
    assert delivered(env) == Counter({"upper": 1, "noperm": 1})
    assert listing(p) == ["empty.bad", "empty.bad.reason", "note.txt"]
    assert env.log.read_text().count("noperm.eml is not readable") == 1
    assert note.read_bytes() == eml("note")
    assert env.proc is not None and env.proc.poll() is None


# -- T38 duplicate names -------------------------------------------------------------------


def test_t38_duplicate_names_and_leftovers(demo_env: MailgateEnv, node: NodeThread) -> None:
    """x.tmp and x.bad leftovers stay untouched; x.eml dropped twice is delivered twice."""
    env = demo_env
    p = env.pickup
    leftovers = {"x.tmp": b"a writer's own temporary file\n", "x.bad": b"an old badmail\n",
                 "x.bad.reason": b"old reason\n"}
    for name, data in leftovers.items():
        (p / name).write_bytes(data)
    before = {name: os.stat(p / name) for name in leftovers}

    same = eml("twice")  # byte-identical content both times
    drop_file(p, "x.eml", same)
    wait_for(lambda: delivered(env)["twice"] == 1, what="first x.eml")
    wait_gone(p / "x.eml")
    drop_file(p, "x.eml", same)
    wait_for(lambda: delivered(env)["twice"] == 2, what="second x.eml")
    wait_gone(p / "x.eml")
    time.sleep(0.5)
    assert delivered(env) == Counter({"twice": 2})
    for name, data in leftovers.items():
        assert (p / name).read_bytes() == data, name
        st = os.stat(p / name)
        assert (st.st_ino, st.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)
    assert listing(p) == sorted(leftovers)


def test_t38_bad_file_while_bad_name_exists_gets_datetime_name(
        demo_env: MailgateEnv, node: NodeThread) -> None:
    """A bad y.eml while y.bad exists becomes y<datetime>.bad with its own reason file."""
    p = demo_env.pickup
    (p / "y.bad").write_bytes(b"older badmail\n")
    (p / "y.bad.reason").write_bytes(b"older reason\n")
    drop_file(p, "y.eml", b"To: alice@contoso.test\nSubject: no sender\n\nbody\n")

    def new_bad() -> list[str]:
        return [n for n in os.listdir(p) if re.fullmatch(rf"y{BAD_DATETIME_RE}\.bad", n)]
    names = wait_for(new_bad, what="y<datetime>.bad")
    assert len(names) == 1  # type: ignore[arg-type]
    base = names[0][:-4]  # type: ignore[index]
    reason = wait_bad(demo_env.pickup, base)
    assert "sender" in reason.lower(), reason
    bad_bytes = (p / f"{base}.bad").read_bytes()
    assert bad_bytes == b"To: alice@contoso.test\nSubject: no sender\n\nbody\n"
    assert (p / "y.bad").read_bytes() == b"older badmail\n"
    assert (p / "y.bad.reason").read_bytes() == b"older reason\n"
    assert listing(p) == sorted(["y.bad", "y.bad.reason", f"{base}.bad", f"{base}.bad.reason"])


def test_t38_reason_file_never_written_through_a_planted_symlink(
        demo_env: MailgateEnv, node: NodeThread, tmp_path: Path) -> None:
    """A planted `z.bad.reason` symlink is not followed: its target stays unchanged."""
    victim = tmp_path / "victim.conf"
    victim.write_bytes(b"important=1\n")
    p = demo_env.pickup
    os.symlink(victim, p / "z.bad.reason")
    drop_file(p, "z.eml", b"To: alice@contoso.test\nSubject: no sender\n\nbody\n")
    wait_for(lambda: any(n.startswith("z") and n.endswith(".bad") for n in os.listdir(p)),
             what="z badmail")
    time.sleep(0.5)
    assert victim.read_bytes() == b"important=1\n"
    assert (p / "z.bad.reason").is_symlink()


# -- T39 crash windows ---------------------------------------------------------------------


def test_t39a_claimed_leftover_present_at_start_is_processed_once(
        demo_env: MailgateEnv) -> None:
    """A `<name>.eml.testnode-<token>.tmp` left by a crash before the commit is submitted
    once; another node's claimed file is left alone."""
    p = demo_env.pickup
    mine = f"left.eml.{NODE}-0123456789abcdef.tmp"
    theirs = "left.eml.othernode-0123456789abcdef.tmp"
    (p / mine).write_bytes(eml("leftover"))
    (p / theirs).write_bytes(eml("other-node"))
    with running_node(demo_env):
        delivered_file(demo_env, "leftover")
        wait_gone(p / mine)
        time.sleep(1.0)
        assert delivered(demo_env) == Counter({"leftover": 1})
        assert listing(p) == [theirs]
    receive = [e for e in tracking(demo_env, event_id="RECEIVE")
               if e.source_context == "left.eml"]
    assert len(receive) == 1


@pytest.mark.parametrize("point", ["pickup-after-claim", "pickup-after-commit"])
def test_t39b_crash_after_claim_or_commit_delivers_once(demo_env: MailgateEnv,
                                                         point: str) -> None:
    """`mailgate serve` dies (as kill -9) right after claiming a file, or after committing
    its message but before deleting the file: after a restart it is delivered exactly
    once (a file that survived its commit is recognised by its claim token and content
    hash: pickup_seen)."""
    env = demo_env
    p = env.pickup
    proc = env.start(env={"MAILGATE_CRASH_AT": point})
    drop_file(p, "dup.eml", eml("dup"))
    proc.wait(timeout=10)
    assert proc.returncode == 137, env.log.read_text()
    [claimed] = listing(p)  # the claimed file survived the crash
    assert re.fullmatch(rf"dup\.eml\.{NODE}-[0-9a-f]{{16}}\.tmp", claimed), claimed
    env.start()
    delivered_file(env, "dup")
    wait_gone(p / claimed)
    time.sleep(1.0)
    assert delivered(env) == Counter({"dup": 1})
    assert listing(p) == []
    receive = [e for e in tracking(env, event_id="RECEIVE") if e.source_context == "dup.eml"]
    assert len(receive) == 1


def test_sigterm_during_badmail_burst_stops_the_node(demo_env: MailgateEnv) -> None:
    """SIGTERM while Pickup is turning many files into badmail ends the process promptly."""
    env = demo_env
    for i in range(1000):
        drop_file(env.pickup, f"bad{i:04d}.eml", b"To: alice@contoso.test\n\nno sender\n")
    proc = env.start()
    wait_for(lambda: any(n.endswith(".bad") for n in os.listdir(env.pickup)), timeout=10,
             interval=0.001, what="the first .bad file")
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("mailgate serve did not exit within 5 s of SIGTERM")
    assert proc.returncode == 0


@pytest.mark.slow
def test_t39c_kill9_during_pickup_of_200_files_delivers_each_once(
        demo_env: MailgateEnv) -> None:
    """kill -9 of `mailgate serve` while it claims 200 files, again while it deletes the
    files of the committed batch, and again while it delivers: after the last restart
    every message is delivered exactly once and the folder is empty."""
    env = demo_env
    p = env.pickup
    ids = [f"crash-{i:03d}" for i in range(200)]
    for i in ids:
        drop_file(p, f"{i}.eml", eml(i))

    env.start()  # 1: killed at the first claim (rename to <name>.eml.testnode.tmp)
    wait_for(lambda: len([n for n in os.listdir(p) if n.endswith(".eml")]) < 200,
             timeout=10, interval=0.001, what="the first claim")
    env.kill()
    env.start()  # 2: killed at the first deletion: the batch is committed, files remain
    wait_for(lambda: len(os.listdir(p)) < 200, timeout=10, interval=0.001,
             what="the first deletion after the restart")
    env.kill()
    env.start()  # 3: killed at the first delivery
    wait_for(lambda: sum(delivered(env).values()) > 0, timeout=10, interval=0.001,
             what="the first delivery")
    env.kill()
    env.start()
    wait_for(lambda: set(delivered(env)) >= set(ids) and not os.listdir(p), timeout=10,
             what="all 200 delivered and the folder empty")
    time.sleep(1.0)
    counts = delivered(env)
    assert {i: n for i, n in counts.items() if n != 1} == {}, "duplicates"
    assert set(counts) == set(ids)
    assert listing(p) == []
    receive = [e for e in tracking(env, event_id="RECEIVE", result_size=10_000)
               if e.source == "PICKUP"]
    assert Counter(e.source_context for e in receive) == Counter(
        {f"{i}.eml": 1 for i in ids})


# -- T40 limits and rewriting --------------------------------------------------------------


def test_t40_header_larger_than_limit_is_badmail(demo_env: MailgateEnv,
                                                  node: NodeThread) -> None:
    """A 70 KB header (limit 64 KB) -> .bad naming PickupDirectoryMaxHeaderSize."""
    filler = b"".join(b"X-Filler-%05d: " % i + b"f" * 60 + b"\n" for i in range(1000))
    assert len(filler) > 70 * 1024
    drop_file(demo_env.pickup, "big.eml", eml("bighdr", extra=filler))
    reason = wait_bad(demo_env.pickup, "big")
    assert "PickupDirectoryMaxHeaderSize" in reason, reason
    assert delivered(demo_env)["bighdr"] == 0


def _ndr_for_101_recipients(env: MailgateEnv) -> tuple[Path, email.message.Message]:
    rcpts = ", ".join(f"user{i}@example.test" for i in range(101))
    drop_file(env.pickup, "many.eml", eml("many", frm=ALICE, to=rcpts, subject="many"))
    wait_gone(env.pickup / "many.eml")
    path = wait_for(lambda: mailbox_files(env), what="the NDR")[0]  # type: ignore[index]
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    return path, msg


def test_t40_too_many_recipients_ndr_to_the_sender(demo_env: MailgateEnv,
                                                   node: NodeThread) -> None:
    """101 recipients from a valid sender -> RFC 3464 NDR 5.5.3 from <> and the file is
    deleted; nobody else gets anything."""
    path, msg = _ndr_for_101_recipients(demo_env)
    raw = path.read_bytes()
    assert raw.startswith(b"Return-Path: <>\n")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert re.search(rb"(?m)^Status: 5\.5\.3\r?$", raw), raw[:3000]
    assert b"PickupDirectoryMaxRecipientsPerMessage" in raw
    time.sleep(0.5)
    assert len(mailbox_files(demo_env)) == 1
    assert listing(demo_env.pickup) == []  # deleted, not .bad
    assert [e for e in tracking(demo_env, recipient="user1@example.test")
            if e.event_id in ("RECEIVE", "SUBMIT")] == []


def test_t40_too_many_recipients_ndr_names_the_message_and_its_recipients(
        demo_env: MailgateEnv, node: NodeThread) -> None:
    """The NDR's subject names the original subject and its per-recipient fields name the
    original recipients, not the sender."""
    path, msg = _ndr_for_101_recipients(demo_env)
    raw = path.read_bytes()
    assert msg["Subject"] == "Undeliverable: many"
    finals = re.findall(rb"(?mi)^Final-Recipient: *rfc822; *(\S+?)\r?$", raw)
    assert finals and b"alice@contoso.test" not in finals
    assert all(f.endswith(b"@example.test") for f in finals)


def test_t40_bcc_only_multiple_from_and_missing_fields(demo_env: MailgateEnv,
                                                       node: NodeThread) -> None:
    """Bcc-only -> To: Undisclosed Recipients:; and no Bcc; several From without Sender
    -> .bad; missing Date and Message-ID -> added; malformed Date -> replaced."""
    env = demo_env
    drop_file(env.pickup, "bcc.eml",
              b"From: bob@fabrikam.test\nBcc: alice@contoso.test\nSubject: bcc\n"
              b"X-Test-Id: bcc\n\nhidden recipients\n")
    drop_file(env.pickup, "froms.eml",
              eml("froms", frm="bob@fabrikam.test, carol@fabrikam.test"))
    drop_file(env.pickup, "nodate.eml", eml("nodate"))
    drop_file(env.pickup, "baddate.eml", eml("baddate", extra=b"Date: not a date at all\n"))

    head, body = split_message(delivered_file(env, "bcc").read_bytes())
    assert body == b"hidden recipients\n"
    assert re.search(rb"(?m)^To: Undisclosed Recipients:;$", head), head
    assert not re.search(rb"(?mi)^bcc:", head), head

    reason = wait_bad(env.pickup, "froms")
    assert "Sender" in reason and "From" in reason, reason

    for tid in ("nodate", "baddate"):
        head, _ = split_message(delivered_file(env, tid).read_bytes())
        dates = re.findall(rb"(?mi)^Date: *(.*)$", head)
        assert len(dates) == 1, head
        assert email.utils.parsedate_to_datetime(dates[0].decode()) is not None
        assert abs(email.utils.parsedate_to_datetime(dates[0].decode()).timestamp()
                   - time.time()) < 120
        ids = re.findall(rb"(?mi)^Message-ID: *(<[^>\s]+@contoso\.test>)$", head)
        assert len(ids) == 1, head
    assert listing(env.pickup) == ["froms.bad", "froms.bad.reason"]


def test_t40_received_and_resent_stripped_our_received_first(
        demo_env: MailgateEnv, node: NodeThread) -> None:
    """Received:/Resent-* are removed and our `Received: ... with mailgate Pickup;` is first;
    Resent-To adds no recipient."""
    env = demo_env
    extra = (b"Received: from evil.example by relay.example; Mon, 1 Jan 2024 00:00:00 +0000\n"
             b"Received: from a by b;\n Mon, 1 Jan 2024 00:00:00 +0000\n"
             b"Resent-From: mallory@example.test\nResent-To: eve@example.test\n"
             b"Resent-Date: Mon, 1 Jan 2024 00:00:00 +0000\nDate: Tue, 2 Jan 2024 10:00:00 +0000\n"
             b"Message-ID: <kept@example.test>\n")
    drop_file(env.pickup, "trace.eml", eml("trace", extra=extra))
    head, body = split_message(delivered_file(env, "trace").read_bytes())
    lines = head.decode().split("\n")
    assert lines[0] == "Return-Path: <bob@fabrikam.test>"
    assert lines[1] == f"Delivered-To: {ALICE}"
    assert re.fullmatch(r"Received: from localhost by \S+ with mailgate Pickup; .+", lines[2]), \
        lines[2]
    assert email.utils.parsedate_to_datetime(lines[2].split("; ", 1)[1]) is not None
    assert len(re.findall(r"(?mi)^Received:", head.decode())) == 1
    assert not re.search(rb"(?mi)^Resent-", head)
    assert b"evil.example" not in head and b"Mon, 1 Jan 2024" not in head
    assert re.findall(rb"(?m)^Date: (.*)$", head) == [b"Tue, 2 Jan 2024 10:00:00 +0000"]
    assert re.findall(rb"(?mi)^Message-ID: (.*)$", head) == [b"<kept@example.test>"]
    assert body == b"Body of trace.\n"
    time.sleep(0.3)
    assert tracking(env, recipient="eve@example.test") == []
    assert listing(env.pickup) == []


# -- T32 / T33 parser DoS and header injection via Pickup -----------------------------------


def _nested_body(depth: int) -> bytes:
    parts = []
    for level in range(1, depth):
        parts.append(b'--b%d\nContent-Type: multipart/mixed; boundary="b%d"\n\n' % (level - 1,
                                                                                    level))
    parts.append(b"--b%d\nContent-Type: text/plain\n\ninnermost\n" % (depth - 1))
    for level in range(depth - 1, -1, -1):
        parts.append(b"--b%d--\n" % level)
    return b"".join(parts)


_MIME = b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="%s"\n'
HOSTILE = {
    # name: (file bytes, expected body when delivered, or the reason's expected text)
    "nest1000": (eml("nest1000", extra=_MIME % b"b0", body=_nested_body(1000)), None),
    "parts100k": (eml("parts100k", extra=_MIME % b"a",
                      body=b"--a\nX:y\n\nz\n" * 100_000 + b"--a--\n"), None),
    "header5mb": (eml("header5mb", extra=b"X-Huge: " + b"h" * (5 * 1024 * 1024) + b"\n"),
                  "PickupDirectoryMaxHeaderSize"),
    "mixedlf": (b"From: bob@fabrikam.test\r\nTo: alice@contoso.test\r\n"
                b"Subject: a\nBcc: hidden@example.test\r\nX-Test-Id: mixedlf\r\n\r\nbody\r\n",
                "line ending"),
    "barecr": (b"From: bob@fabrikam.test\r\nTo: alice@contoso.test\r\n"
               b"Subject: a\rBcc: hidden@example.test\r\nX-Test-Id: barecr\r\n\r\nbody\r\n",
               "bare CR"),
    "barecrlf": (b"From: bob@fabrikam.test\nTo: alice@contoso.test\n"
                 b"Subject: a\rX-Injected: 1\nX-Test-Id: barecrlf\n\nbody\n", "bare CR"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_t32_t33_hostile_content_is_carried_or_badmail(
        demo_env: MailgateEnv, node: NodeThread, case: str) -> None:
    """Deep nesting / 100 000 parts are carried byte-identical; a 5 MB header, mixed line
    endings and bare CR are .bad; no injected Bcc recipient; the node keeps delivering."""
    env = demo_env
    data, expect = HOSTILE[case]
    t0 = time.monotonic()
    drop_file(env.pickup, f"{case}.eml", data)
    if expect is None:
        got = delivered_file(env, case, timeout=10.0)
        _, body = split_message(got.read_bytes())
        assert body == split_message(data)[1]
    else:
        reason = wait_bad(env.pickup, case, timeout=10.0)
        assert expect in reason, reason
        assert delivered(env)[case] == 0
    assert time.monotonic() - t0 < 10.0
    assert tracking(env, recipient="hidden@example.test") == []
    assert not (env.data / "mailboxes").exists() or not any(
        b"X-Injected" in split_message(f.read_bytes())[0] for f in mailbox_files(env))
    assert_node_alive(env, node, f"after-{case}")


# -- Rate limit ----------------------------------------------------------------------------


def test_rate_limit_spreads_files_over_time_and_unlimited_releases_them(
        demo_env: MailgateEnv, node: NodeThread) -> None:
    """At 1 message/minute only one of three files is processed; `unlimited` sends the rest."""
    env = demo_env
    env.cli("transport-service", "set", "--pickup-directory-max-messages-per-minute", "1")
    time.sleep(0.6)  # the node re-reads the organization every 0.25 s
    for i in range(3):
        drop_file(env.pickup, f"rate{i}.eml", eml(f"rate{i}"))
    wait_for(lambda: sum(delivered(env).values()) >= 1, timeout=5, what="the first file")
    time.sleep(3.0)
    assert sum(delivered(env).values()) == 1
    left = listing(env.pickup)
    assert len(left) == 2 and all(re.fullmatch(r"rate\d\.eml", n) for n in left), left

    env.cli("transport-service", "set", "--pickup-directory-max-messages-per-minute",
            "unlimited")
    wait_for(lambda: delivered(env) == Counter({"rate0": 1, "rate1": 1, "rate2": 1}),
             timeout=10, what="all three files")
    wait_for(lambda: listing(env.pickup) == [], timeout=5, what="the folder to empty")


# -- Changing the path while running -------------------------------------------------------


def test_pickup_path_change_and_null_while_running(demo_env: MailgateEnv, node: NodeThread,
                                                   tmp_path: Path) -> None:
    """A new path is used at once, the old folder is left alone; `$null` disables Pickup."""
    env = demo_env
    new = tmp_path / "pickup2"
    assert not new.exists()
    env.cli("transport-service", "set", "--pickup-directory-path", str(new))
    wait_for(new.is_dir, timeout=5, what="the new folder to be created")
    drop_file(new, "new.eml", eml("in-new"))
    delivered_file(env, "in-new")
    wait_gone(new / "new.eml")

    drop_file(env.pickup, "old.eml", eml("in-old"))
    time.sleep(2.0)
    assert listing(env.pickup) == ["old.eml"]
    assert delivered(env)["in-old"] == 0

    env.cli("transport-service", "set", "--pickup-directory-path", "$null")
    shown = env.cli("transport-service", "get", "--json").stdout
    assert '"PickupDirectoryPath": null' in shown, shown
    time.sleep(1.0)
    drop_file(new, "off.eml", eml("while-off"))
    time.sleep(2.5)
    assert listing(new) == ["off.eml"]
    assert listing(env.pickup) == ["old.eml"]
    assert delivered(env) == Counter({"in-new": 1})
    assert node._thread.is_alive()


# -- Tracking ------------------------------------------------------------------------------


def test_tracking_receive_and_badmail_events(demo_env: MailgateEnv, node: NodeThread) -> None:
    """RECEIVE (source PICKUP, source_context = file name) and BADMAIL events are stored."""
    env = demo_env
    drop_file(env.pickup, "track.eml",
              eml("track", extra=b"Message-ID: <track-1@example.test>\n", subject="tracked"))
    drop_file(env.pickup, "trackbad.eml", b"To: alice@contoso.test\nSubject: x\n\nno sender\n")
    delivered_file(env, "track")
    reason = wait_bad(env.pickup, "trackbad")

    def receive() -> list[TrackingEvent]:
        return [e for e in tracking(env, event_id="RECEIVE", source="PICKUP")
                if e.source_context == "track.eml"]
    [ev] = wait_for(receive, what="the RECEIVE event")  # type: ignore[misc]
    assert ev.message_id == "<track-1@example.test>"
    assert ev.sender == "bob@fabrikam.test"
    assert ev.recipients == [ALICE]
    assert ev.subject == "tracked"
    submit = tracking(env, event_id="SUBMIT", message_id="<track-1@example.test>")
    assert len(submit) == 1

    def badmail() -> list[TrackingEvent]:
        return [e for e in tracking(env, event_id="BADMAIL", source="PICKUP")
                if e.source_context == "trackbad.eml"]
    [bad] = wait_for(badmail, what="the BADMAIL event")  # type: ignore[misc]
    assert bad.message_info == reason
    assert "sender" in (bad.message_info or "").lower()


# -- Starvation by files that are not ready ------------------------------------------------


def test_files_not_ready_do_not_starve_complete_files(demo_env: MailgateEnv,
                                                      node: NodeThread) -> None:
    """200 older files still open for writing do not stop a complete file being sent."""
    env = demo_env
    fds = []
    try:
        for i in range(200):
            fds.append(os.open(env.pickup / f"open{i:03d}.eml",
                               os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        time.sleep(0.05)
        drop_file(env.pickup, "ready.eml", eml("ready"))
        delivered_file(env, "ready", timeout=3.0)
    finally:
        for i, fd in enumerate(fds):  # never let them turn into 200 empty files
            os.unlink(env.pickup / f"open{i:03d}.eml")
            os.close(fd)


def test_stop_coinciding_with_a_pickup_wakeup_ends_the_node(demo_env: MailgateEnv) -> None:
    """A stop requested in the same instant as a file notification still stops the node."""
    n = NodeThread(demo_env)
    loop = n._loop
    assert loop is not None
    time.sleep(0.5)  # Pickup is idle, waiting for a wake-up or its 1 s poll

    def stop_and_wake() -> None:  # a SIGTERM and an inotify event in one loop iteration
        n.node.stop()
        n.node.pickup._wake.set()
    try:
        loop.call_soon_threadsafe(stop_and_wake)
        n._thread.join(5)
        assert not n._thread.is_alive(), "the node did not stop within 5 s"
    finally:
        if n._thread.is_alive():  # release it: a second cancellation is not lost
            def cancel_pickup() -> None:
                for task in asyncio.all_tasks(loop):
                    if task.get_name() == "pickup":
                        task.cancel()
            loop.call_soon_threadsafe(cancel_pickup)
        n.stop()


def test_pickup_folder_removed_while_running_is_recreated(demo_env: MailgateEnv) -> None:
    """If the Pickup folder disappears while the node runs, it is created again and files
    dropped into it afterwards are delivered (no crash, no busy loop)."""
    import shutil

    with running_node(demo_env) as n:
        shutil.rmtree(demo_env.pickup)
        wait_for(lambda: demo_env.pickup.is_dir(), timeout=10, what="the folder to come back")
        drop_file(demo_env.pickup, "back.eml", eml("back"))
        delivered_file(demo_env, "back")
        assert n._thread.is_alive()


def test_backlog_larger_than_a_batch_and_files_arriving_meanwhile_each_delivered_once(
        demo_env: MailgateEnv) -> None:
    """A folder of 600 files is listed and worked through batch by batch; files that arrive
    meanwhile, and a listed file removed by someone else before its turn, are handled:
    every remaining file is delivered exactly once."""
    env = demo_env
    for i in range(600):
        drop_file(env.pickup, f"old{i:04d}.eml", eml(f"old{i:04d}"))
    with running_node(env):
        (env.pickup / "old0599.eml").unlink(missing_ok=True)
        for i in range(50):
            drop_file(env.pickup, f"new{i:04d}.eml", eml(f"new{i:04d}"))
        expected = {f"old{i:04d}" for i in range(599)} | {f"new{i:04d}" for i in range(50)}

        def all_delivered() -> bool:
            return expected <= set(delivered(env))
        wait_for(all_delivered, timeout=60, what="649 deliveries")
        wait_for(lambda: not [p for p in os.listdir(env.pickup) if p.endswith(".tmp")],
                 timeout=10, what="claimed files to be deleted")
    counts = delivered(env)
    assert {k: v for k, v in counts.items() if v != 1} == {}
    assert set(counts) - expected <= {"old0599"}  # it may have been taken before the unlink
