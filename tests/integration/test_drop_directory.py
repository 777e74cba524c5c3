"""The Drop directory writer on real folders (deliver/drop.py, deliver/files.py).

PRODUCT §4.6 is the file contract published to gateway authors; reliability.md T42 is the
writer-safety test. Deliveries are built by hand as the queue would claim them.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import stat
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from mailgate.deliver import drop as drop_mod
from mailgate.deliver import files
from mailgate.deliver.drop import (
    DropDirectory,
    DropDirectoryError,
    drop_file_name,
    envelope_header,
)
from mailgate.store import ClaimedDelivery, ClaimedRecipient

NAME_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{32}\.eml$")
CREATED = dt.datetime(2027, 1, 15, 8, 4, 5, tzinfo=dt.timezone.utc).timestamp() + 0.75
STAMP = "20270115T080405Z"


# -- helpers -------------------------------------------------------------------------------


class Messages:
    """Stored message bytes by message id, served in small chunks like iter_content."""

    def __init__(self) -> None:
        self.data: dict[int, bytes] = {}

    def add(self, mid: int, data: bytes) -> None:
        self.data[mid] = data

    def content(self, d: ClaimedDelivery) -> Iterator[bytes]:
        data = self.data[d.message_id]
        for i in range(0, len(data), 7):
            yield data[i:i + 7]


def rcpt(address: str, rid: int = 1, *, notify: str | None = None,
         orcpt: str | None = None) -> ClaimedRecipient:
    return ClaimedRecipient(rid, address, None, orcpt, notify, None)


def claimed(msgs: Messages, mid: int, data: bytes | None = None, *,
            recipients: list[ClaimedRecipient] | None = None, sender: str = "a@contoso.test",
            recovering: bool = False, **kw: object) -> ClaimedDelivery:
    data = data if data is not None else (
        f"Subject: message {mid}\r\n\r\nbody {mid}\r\n".encode())
    msgs.add(mid, data)
    fields: dict[str, object] = dict(
        id=mid, message_id=mid, queue_id=1, token=uuid.uuid4().hex, created=CREATED,
        retry_count=0, recovering=recovering, from_address=sender,
        internet_message_id=f"<{mid}@contoso.test>", subject=f"message {mid}",
        size=len(data), date_received=CREATED, ret=None, envid=None, is_dsn=False,
        recipients=recipients if recipients is not None else [rcpt("FAX:+15551234", mid)])
    fields.update(kw)
    return ClaimedDelivery(**fields)  # type: ignore[arg-type]


def expected_file(d: ClaimedDelivery, data: bytes) -> bytes:
    return envelope_header(d) + data


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def hidden(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".")]


@pytest.fixture(autouse=True)
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    p = tmp_path / "drop" / "Fax"
    p.mkdir(parents=True)
    return p


@pytest.fixture
def msgs() -> Messages:
    return Messages()


# -- the file contract -----------------------------------------------------------------


def test_file_name_is_utc_created_stamp_and_token(msgs: Messages) -> None:
    """The name is <UTC yyyymmddThhmmssZ of delivery.created>-<token>.eml."""
    d = claimed(msgs, 1)
    assert drop_file_name(d) == f"{STAMP}-{d.token}.eml"
    assert NAME_RE.match(drop_file_name(d))


def test_file_content_is_envelope_then_stored_bytes(folder: Path, msgs: Messages) -> None:
    """X-Sender (RET, ENVID), an X-Receiver per recipient (NOTIFY, ORCPT), length, bytes."""
    data = b"Received: from x\r\nSubject: fax\r\n\r\nline 1\r\nline 2\r\n\x00\xff binary\r\n"
    d = claimed(msgs, 1, data, ret="HDRS", envid="QQ314159", recipients=[
        rcpt("julia@contoso.test", 1, notify="SUCCESS,FAILURE", orcpt="rfc822;julia@contoso.test"),
        rcpt("FAX:+15551234", 2),
        rcpt("SMS:+4470000", 3, notify="NEVER"),
    ])
    outcomes, error = DropDirectory(folder, None).deliver([d], msgs.content)
    assert error is None
    name = f"{STAMP}-{d.token}.eml"
    assert [(o.delivery, o.file_name, o.size) for o in outcomes] == [
        (d, name, (folder / name).stat().st_size)]
    xheaders = (b"X-Sender: <a@contoso.test> RET=HDRS ENVID=QQ314159\r\n"
                b"X-Receiver: <julia@contoso.test> NOTIFY=SUCCESS,FAILURE"
                b" ORCPT=rfc822;julia@contoso.test\r\n"
                b"X-Receiver: <FAX:+15551234>\r\n"
                b"X-Receiver: <SMS:+4470000> NOTIFY=NEVER\r\n")
    assert (folder / name).read_bytes() == (
        xheaders + f"X-EndOfInjectedXHeaders: {len(xheaders)}\r\n".encode() + data)
    assert listing(folder) == [name]


def test_envelope_without_options(msgs: Messages) -> None:
    """Without RET/ENVID/NOTIFY/ORCPT the lines carry only the addresses."""
    d = claimed(msgs, 1, b"x")
    block = b"X-Sender: <a@contoso.test>\r\nX-Receiver: <FAX:+15551234>\r\n"
    assert envelope_header(d) == block + f"X-EndOfInjectedXHeaders: {len(block)}\r\n".encode()


def test_null_sender_is_written_as_empty_brackets(folder: Path, msgs: Messages) -> None:
    """A message from the null reverse-path (an NDR) has X-Sender: <>."""
    d = claimed(msgs, 1, b"Subject: ndr\r\n\r\n", sender="", is_dsn=True)
    outcomes, error = DropDirectory(folder, None).deliver([d], msgs.content)
    assert error is None
    assert (folder / outcomes[0].file_name).read_bytes().startswith(
        b"X-Sender: <>\r\nX-Receiver: <FAX:+15551234>\r\nX-EndOfInjectedXHeaders: ")


def test_envid_is_xtext_encoded(msgs: Messages) -> None:
    """ENVID is written as xtext (RFC 3461): '+', '=' and controls become +XX."""
    d = claimed(msgs, 1, b"x", envid="a+b=c d")
    assert envelope_header(d).startswith(b"X-Sender: <a@contoso.test> ENVID=a+2Bb+3Dc+20d\r\n")


def test_non_ascii_addresses_are_utf8(folder: Path, msgs: Messages) -> None:
    """SMTPUTF8 addresses are written as UTF-8 and the length counts bytes, not characters."""
    d = claimed(msgs, 1, b"x", sender="jörg@bücher.test",
                recipients=[rcpt("ñandú@contoso.test")])
    head = envelope_header(d)
    block = "X-Sender: <jörg@bücher.test>\r\nX-Receiver: <ñandú@contoso.test>\r\n".encode()
    assert head == block + f"X-EndOfInjectedXHeaders: {len(block)}\r\n".encode()


def test_file_mode_is_0640_and_no_temporary_file_is_left(folder: Path, msgs: Messages) -> None:
    """A delivered file is 0640 (umask 022) and the hidden temporary name is gone."""
    ds = [claimed(msgs, i) for i in range(3)]
    outcomes, error = DropDirectory(folder, None).deliver(ds, msgs.content)
    assert error is None and len(outcomes) == 3
    for o in outcomes:
        st = os.lstat(folder / o.file_name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert hidden(folder) == []


def test_twenty_deliveries_make_twenty_complete_files(folder: Path, msgs: Messages) -> None:
    """20 deliveries in one batch → 20 complete files with distinct names."""
    ds = [claimed(msgs, i, os.urandom(1000 + i)) for i in range(20)]
    outcomes, error = DropDirectory(folder, None).deliver(ds, msgs.content)
    assert error is None
    assert len(outcomes) == 20 and len(set(listing(folder))) == 20
    for d, o in zip(ds, outcomes):
        assert o.delivery is d
        assert (folder / o.file_name).read_bytes() == expected_file(d, msgs.data[d.message_id])
        assert o.size == len(expected_file(d, msgs.data[d.message_id]))


# -- folder failures -------------------------------------------------------------------


def test_missing_folder_is_error_8008_and_writes_nothing(tmp_path: Path, msgs: Messages) -> None:
    """A missing folder is a DropDirectoryError naming the folder and event 8008."""
    missing = tmp_path / "drop" / "Gone"
    outcomes, error = DropDirectory(missing, None).deliver([claimed(msgs, 1)], msgs.content)
    assert outcomes == []
    assert isinstance(error, DropDirectoryError)
    assert str(missing) in error.last_error and "8008" in error.last_error
    assert error.last_error.startswith("451 4.4.1 ")
    assert not missing.exists() and listing(tmp_path) == []


def test_folder_removed_after_check_is_error_8008(folder: Path, msgs: Messages,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that vanishes between the check and the write is reported as missing."""
    drop = DropDirectory(folder, None)
    real_check = drop.check

    def check_then_vanish() -> None:
        real_check()
        folder.rmdir()

    monkeypatch.setattr(drop, "check", check_then_vanish)
    outcomes, error = drop.deliver([claimed(msgs, 1)], msgs.content)
    assert outcomes == [] and error is not None and "8008" in error.last_error
    assert not folder.exists()


