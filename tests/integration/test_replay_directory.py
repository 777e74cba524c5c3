"""The Replay directory service (receive/replay.py) on real folders with the real node.

Documented behaviour: docs/replay.md, PRODUCT §4.5 and §5, reference exchange-transport.md
§2.1, §2.5-2.8, §2.11-2.12. The envelope comes from the X-headers; the claiming, crash
recovery and badmail machinery is the one Pickup uses (receive/directory.py, tested in depth
by test_pickup_directory.py), so these tests cover what is Replay's own and one pass of each
shared guarantee through the Replay folder. Most tests run the in-process node (NodeThread);
the crash tests run the real `mailgate serve` with MAILGATE_CRASH_AT crash points.
"""

from __future__ import annotations

import json
import email
import email.policy
import os
import re
import signal
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
FAX = "FAX:+15551234"


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _ignore_sigio() -> Iterator[None]:
    """The in-process node takes Linux read leases; a lease break sends SIGIO to the
    holder, whose default action would end the test process (see test_pickup_directory)."""
    old = signal.signal(signal.SIGIO, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGIO, old)


def replay_dir(env: MailgateEnv) -> Path:
    return env.data / "replay"


def replay_file(test_id: str, *, envelope: bytes, extra: bytes = b"",
                to: str = "dave@elsewhere.test", body: bytes | None = None) -> bytes:
    """A Replay file (CRLF): `envelope` (the X-header lines), then a header whose From/To
    name other people than the envelope, with a unique X-Test-Id."""
    head = (f"From: mallory@header-only.test\r\nTo: {to}\r\nSubject: {test_id}\r\n"
            f"X-Test-Id: {test_id}\r\n").encode() + extra
    return envelope + head + b"\r\n" + (body if body is not None
                                        else f"Body of {test_id}.\r\n".encode())


def delivered_files(env: MailgateEnv, test_id: str, count: int = 1,
                    timeout: float = 10.0) -> list[Path]:
    def find() -> list[Path] | None:
        found = [p for p in [*mailbox_files(env), *drop_files(env)] if test_id in x_test_ids(p)]
        return found if len(found) >= count else None
    found = wait_for(find, timeout=timeout, what=f"{count} deliveries of {test_id}")
    assert isinstance(found, list)
    return found


def drop_envelope(data: bytes) -> tuple[list[bytes], bytes]:
    """(the X-Sender/X-Receiver lines, the message after X-EndOfInjectedXHeaders) of a Drop
    file."""
    m = re.match(rb"((?:X-(?:Sender|Receiver): [^\r\n]*\r\n)+)X-EndOfInjectedXHeaders: \d+\r\n",
                 data)
    assert m is not None, data[:500]
    return m.group(1).split(b"\r\n")[:-1], data[m.end():]


def without_first_received(message: bytes) -> bytes:
    m = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", message)
    assert m is not None, message[:300]
    return message[m.end():]


def trust_replay_directory(env: MailgateEnv) -> None:
    """Make this node's Replay directory trusted (ReplayDirectoryTrusted)."""
    env.cli("transport-service", "set", "--replay-directory-trusted", "true")
    time.sleep(0.6)  # the node re-reads the organization every 0.25 s


# -- the envelope comes from the X-headers -------------------------------------------------


