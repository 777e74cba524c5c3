"""Mailbox delivery into real Maildir folders (deliver/maildir.py)."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.deliver.maildir import MaildirStore, crlf_to_lf, mailbox_folder_name
from mailgate.store import ClaimedDelivery, ClaimedRecipient

CREATED = 1_800_000_000.25


@pytest.fixture(autouse=True)
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    p = tmp_path / "mailboxes"
    p.mkdir()
    return p


@pytest.fixture
def store(root: Path) -> MaildirStore:
    return MaildirStore(root, hostname="mx1.contoso.test")


def delivery(*, recovering: bool = False, sender: str = "alice@fabrikam.test",
             token: str | None = None) -> ClaimedDelivery:
    return ClaimedDelivery(
        id=1, message_id=1, queue_id=1, token=token or uuid.uuid4().hex, created=CREATED,
        retry_count=0, recovering=recovering, from_address=sender,
        internet_message_id="<m@fabrikam.test>", subject="hi", size=0, date_received=CREATED,
        ret=None, envid=None, is_dsn=False,
        recipients=[ClaimedRecipient(7, "julia@contoso.test", None, None, None, None)])


BODY = (b"Received: from mx.fabrikam.test\r\nFrom: alice@fabrikam.test\r\n"
        b"To: julia@contoso.test\r\nSubject: hi\r\n\r\nline one\r\nline two\r\n"
        b"a lone \r carriage return stays\r\n\r\n-- \r\nAlice\r\n")


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def files_in(path: Path) -> list[str]:
    return sorted(os.listdir(path))


# -- folder names ----------------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "../../etc@x", "a/b@x", ".", "..", "...", "a\x00b@x", "/etc/passwd", "..\\..@x",
    "jörg@bücher.test", "用户@例子.广告", "İ@x", "\u2215etc@x", "%2e%2e", "./..", "Julia@Contoso.TEST",
])
def test_mailbox_folder_name_never_escapes(root: Path, address: str) -> None:
    """The folder name has no '/' or NUL, is not '.'/'..', and stays directly in the root."""
    name = mailbox_folder_name(address)
    assert name and "/" not in name and "\x00" not in name
    assert name not in {".", ".."}
    assert (root / name).resolve().parent == root.resolve()
    os.mkdir(root / name)
    assert files_in(root) == [name]


def test_mailbox_folder_name_keeps_plain_addresses_readable() -> None:
    """An ordinary address maps to its lower-case self (the README's documented folder)."""
    assert mailbox_folder_name("Julia@Contoso.TEST") == "julia@contoso.test"
    assert mailbox_folder_name("a.b+tag_x-y@sub.contoso.test") == "a.b+tag_x-y@sub.contoso.test"
    assert mailbox_folder_name("a/b@x") == "a%2Fb@x"


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_mailbox_folder_name_property(address: str) -> None:
    """For any text the folder name is one safe path component."""
    name = mailbox_folder_name(address)
    assert "/" not in name and "\x00" not in name and name not in {"", ".", ".."}
    assert os.path.basename(name) == name


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_mailbox_folder_name_is_injective(a: str, b: str) -> None:
    """Two addresses share a folder only when they are equal ignoring case."""
    if a.lower() != b.lower():
        assert mailbox_folder_name(a) != mailbox_folder_name(b)


@pytest.mark.parametrize("address", [
    "!" * 64 + "@" + "a" * 63 + ".test",                 # RFC 5321 atext, 133 octets
    "\u00e4" * 32 + "@" + "b" * 60 + ".test",             # SMTPUTF8, 130 octets
])
def test_valid_long_address_gets_a_usable_folder(store: MaildirStore, address: str) -> None:
    """Any address the parser accepts maps to a folder name of at most 255 bytes."""
    from mailgate.core.address import parse_recipient_address

    parse_recipient_address(address)  # a valid recipient address
    assert len(os.fsencode(mailbox_folder_name(address))) <= 255
    d = delivery()
    name, maildir = store.deliver(d, d.recipients[0], address, [BODY])
    assert files_in(maildir / "new") == [name]


# -- crlf_to_lf ------------------------------------------------------------------------


def test_crlf_split_across_chunks() -> None:
    """A CRLF split between two chunks still becomes one LF; a final lone CR is kept."""
    assert b"".join(crlf_to_lf([b"a\r", b"\nb\r", b"\r", b"\nc\r"])) == b"a\nb\r\nc\r"
    assert b"".join(crlf_to_lf([])) == b""
    assert b"".join(crlf_to_lf([b"\r", b"", b"\n"])) == b"\n"


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=12).map(
    lambda b: bytes(b"\r\nx"[c % 3] for c in b)), max_size=12))
def test_crlf_to_lf_equals_one_shot_replace(pieces: list[bytes]) -> None:
    """Chunked conversion equals converting the whole message at once."""
    assert b"".join(crlf_to_lf(iter(pieces))) == b"".join(pieces).replace(b"\r\n", b"\n")


# -- delivery --------------------------------------------------------------------------