def quota_setup(folder: Path, msgs: Messages, n: int) -> tuple[list[ClaimedDelivery], int]:
    ds = [claimed(msgs, i, b"B" * 500) for i in range(n)]
    sizes = {len(envelope_header(d)) + d.size for d in ds}
    assert len(sizes) == 1
    return ds, sizes.pop()


def test_quota_stops_the_batch_with_error_8005(folder: Path, msgs: Messages) -> None:
    """With room for 3 files a batch of 5 writes 3 and reports the quota (8005) for the rest."""
    ds, size = quota_setup(folder, msgs, 5)
    drop = DropDirectory(folder, 4 * size - 1)
    outcomes, error = drop.deliver(ds, msgs.content)
    assert [o.delivery for o in outcomes] == ds[:3]
    assert error is not None
    assert "quota" in error.last_error and "8005" in error.last_error
    assert error.last_error.startswith("452 4.3.1 ")
    assert len([n for n in listing(folder) if n.endswith(".eml")]) == 3
    assert hidden(folder) == []
    assert sum((folder / n).stat().st_size for n in listing(folder)) <= 4 * size - 1

    # Still full: nothing more is written.
    outcomes, error = drop.deliver(ds[3:], msgs.content)
    assert outcomes == [] and error is not None and "8005" in error.last_error

    # The gateway consumes the files: the cached usage is re-measured and the rest goes out.
    for n in listing(folder):
        (folder / n).unlink()
    outcomes, error = drop.deliver(ds[3:], msgs.content)
    assert error is None and [o.delivery for o in outcomes] == ds[3:]
    assert len(listing(folder)) == 2