def test_envelope_from_x_headers_with_dsn_parameters_kept(demo_env: MailgateEnv,
                                                          node: NodeThread) -> None:
    """X-Sender/X-Receiver are the envelope: the message goes to the X-Receiver recipients
    (a FAX:+15551234 receiver to the Fax Drop directory, alice to her Maildir), not to the
    To: header's address, from the X-Sender address, not From:; RET, ENVID, NOTIFY and ORCPT
    reach the Drop file's X-Sender/X-Receiver lines; the X-headers are not in the message,
    our Received: line is first."""
    env = demo_env
    envelope = (b"X-Receiver: <FAX:+15551234> NOTIFY=SUCCESS,FAILURE "
                b"ORCPT=rfc822;fax-orig+2Bx@fabrikam.test\r\n"
                b"X-Sender: <carol@fabrikam.test> RET=HDRS ENVID=env+2B42 BODY=8BITMIME\r\n"
                b"X-Receiver: <alice@contoso.test> NOTIFY=NEVER\r\n"
                b"X-CreatedBy: MSExchange15\r\n")
    data = replay_file("env", envelope=envelope,
                       extra=b"Message-ID: <env-1@fabrikam.test>\r\n"
                             b"Date: Tue, 2 Jan 2024 10:00:00 +0000\r\n")
    drop_file(replay_dir(env), "env.eml", data)
    files = delivered_files(env, "env", count=2)
    wait_gone(replay_dir(env) / "env.eml")

    [fax] = [p for p in files if p.parent == env.drop / "Fax"]
    lines, message = drop_envelope(fax.read_bytes())
    assert lines == [b"X-Sender: <carol@fabrikam.test> RET=HDRS ENVID=env+2B42",
                     b"X-Receiver: <FAX:+15551234> NOTIFY=SUCCESS,FAILURE "
                     b"ORCPT=rfc822;fax-orig+2Bx@fabrikam.test"]
    assert re.match(rb"Received: from localhost by \S+ with mailgate Replay; [^\r\n]+\r\n",
                    message), message[:200]
    original = data[len(envelope):]
    assert without_first_received(message) == original  # nothing else changed

    [mbx] = [p for p in files if p not in (fax,)]
    raw = mbx.read_bytes()
    assert raw.startswith(b"Return-Path: <carol@fabrikam.test>\n"), raw[:200]
    head, body = split_message(raw)
    assert b"X-Sender" not in head and b"X-Receiver" not in head and b"X-CreatedBy" not in head
    assert body == b"Body of env.\n"

    time.sleep(0.3)
    assert delivered(env) == Counter({"env": 2})
    assert tracking(env, recipient="dave@elsewhere.test") == []
    assert tracking(env, sender="mallory@header-only.test") == []
    [receive] = tracking(env, event_id="RECEIVE", source="REPLAY")
    assert receive.source_context == "env.eml"
    assert receive.sender == "carol@fabrikam.test"
    assert receive.recipients == [FAX, ALICE]
    assert receive.message_id == "<env-1@fabrikam.test>"
    assert receive.subject == "env"
    submit = tracking(env, event_id="SUBMIT", message_id="<env-1@fabrikam.test>")
    assert len(submit) == 1 and sorted(submit[0].recipients) == sorted([FAX, ALICE])
    assert listing(replay_dir(env)) == []


def test_drop_file_moved_into_replay_is_delivered_again_unchanged(demo_env: MailgateEnv,
                                                                   node: NodeThread) -> None:
    """A Drop file written by mailgate, moved as is into the Replay directory, is delivered
    again with the same envelope (X-Sender, X-Receiver with ORCPT) and the same message
    bytes after our new Received: line; its RECEIVE event has source REPLAY."""
    env = demo_env
    pickup = (b"From: alice@contoso.test\nTo: IMCEAFAX-+2B15551234@contoso.test\n"
              b"Bcc: IMCEAFAX-+2B15557777@contoso.test\nSubject: round trip\n"
              b"X-Test-Id: trip\n\nPage 1\n")
    drop_file(env.pickup, "trip.eml", pickup)
    [first] = delivered_files(env, "trip")
    first_bytes = first.read_bytes()
    first_lines, first_message = drop_envelope(first_bytes)
    assert first_lines == [
        b"X-Sender: <alice@contoso.test>",
        b"X-Receiver: <FAX:+15551234> ORCPT=rfc822;IMCEAFAX-+2B2B15551234@contoso.test",
        b"X-Receiver: <FAX:+15557777> ORCPT=rfc822;IMCEAFAX-+2B2B15557777@contoso.test"]

    # The supported way to move it: a rename (same file system), never a partial copy.
    os.rename(first, replay_dir(env) / first.name)
    [second] = wait_for(lambda: drop_files(env) or None,  # type: ignore[misc]
                        what="the replayed Drop file")
    wait_gone(replay_dir(env) / first.name)
    assert second.name != first.name
    second_lines, second_message = drop_envelope(second.read_bytes())
    assert second_lines == first_lines
    assert re.match(rb"Received: from localhost by \S+ with mailgate Replay; ", second_message)
    assert without_first_received(second_message) == first_message

    time.sleep(0.3)
    assert len(drop_files(env)) == 1
    [receive] = tracking(env, event_id="RECEIVE", source="REPLAY")
    assert receive.source_context == first.name
    assert receive.recipients == [FAX, "FAX:+15557777"]
    assert listing(replay_dir(env)) == []


# -- badmail and NDR -----------------------------------------------------------------------


