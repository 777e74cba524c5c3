"""Confirmed hand-off (issue #5, PRODUCT §4.6): a Foreign connector with
DeliveryConfirmation waits for the gateway's `.ack`/`.nack` next to each drop file. The
message shows as AwaitingConfirmation meanwhile; ack → delivered (and a delivered DSN for
NOTIFY=SUCCESS), nack → NDR with the gateway's text, no answer → the configured outcome at
ConfirmationTimeout. Real node, real CLI, real files; time through an injected clock."""

from __future__ import annotations

import email
import email.policy
import json
import os
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import pytest

from mailgate.clock import FakeClock
from mailgate.queue.confirmation import parse_nack
from tests.conftest import MailgateEnv, NodeThread, drop_file, wait_for
from tests.delivered import tracking

ALICE = "alice@contoso.test"
HOUR = 3600.0


def replay(env: MailgateEnv, name: str, receivers: list[str], subject: str) -> None:
    """A Replay file from alice (so DSNs land in her Maildir) to fax numbers."""
    envelope = "X-Sender: <alice@contoso.test>\r\n" + "".join(
        "X-Receiver: <{}>{}\r\n".format(*r.partition(" ")[::2]) for r in receivers)
    data = (envelope + f"From: {ALICE}\r\nSubject: {subject}\r\n"
                       f"Message-ID: <{name}@contoso.test>\r\n\r\npage one\r\n").encode()
    drop_file(env.data / "replay", name, data)


def messages(env: MailgateEnv) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]],
                json.loads(env.cli("message", "get", "--json").stdout))


def reports(env: MailgateEnv) -> list[EmailMessage]:
    new = env.maildir(ALICE) / "new"
    files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime) if new.is_dir() else []
    found = [cast(EmailMessage, email.message_from_bytes(p.read_bytes(),
                                                         policy=email.policy.default))
             for p in files]
    return [m for m in found if m.get_content_type() == "multipart/report"]


def blocks(report: EmailMessage) -> list[Any]:
    _, status, _ = report.get_payload()  # type: ignore[misc]
    return list(status.get_payload())[1:]


def answer(folder: Path, drop: Path, ext: str, text: str = "") -> Path:
    """Write the gateway's answer for a drop file, as a gateway does (temporary name, then
    rename), dated two seconds back so the node reads it at once."""
    target = folder / (drop.name[:-4] + ext)
    tmp = folder / f".{target.name}.tmp"
    tmp.write_text(text)
    past = time.time() - 2
    os.utime(tmp, (past, past))
    tmp.rename(target)
    return target


def awaiting(env: MailgateEnv, subject: str) -> dict[str, Any] | None:
    found = [m for m in messages(env) if m["Subject"] == subject]
    return found[0] if found and found[0]["Status"] == "AwaitingConfirmation" else None


@pytest.fixture
def fax_env(demo_env: MailgateEnv) -> MailgateEnv:
    out = demo_env.cli("foreign-connector", "set", "Fax", "--delivery-confirmation", "true",
                       "--confirmation-timeout", "1h", "--json")
    row = json.loads(out.stdout)
    assert row["DeliveryConfirmation"] is True and row["ConfirmationTimeout"] == HOUR
    assert row["ConfirmationTimeoutAction"] == "Fail"
    return demo_env