def test_delivery_writes_new_file_with_lf_and_trace_headers(root: Path,
                                                           store: MaildirStore) -> None:
    """One file in new/: Return-Path and Delivered-To first, then the body with LF endings."""
    d = delivery()
    r = d.recipients[0]
    name, maildir = store.deliver(d, r, "Julia@Contoso.test", chunks(BODY, 5))
    store.sync([maildir])
    assert maildir == root / "julia@contoso.test" / "Maildir"
    assert name == f"{int(CREATED)}.M{d.token}R{r.id}.mx1.contoso.test"
    assert files_in(maildir / "new") == [name]
    assert files_in(maildir / "tmp") == [] and files_in(maildir / "cur") == []
    data = (maildir / "new" / name).read_bytes()
    assert data == (b"Return-Path: <alice@fabrikam.test>\nDelivered-To: Julia@Contoso.test\n"
                    + BODY.replace(b"\r\n", b"\n"))
    assert b"\r\n" not in data
    st_ = os.lstat(maildir / "new" / name)
    assert stat.S_ISREG(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o600


def test_null_sender_return_path(store: MaildirStore) -> None:
    """A message from the null reverse-path gets Return-Path: <>."""
    d = delivery(sender="")
    name, maildir = store.deliver(d, d.recipients[0], "julia@contoso.test", [b"x\r\n"])
    assert (maildir / "new" / name).read_bytes().startswith(b"Return-Path: <>\nDelivered-To: ")


def test_each_recipient_gets_its_own_file(store: MaildirStore) -> None:
    """Two recipients of one delivery in one mailbox are two files with distinct names."""
    d = delivery()
    r2 = ClaimedRecipient(8, "jules@contoso.test", None, None, None, None)
    n1, m1 = store.deliver(d, d.recipients[0], "julia@contoso.test", [BODY])
    n2, m2 = store.deliver(d, r2, "julia@contoso.test", [BODY])
    assert m1 == m2 and n1 != n2
    assert files_in(m1 / "new") == sorted([n1, n2])


def test_hostname_with_slash_and_colon_stays_one_name(root: Path) -> None:
    """A hostname with '/' or ':' cannot break the Maildir file name."""
    store = MaildirStore(root, hostname="a/b:c")
    d = delivery()
    name, maildir = store.deliver(d, d.recipients[0], "julia@contoso.test", [BODY])
    assert "/" not in name and ":" not in name
    assert files_in(maildir / "new") == [name]


def test_recovering_delivery_already_in_new_is_not_written_again(store: MaildirStore) -> None:
    """After a crash, a file that already reached new/ is recognised and not rewritten."""
    d = delivery()
    name, maildir = store.deliver(d, d.recipients[0], "julia@contoso.test", [BODY])
    path = maildir / "new" / name
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = os.lstat(path)
    again = delivery(recovering=True, token=d.token)
    assert store.deliver(again, again.recipients[0], "julia@contoso.test",
                         [b"other bytes"]) == (name, maildir)
    after = os.lstat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert files_in(maildir / "new") == [name] and files_in(maildir / "tmp") == []


def test_recovering_delivery_moved_to_cur_is_not_written_again(store: MaildirStore) -> None:
    """A file a reader already moved to cur/<name>:2,S also counts as delivered."""
    d = delivery()
    name, maildir = store.deliver(d, d.recipients[0], "julia@contoso.test", [BODY])
    os.rename(maildir / "new" / name, maildir / "cur" / f"{name}:2,S")
    again = delivery(recovering=True, token=d.token)
    assert store.deliver(again, again.recipients[0], "julia@contoso.test", [BODY])[0] == name
    assert files_in(maildir / "new") == []
    assert files_in(maildir / "cur") == [f"{name}:2,S"]
    assert files_in(maildir / "tmp") == []


def test_recovering_delivery_not_yet_written_is_written(store: MaildirStore) -> None:
    """A recovering delivery whose file never reached the mailbox is delivered now."""
    d = delivery(recovering=True)
    name, maildir = store.deliver(d, d.recipients[0], "julia@contoso.test", chunks(BODY, 3))
    assert (maildir / "new" / name).read_bytes().endswith(BODY.replace(b"\r\n", b"\n"))
    assert files_in(maildir / "tmp") == []


def test_content_error_leaves_no_file(store: MaildirStore) -> None:
    """A content source failing mid-way leaves nothing in tmp/ or new/ and raises."""
    d = delivery()

    def broken() -> Iterator[bytes]:
        yield b"Subject: x\r\n"
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        store.deliver(d, d.recipients[0], "julia@contoso.test", broken())
    maildir = store.maildir("julia@contoso.test")
    assert files_in(maildir / "tmp") == [] and files_in(maildir / "new") == []


def test_symlink_in_new_is_not_taken_as_delivered(tmp_path: Path, store: MaildirStore) -> None:
    """A recovering delivery is not satisfied by a symlink planted at its new/ name."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    d = delivery(recovering=True)
    maildir = store.maildir("julia@contoso.test")
    store.ensure(maildir)
    name = store.file_name(d, d.recipients[0])
    (maildir / "new" / name).symlink_to(victim)
    store.deliver(d, d.recipients[0], "julia@contoso.test", [BODY])
    assert victim.read_bytes() == b"precious"
    assert stat.S_ISREG(os.lstat(maildir / "new" / name).st_mode)