BAD = {
    # name: (file bytes, text the reason must contain)
    "nosender": (replay_file("nosender", envelope=b"X-Receiver: <alice@contoso.test>\r\n"),
                 "no X-Sender"),
    "noreceiver": (replay_file("noreceiver", envelope=b"X-Sender: <bob@fabrikam.test>\r\n"),
                   "no X-Receiver"),
    "late": (b"From: bob@fabrikam.test\r\nX-Sender: <bob@fabrikam.test>\r\n"
             b"X-Receiver: <alice@contoso.test>\r\nSubject: late\r\nX-Test-Id: late\r\n\r\n"
             b"body\r\n", "must come before all other header fields"),
    "pickupstyle": (b"From: bob@fabrikam.test\nTo: alice@contoso.test\nSubject: p\n"
                    b"X-Test-Id: pickupstyle\n\nA Pickup file, not a Replay file.\n",
                    "no X-Sender"),
    "nullsender": (replay_file("nullsender", envelope=b"X-Sender: <>\r\n"
                                                      b"X-Receiver: <not-an-address>\r\n"),
                   "no NDR is possible to the null sender"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_format_errors_are_badmail_with_reason(demo_env: MailgateEnv, node: NodeThread,
                                               case: str) -> None:
    """Missing X-Sender, missing X-Receiver, X-headers after the normal header fields, a plain
    Pickup file, and an invalid receiver from the null sender: `<name>.bad` keeps the file's
    bytes, `<name>.bad.reason` says why in one line, a BADMAIL event (source REPLAY) records
    it, nothing is delivered and the node goes on."""
    env = demo_env
    data, expect = BAD[case]
    drop_file(replay_dir(env), f"{case}.eml", data)
    reason = wait_bad(replay_dir(env), case)
    assert expect in reason, reason
    assert (replay_dir(env) / f"{case}.bad").read_bytes() == data
    assert listing(replay_dir(env)) == [f"{case}.bad", f"{case}.bad.reason"]

    def badmail() -> list[TrackingEvent]:
        return tracking(env, event_id="BADMAIL", source="REPLAY")
    [bad] = wait_for(badmail, what="the BADMAIL event")  # type: ignore[misc]
    assert bad.source_context == f"{case}.eml"
    assert bad.message_info == reason
    assert delivered(env)[case] == 0

    envelope = b"X-Sender: <bob@fabrikam.test>\r\nX-Receiver: <alice@contoso.test>\r\n"
    drop_file(replay_dir(env), "after.eml", replay_file("after", envelope=envelope))
    delivered_files(env, "after")


def test_invalid_receiver_with_valid_sender_gets_an_ndr(demo_env: MailgateEnv,
                                                        node: NodeThread) -> None:
    """An invalid X-Receiver address with a valid X-Sender: an NDR (5.1.3) goes to the
    X-Sender address (not From:), names the invalid address and the original Subject, and
    attaches the original message without the X-header envelope; the whole file is refused
    (the valid receiver gets nothing) and deleted, not .bad; FAIL (source REPLAY) is
    tracked."""
    env = demo_env
    envelope = (b"X-Sender: <alice@contoso.test>\r\nX-Receiver: <bad..dots@contoso.test>\r\n"
                b"X-Receiver: <FAX:+15551234>\r\nX-EndOfInjectedXHeaders: 98\r\n")
    drop_file(replay_dir(env), "ndr.eml",
              replay_file("ndr", envelope=envelope,
                          extra=b"Message-ID: <ndr-1@contoso.test>\r\n"))
    wait_gone(replay_dir(env) / "ndr.eml")
    [path] = wait_for(lambda: mailbox_files(env) or None, what="the NDR")  # type: ignore[misc]
    raw = path.read_bytes()
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert raw.startswith(b"Return-Path: <>\n")
    assert msg.get_content_type() == "multipart/report"
    assert msg["Subject"] == "Undeliverable: ndr"
    assert re.search(rb"(?m)^Status: 5\.1\.3\r?$", raw), raw[:3000]
    assert re.search(rb"(?mi)^Final-Recipient: *rfc822; *bad\.\.dots@contoso\.test\r?$", raw), \
        raw[:3000]
    # The original message is attached, without the envelope (it is not part of it).
    assert b"X-Test-Id: ndr" in raw and b"Body of ndr." in raw
    assert b"X-Receiver" not in raw and b"X-EndOfInjectedXHeaders" not in raw
    time.sleep(0.3)
    assert listing(replay_dir(env)) == []
    assert drop_files(env) == []  # the whole file is refused: the FAX receiver got nothing
    [fail] = tracking(env, event_id="FAIL", source="REPLAY")
    assert fail.source_context == "ndr.eml"
    assert fail.recipients == ["bad..dots@contoso.test"]
    assert fail.sender == ALICE
    assert fail.message_id == "<ndr-1@contoso.test>"


# -- crash recovery (real `mailgate serve`) ------------------------------------------------


@pytest.mark.parametrize("point", ["replay-after-claim", "replay-after-commit"])
def test_crash_after_claim_or_commit_delivers_once(demo_env: MailgateEnv, point: str) -> None:
    """`mailgate serve` dies (as kill -9) right after claiming a Replay file, or after
    committing its message but before deleting the file: after a restart it is delivered
    exactly once, with one RECEIVE event."""
    env = demo_env
    folder = replay_dir(env)
    proc = env.start(env={"MAILGATE_CRASH_AT": point})
    envelope = b"X-Sender: <bob@fabrikam.test>\r\nX-Receiver: <FAX:+15551234> NOTIFY=NEVER\r\n"
    drop_file(folder, "dup.eml", replay_file("dup", envelope=envelope))
    proc.wait(timeout=10)
    assert proc.returncode == 137, env.log.read_text()
    [claimed] = listing(folder)  # the claimed file survived the crash
    assert re.fullmatch(rf"dup\.eml\.{NODE}-[0-9a-f]{{16}}\.tmp", claimed), claimed
    env.start()
    [fax] = delivered_files(env, "dup")
    wait_gone(folder / claimed)
    time.sleep(1.0)
    assert delivered(env) == Counter({"dup": 1})
    assert drop_envelope(fax.read_bytes())[0] == [
        b"X-Sender: <bob@fabrikam.test>", b"X-Receiver: <FAX:+15551234> NOTIFY=NEVER"]
    assert listing(folder) == []
    receive = [e for e in tracking(env, event_id="RECEIVE", source="REPLAY")
               if e.source_context == "dup.eml"]
    assert len(receive) == 1


# -- trust ---------------------------------------------------------------------------------


ORG_HEADERS = (b"X-MS-Exchange-Organization-SCL: -1\r\n"
               b"X-MS-Exchange-Organization-AuthAs: Internal\r\n"
               b"X-MS-Exchange-Forest-RulesExecuted: mbx01\r\n")


def _org_headers_delivered(env: MailgateEnv, test_id: str) -> list[bytes]:
    envelope = (b"X-Sender: <bob@fabrikam.test>\r\nX-Receiver: <alice@contoso.test>\r\n"
                b"X-CreatedBy: MSExchange15\r\n")
    drop_file(replay_dir(env), f"{test_id}.eml",
              replay_file(test_id, envelope=envelope, extra=ORG_HEADERS))
    [path] = delivered_files(env, test_id)
    head, _ = split_message(path.read_bytes())
    assert re.search(rb"(?m)^X-Test-Id: ", head)
    return re.findall(rb"(?mi)^X-MS-Exchange-(?:Organization|Forest)-[^:]*: [^\n]*", head)


def test_untrusted_directory_removes_organization_headers_despite_x_createdby(
        demo_env: MailgateEnv, node: NodeThread) -> None:
    """By default the Replay directory is untrusted: X-MS-Exchange-Organization-* and
    -Forest-* headers are removed, even with `X-CreatedBy: MSExchange15` (trust never comes
    from that string)."""
    assert _org_headers_delivered(demo_env, "untrusted") == []


def test_trusted_directory_keeps_organization_headers(
        demo_env: MailgateEnv) -> None:
    """With the directory's trust setting on, X-MS-Exchange-Organization-* and -Forest-*
    headers are kept byte for byte."""
    trust_replay_directory(demo_env)
    n = NodeThread(demo_env)
    try:
        assert _org_headers_delivered(demo_env, "trusted") == [
            b"X-MS-Exchange-Organization-SCL: -1",
            b"X-MS-Exchange-Organization-AuthAs: Internal",
            b"X-MS-Exchange-Forest-RulesExecuted: mbx01"]
    finally:
        n.stop()


# -- the path setting ----------------------------------------------------------------------


def test_replay_path_change_and_null_while_running(demo_env: MailgateEnv, node: NodeThread,
                                                   tmp_path: Path) -> None:
    """A new ReplayDirectoryPath is used at once (and created), the old folder is left
    alone; `$null` disables Replay while Pickup goes on."""
    env = demo_env
    envelope = b"X-Sender: <bob@fabrikam.test>\r\nX-Receiver: <alice@contoso.test>\r\n"
    new = tmp_path / "replay2"
    assert not new.exists()
    env.cli("transport-service", "set", "--replay-directory-path", str(new))
    wait_for(new.is_dir, timeout=5, what="the new folder to be created")
    drop_file(new, "new.eml", replay_file("in-new", envelope=envelope))
    delivered_files(env, "in-new")
    wait_gone(new / "new.eml")

    drop_file(replay_dir(env), "old.eml", replay_file("in-old", envelope=envelope))
    time.sleep(2.0)
    assert listing(replay_dir(env)) == ["old.eml"]
    assert delivered(env)["in-old"] == 0

    env.cli("transport-service", "set", "--replay-directory-path", "$null")
    shown = env.cli("transport-service", "get", "--json").stdout
    assert '"ReplayDirectoryPath": null' in shown, shown
    time.sleep(1.0)
    drop_file(new, "off.eml", replay_file("while-off", envelope=envelope))
    drop_file(env.pickup, "pickup.eml",
              b"From: bob@fabrikam.test\nTo: alice@contoso.test\nSubject: p\n"
              b"X-Test-Id: pickup-on\n\nPickup still works.\n")
    delivered_files(env, "pickup-on")
    time.sleep(2.0)
    assert listing(new) == ["off.eml"]
    assert listing(replay_dir(env)) == ["old.eml"]
    assert delivered(env) == Counter({"in-new": 1, "pickup-on": 1})
    assert node._thread.is_alive()


# -- export -> replay (docs/replay.md) -----------------------------------------------------


def _queued(env: MailgateEnv) -> list[dict[str, object]]:
    return json.loads(env.cli("message", "get", "--json").stdout)  # type: ignore[no-any-return]


def test_export_then_replay_sends_the_queued_message_once(demo_env: MailgateEnv,
                                                          tmp_path: Path) -> None:
    """The documented workflow: a fax stuck in Retry is suspended, exported with
    `mailgate message export`, moved into the Replay directory and removed from its queue
    without an NDR; once the gateway is back it is delivered exactly once, with the
    exported envelope and the queued bytes after Replay's Received: line."""
    env = demo_env
    gateway = tmp_path / "fax-out"  # missing: the Fax queue goes to Retry
    env.cli("foreign-connector", "set", "Fax", "--drop-directory", str(gateway))
    env.cli("transport-service", "set", "--transient-failure-retry-interval", "1h")
    with_node = NodeThread(env)
    try:
        drop_file(env.pickup, "fax.eml",
                  b"From: alice@contoso.test\nTo: IMCEAFAX-+2B16660001@contoso.test\n"
                  b"Subject: exported\nMessage-ID: <exp-1@contoso.test>\nX-Test-Id: exp\n\n"
                  b"page 1\n")
        [queued] = wait_for(lambda: _queued(env) or None,  # type: ignore[misc]
                            what="the fax in its queue")
        ident = str(queued["Identity"])
        env.cli("message", "suspend", ident)
        staging = tmp_path / "export"
        staging.mkdir()
        exported = Path(env.cli("message", "export", ident, "--path", str(staging))
                        .stdout.strip())
        exported_lines, exported_message = drop_envelope(exported.read_bytes())
        assert exported_lines == [
            b"X-Sender: <alice@contoso.test>",
            b"X-Receiver: <FAX:+16660001> ORCPT=rfc822;IMCEAFAX-+2B2B16660001@contoso.test"]
        os.rename(exported, replay_dir(env) / exported.name)
        wait_gone(replay_dir(env) / exported.name)
        env.cli("message", "remove", ident, "--with-ndr", "false")
        [replayed] = wait_for(  # type: ignore[misc]
            lambda: (ids := [m["Identity"] for m in _queued(env)]) != [ident] and len(ids) == 1
            and ids, what="only the replayed message queued")
        assert replayed != ident

        gateway.mkdir()
        queue = ident.rsplit("\\", 1)[0]
        env.cli("queue", "retry", queue)
        [fax] = wait_for(lambda: sorted(gateway.glob("*.eml")) or None,  # type: ignore[misc]
                         what="the replayed fax")
        lines, message = drop_envelope(fax.read_bytes())
        assert lines == exported_lines
        assert re.match(rb"Received: from localhost by \S+ with mailgate Replay; ", message)
        assert without_first_received(message) == exported_message
        time.sleep(1.0)
        assert sorted(gateway.glob("*.eml")) == [fax]
        assert _queued(env) == []
        assert not (env.maildir(ALICE) / "new").exists() or \
            not list((env.maildir(ALICE) / "new").iterdir())  # no NDR
    finally:
        with_node.stop()