def test_ack_delivers_and_answers_notify_success_with_a_delivered_dsn(
        fax_env: MailgateEnv) -> None:
    """Written to the Drop directory, the message waits as AwaitingConfirmation with a
    LastError naming its file; the gateway's .ack makes it delivered, the .ack file is
    removed, tracking shows DEFER then DELIVER (source GATEWAY), and the sender who asked
    for NOTIFY=SUCCESS gets a DSN with Action delivered (not relayed)."""
    env = fax_env
    folder = env.drop / "Fax"
    node = NodeThread(env)
    try:
        replay(env, "a1.eml", ["FAX:+16660001  NOTIFY=SUCCESS"], "ack me")
        m = cast(dict[str, Any], wait_for(lambda: awaiting(env, "ack me"),
                                          what="AwaitingConfirmation"))
        [drop] = list(folder.glob("*.eml"))
        assert drop.name in m["LastError"] and ".ack" in m["LastError"]
        [q] = [q for q in json.loads(env.cli("queue", "get", "--json").stdout)
               if q["DeliveryType"] == "NonSmtpGatewayDelivery"]
        assert q["MessageCount"] == 1
        time.sleep(1.5)
        assert awaiting(env, "ack me") is not None and reports(env) == []
        drop.unlink()                       # the gateway took the file ...
        ack = answer(folder, drop, ".ack", "sent 1 page\n")   # ... and confirms it
        wait_for(lambda: not messages(env), what="the message done")
        assert not ack.exists()
        [dsn] = cast(list[EmailMessage], wait_for(lambda: reports(env) or None,
                                                  what="the delivered DSN"))
        assert dsn["Subject"] == "Delivered: ack me"
        [block] = blocks(dsn)
        assert (block["Action"], block["Status"]) == ("delivered", "2.0.0")
        assert "sent 1 page" in block["Diagnostic-Code"]
        events = [(e.event_id, e.source) for e in tracking(env)
                  if e.message_id == "<a1.eml@contoso.test>"]
        assert ("DEFER", "GATEWAY") in events and ("DELIVER", "GATEWAY") in events
        assert events.index(("DEFER", "GATEWAY")) < events.index(("DELIVER", "GATEWAY"))
    finally:
        node.stop()


def test_nack_fails_the_named_recipient_with_the_gateways_text(fax_env: MailgateEnv) -> None:
    """A .nack naming one of two recipients: that one gets an NDR carrying the gateway's
    status and text, the other is delivered."""
    env = fax_env
    folder = env.drop / "Fax"
    node = NodeThread(env)
    try:
        replay(env, "n1.eml", ["FAX:+16660001", "FAX:+16660002"], "nack me")
        wait_for(lambda: awaiting(env, "nack me"), what="AwaitingConfirmation")
        [drop] = list(folder.glob("*.eml"))
        nack = answer(folder, drop, ".nack", "FAX:+16660002 5.1.1 no fax tone (busy 3 times)\n")
        [ndr] = cast(list[EmailMessage], wait_for(lambda: reports(env) or None,
                                                  what="the NDR"))
        assert ndr["Subject"].startswith("Undeliverable")
        [block] = blocks(ndr)
        assert block["Final-Recipient"].endswith("+16660002") or "16660002" in str(
            block["Original-Recipient"] or block["Final-Recipient"])
        assert block["Action"] == "failed" and block["Status"] == "5.1.1"
        assert "no fax tone (busy 3 times)" in block["Diagnostic-Code"]
        wait_for(lambda: not messages(env), what="the message done")
        assert not nack.exists()
        fails = [e for e in tracking(env) if e.event_id == "FAIL"]
        assert [e.recipients for e in fails] == [["FAX:+16660002"]]
        delivers = [e for e in tracking(env)
                    if e.event_id == "DELIVER" and e.source == "GATEWAY"]
        assert [e.recipients for e in delivers] == [["FAX:+16660001"]]
    finally:
        node.stop()


@pytest.mark.parametrize("action", ["Fail", "Delivered", "Retry"])
def test_no_answer_by_the_timeout_gives_the_configured_outcome(fax_env: MailgateEnv,
                                                               action: str) -> None:
    """No .ack or .nack within ConfirmationTimeout: Fail → an NDR (5.4.7) and the unread
    drop file is taken back; Delivered → done, no NDR; Retry → the file is taken back and
    written again, and the message waits for its confirmation once more."""
    env = fax_env
    env.cli("foreign-connector", "set", "Fax", "--confirmation-timeout-action", action.lower())
    folder = env.drop / "Fax"
    clock = FakeClock()
    node = NodeThread(env, clock=clock)
    try:
        replay(env, "t1.eml", ["FAX:+16660003"], "silence")
        wait_for(lambda: awaiting(env, "silence"), what="AwaitingConfirmation")
        [drop] = list(folder.glob("*.eml"))
        clock.advance(HOUR - 60)
        time.sleep(1.5)
        assert awaiting(env, "silence") is not None and drop.exists()
        clock.advance(120)
        if action == "Fail":
            [ndr] = cast(list[EmailMessage], wait_for(lambda: reports(env) or None,
                                                      what="the NDR"))
            [block] = blocks(ndr)
            assert block["Status"] == "5.4.7"
            assert "no confirmation from the gateway within 01:00:00" in block["Diagnostic-Code"]
            wait_for(lambda: not messages(env), what="the message done")
            assert not drop.exists()
        elif action == "Delivered":
            wait_for(lambda: not messages(env), what="the message done")
            assert reports(env) == [] and drop.exists()
            [e] = [e for e in tracking(env) if e.event_id == "DELIVER"]
            assert "assumed delivered" in e.recipient_status[0]
        else:
            def dropped_again() -> bool:
                m = awaiting(env, "silence")
                return m is not None and m["RetryCount"] == 1
            wait_for(dropped_again, what="the message dropped again")
            assert drop.exists()  # the same name: the file is the message's
            assert reports(env) == []
            defers = [e for e in tracking(env) if e.event_id == "DEFER"]
            assert any("4.4.7" in s for e in defers for s in e.recipient_status)
    finally:
        node.stop()