def test_quota_counts_only_eml_files(folder: Path, msgs: Messages) -> None:
    """Only *.eml files count toward DropDirectoryQuota (acks, temp and other files do not)."""
    ds, size = quota_setup(folder, msgs, 2)
    for other in ("readme.txt", "x.eml.ack", ".partial.tmp", "y.eml.bad"):
        (folder / other).write_bytes(b"z" * 10 * size)
    drop = DropDirectory(folder, size)
    outcomes, error = drop.deliver(ds[:1], msgs.content)
    assert error is None and len(outcomes) == 1
    # The .eml just written fills the quota: the next one is refused.
    outcomes, error = drop.deliver(ds[1:], msgs.content)
    assert outcomes == [] and error is not None and "8005" in error.last_error


def test_io_error_from_content_is_8004_and_leaves_no_partial_file(
        folder: Path, msgs: Messages) -> None:
    """An I/O error mid-write is 8004: earlier files stay, no partial or temp file is left."""
    ds = [claimed(msgs, i, b"x" * 100) for i in range(3)]

    def content(d: ClaimedDelivery) -> Iterator[bytes]:
        yield b"x" * 40
        if d.message_id == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        yield b"x" * 60

    outcomes, error = DropDirectory(folder, None).deliver(ds, content)
    assert [o.delivery for o in outcomes] == ds[:1]
    assert error is not None and "8004" in error.last_error
    assert error.last_error.startswith("451 4.3.0 ")
    assert "Input/output error" in error.last_error and str(folder) in error.last_error
    assert listing(folder) == [outcomes[0].file_name]
    assert (folder / outcomes[0].file_name).read_bytes() == expected_file(ds[0], b"x" * 100)