def test_answers_for_unknown_files_are_left_alone_and_removal_stops_the_wait(
        fax_env: MailgateEnv) -> None:
    """An .ack that matches no waiting message stays where it is; removing an awaiting
    message (message remove) ends the wait; its late .ack then matches nothing and is left alone too."""
    env = fax_env
    folder = env.drop / "Fax"
    node = NodeThread(env)
    try:
        stray = answer(folder, folder / "20200101T000000Z-0123.eml", ".ack")
        replay(env, "r1.eml", ["FAX:+16660004"], "removed")
        m = cast(dict[str, Any], wait_for(lambda: awaiting(env, "removed"),
                                          what="AwaitingConfirmation"))
        [drop] = list(folder.glob("*.eml"))
        env.cli("message", "remove", m["Identity"], "--with-ndr", "false")
        assert messages(env) == []
        time.sleep(1.5)
        late = answer(folder, drop, ".ack")
        time.sleep(1.5)
        assert stray.exists()
        assert late.exists()   # nobody waits for it: left alone like any unknown answer
        assert reports(env) == []
    finally:
        node.stop()


def test_confirmation_settings_are_checked(demo_env: MailgateEnv) -> None:
    """A bad timeout or action is a one-line error and changes nothing."""
    env = demo_env
    before = env.cli("foreign-connector", "get", "Fax", "--json").stdout
    for args, text in ((["--confirmation-timeout", "10s"], "between 1 minute and 30 days"),
                       (["--confirmation-timeout", "soon"], "confirmation-timeout"),
                       (["--confirmation-timeout-action", "Bounce"], "Bounce")):
        r = env.cli("foreign-connector", "set", "Fax", *args, check=False)
        assert r.returncode != 0 and text in r.stderr, r.stderr
    assert env.cli("foreign-connector", "get", "Fax", "--json").stdout == before


@pytest.mark.parametrize("text, expected", [
    (b"FAX:+1 5.1.1 busy\n", {"FAX:+1": ("failed", "550 5.1.1 gateway: busy"),
                              "FAX:+2": ("delivered", None)}),
    (b"<fax:+2> 450 4.2.0 line in use\r\n", {"FAX:+1": ("delivered", None),
                                            "FAX:+2": ("deferred", "451 4.2.0 gateway: "
                                                                   "line in use")}),
    (b"5.3.0 modem broken\n", {"FAX:+1": ("failed", "550 5.3.0 gateway: modem broken"),
                               "FAX:+2": ("failed", "550 5.3.0 gateway: modem broken")}),
    (b"", {"FAX:+1": ("failed", "550 5.0.0 gateway: empty .nack file: the gateway "
                                "refused the message"),
           "FAX:+2": ("failed", None)}),
    (b"something odd\x00\xff happened\n", {"FAX:+1": ("failed", "550 5.0.0 gateway: "
                                                               "something odd__ happened"),
                                           "FAX:+2": ("failed", None)}),
    (b"FAX:+1 no code given\nnobody@else 5.1.1 x\n",
     {"FAX:+1": ("failed", "550 5.0.0 gateway: no code given"),
      "FAX:+2": ("delivered", None)}),
])
def test_nack_lines(text: bytes, expected: dict[str, tuple[str, str | None]]) -> None:
    """How a .nack file's lines become per-recipient outcomes."""
    got = parse_nack(text, ["FAX:+1", "FAX:+2"])
    for address, (outcome, status) in expected.items():
        assert got[address].outcome == outcome, (address, got[address])
        if status is not None:
            assert got[address].status == status