def test_folder_replaced_by_a_file_is_8004(folder: Path, msgs: Messages,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that is no longer a folder when writing is an I/O error (works as root too)."""
    drop = DropDirectory(folder, None)
    real_check = drop.check

    def check_then_swap() -> None:
        real_check()
        folder.rename(folder.with_name("moved"))
        folder.write_bytes(b"not a folder")

    monkeypatch.setattr(drop, "check", check_then_swap)
    outcomes, error = drop.deliver([claimed(msgs, 1)], msgs.content)
    assert outcomes == [] and error is not None and "8004" in error.last_error
    assert folder.read_bytes() == b"not a folder"
    assert listing(folder.with_name("moved")) == []


def test_folder_sync_failure_reports_nothing_handed_off(
        folder: Path, msgs: Messages, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the folder cannot be fsynced after the renames, no delivery counts as handed off."""
    def fail(path: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(drop_mod, "fsync_dir", fail)
    outcomes, error = DropDirectory(folder, None).deliver([claimed(msgs, 1)], msgs.content)
    assert outcomes == [] and error is not None and "8004" in error.last_error


# -- recovery after a crash ------------------------------------------------------------


def test_recovering_delivery_with_existing_file_is_not_rewritten(
        folder: Path, msgs: Messages) -> None:
    """A recovering delivery whose file exists is reported handed off; the file is untouched."""
    d = claimed(msgs, 1, b"new bytes", recovering=True)
    final = folder / drop_file_name(d)
    final.write_bytes(b"written before the crash")
    os.utime(final, ns=(1_000_000_000, 1_000_000_000))
    before = os.lstat(final)
    outcomes, error = DropDirectory(folder, None).deliver([d], msgs.content)
    assert error is None
    assert [(o.file_name, o.size) for o in outcomes] == [(final.name, before.st_size)]
    after = os.lstat(final)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert final.read_bytes() == b"written before the crash"
    assert listing(folder) == [final.name]


def test_not_recovering_delivery_writes_its_file(folder: Path, msgs: Messages) -> None:
    """Without `recovering` the writer does not look for an earlier file: it writes one."""
    d = claimed(msgs, 1, b"fresh")
    final = folder / drop_file_name(d)
    final.write_bytes(b"stale")
    outcomes, error = DropDirectory(folder, None).deliver([d], msgs.content)
    assert error is None and len(outcomes) == 1
    assert final.read_bytes() == expected_file(d, b"fresh")


@pytest.mark.parametrize("recovering", [True, False])
def test_symlink_at_final_name_is_not_delivered_and_not_followed(
        tmp_path: Path, folder: Path, msgs: Messages, recovering: bool) -> None:
    """T42: a symlink planted at the final name is replaced by a file; its target is untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.utime(victim, ns=(1_000_000_000, 1_000_000_000))
    d = claimed(msgs, 1, b"the message", recovering=recovering)
    final = folder / drop_file_name(d)
    final.symlink_to(victim)
    outcomes, error = DropDirectory(folder, None).deliver([d], msgs.content)
    assert error is None and [o.file_name for o in outcomes] == [final.name]
    assert stat.S_ISREG(os.lstat(final).st_mode)
    assert final.read_bytes() == expected_file(d, b"the message")
    assert victim.read_bytes() == b"precious"
    assert os.stat(victim).st_mtime_ns == 1_000_000_000


def test_dangling_symlink_at_final_name_creates_nothing_outside(
        tmp_path: Path, folder: Path, msgs: Messages) -> None:
    """A dangling link at the final name of a recovering delivery never creates its target."""
    target = tmp_path / "outside" / "created.eml"
    target.parent.mkdir()
    d = claimed(msgs, 1, b"m", recovering=True)
    (folder / drop_file_name(d)).symlink_to(target)
    outcomes, error = DropDirectory(folder, None).deliver([d], msgs.content)
    assert error is None and len(outcomes) == 1
    assert not target.exists() and listing(target.parent) == []
    assert stat.S_ISREG(os.lstat(folder / drop_file_name(d)).st_mode)


def predictable_tokens(monkeypatch: pytest.MonkeyPatch, values: list[str]) -> None:
    it = iter(values)
    monkeypatch.setattr(files, "random_hex8", lambda: next(it))


def test_symlink_at_temporary_name_is_never_followed(
        tmp_path: Path, folder: Path, msgs: Messages, monkeypatch: pytest.MonkeyPatch) -> None:
    """A link planted at the temporary name is skipped (O_EXCL|O_NOFOLLOW), not written through."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    d = claimed(msgs, 1, b"m")
    planted = folder / f".{d.token}.aaaaaaaa.tmp"
    planted.symlink_to(victim)
    predictable_tokens(monkeypatch, ["aaaaaaaa", "bbbbbbbb"])
    outcomes, error = DropDirectory(folder, None).deliver([d], msgs.content)
    assert error is None and len(outcomes) == 1
    assert victim.read_bytes() == b"precious"
    assert os.path.islink(planted)
    assert (folder / outcomes[0].file_name).read_bytes() == expected_file(d, b"m")
    assert sorted(listing(folder)) == sorted([planted.name, outcomes[0].file_name])


def test_every_temporary_name_taken_is_8004_and_nothing_followed(
        tmp_path: Path, folder: Path, msgs: Messages, monkeypatch: pytest.MonkeyPatch) -> None:
    """When every temporary name it tries is planted, the writer gives up with 8004."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    d = claimed(msgs, 1, b"m")
    names = [f"{i:08x}" for i in range(5)]
    for n in names:
        (folder / f".{d.token}.{n}.tmp").symlink_to(victim)
    predictable_tokens(monkeypatch, names)
    outcomes, error = DropDirectory(folder, None).deliver([d], msgs.content)
    assert outcomes == [] and error is not None and "8004" in error.last_error
    assert victim.read_bytes() == b"precious"
    assert not (folder / drop_file_name(d)).exists()
    assert all(os.path.islink(folder / n) for n in listing(folder))


# -- T42: attacker-controlled fields -----------------------------------------------------


def hostile(msgs: Messages, mid: int) -> ClaimedDelivery:
    long_id = "<" + "a/../" * 60 + "@x>"
    assert len(long_id) >= 300
    return claimed(
        msgs, mid, f"Message-ID: <../../../../tmp/pwn>\r\nSubject: a/b\x00c\r\n\r\n{mid}\r\n"
        .encode(),
        internet_message_id="<../../../../tmp/pwn>" if mid % 2 else long_id,
        subject="../../etc/passwd/\x00/" + "s" * 300,
        envid="E" * 300, recipients=[rcpt("FAX:+1/../../" + "9" * 300, mid)])


def all_files(root: Path) -> list[Path]:
    return [Path(d) / f for d, dirs, fs in os.walk(root) for f in fs + [
        x for x in dirs if os.path.islink(Path(d) / x)]]


def test_t42_hostile_fields_never_reach_the_file_name(
        tmp_path: Path, folder: Path, msgs: Messages) -> None:
    """T42: 20 hostile messages → 20 regular files in the folder, names ours, ≤255 bytes."""
    ds = [hostile(msgs, i) for i in range(20)]
    outcomes, error = DropDirectory(folder, None).deliver(ds, msgs.content)
    assert error is None and len(outcomes) == 20
    created = all_files(tmp_path)
    assert len(created) == 20
    for p in created:
        assert p.parent == folder
        assert NAME_RE.match(p.name) and len(os.fsencode(p.name)) <= 255
        assert stat.S_ISREG(os.lstat(p).st_mode)
    for d, o in zip(ds, outcomes):
        assert (folder / o.file_name).read_bytes() == expected_file(d, msgs.data[d.message_id])


def test_t42_twenty_messages_through_a_full_drop_and_a_planted_link(
        tmp_path: Path, folder: Path, msgs: Messages) -> None:
    """T42: with the quota reached and a link planted, retries end with 20 complete files."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    everything = [hostile(msgs, i) for i in range(20)]
    pending = list(everything)
    size = max(len(envelope_header(d)) + d.size for d in pending)
    (folder / drop_file_name(pending[0])).symlink_to(victim)
    pending[0].recovering = True
    drop = DropDirectory(folder, 6 * size)
    consumed: dict[str, bytes] = {}
    rounds = 0
    while pending:
        rounds += 1
        assert rounds < 20
        outcomes, error = drop.deliver(pending, msgs.content)
        done = {o.delivery.id for o in outcomes}
        if error is not None:
            assert "8005" in error.last_error and outcomes, error.last_error
        pending = [d for d in pending if d.id not in done]
        # The gateway consumes what was handed off (only complete *.eml files are visible).
        for o in outcomes:
            p = folder / o.file_name
            assert stat.S_ISREG(os.lstat(p).st_mode)
            consumed[o.file_name] = p.read_bytes()
            p.unlink()
        assert hidden(folder) == []
    assert rounds > 1, "the quota was reached at least once"
    assert len(consumed) == 20
    expected = {drop_file_name(d): expected_file(d, msgs.data[d.message_id])
                for d in everything}
    assert consumed == expected
    assert victim.read_bytes() == b"precious"
    assert listing(folder) == []


def test_stale_temporary_files_of_a_crashed_write_are_swept(folder: Path,
                                                            msgs: Messages) -> None:
    """Hidden temporary files older than a minute (left by a crash) are removed on the
    first delivery; fresh ones (a write in progress) and other files are left alone (T43)."""
    stale = folder / f".{'a' * 32}.0123abcd.tmp"
    fresh = folder / f".{'b' * 32}.89abcdef.tmp"
    other = folder / ".gateway-state"
    for p in (stale, fresh, other):
        p.write_bytes(b"x")
    old = time.time() - 120
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    outcomes, error = DropDirectory(folder, None).deliver([claimed(msgs, 1)], msgs.content)
    assert error is None and len(outcomes) == 1
    assert not stale.exists()
    assert fresh.exists() and other.exists()
