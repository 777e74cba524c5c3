"""The queue engine end to end (issue #3): a Fax gateway that is down for hours, delay DSN
at DelayNotificationTimeout, NDR at MessageExpirationTimeout, poison messages, and the
queue and message commands, against the real node and the real CLI. Time passes through
an injected clock (FakeClock) where hours must pass."""

from __future__ import annotations

import email
import email.policy
import json
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import pytest

from mailgate.clock import FakeClock
from tests.conftest import MailgateEnv, NodeThread, drop_file, wait_for

ALICE = "alice@contoso.test"
HOUR = 3600.0


def fax(i: int, subject: str | None = None) -> bytes:
    # From alice, so that DSNs land in her Maildir; +1666... is not her own fax number.
    return (f"From: {ALICE}\nTo: IMCEAFAX-+2B1666000{i}@contoso.test\n"
            f"Subject: {subject or f'fax {i}'}\nMessage-ID: <fax{i}@contoso.test>\n\n"
            f"page {i}\n").encode()


def alice_mail(env: MailgateEnv) -> list[EmailMessage]:
    new = env.maildir(ALICE) / "new"
    files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime) if new.is_dir() else []
    return [cast(EmailMessage, email.message_from_bytes(p.read_bytes(),
                                                        policy=email.policy.default))
            for p in files]


def reports(env: MailgateEnv) -> list[EmailMessage]:
    return [m for m in alice_mail(env) if m.get_content_type() == "multipart/report"]


def recipient_blocks(report: EmailMessage) -> list[Any]:
    _, status, _ = report.get_payload()  # type: ignore[misc]
    return list(status.get_payload())[1:]


def queues(env: MailgateEnv) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], json.loads(env.cli("queue", "get", "--json").stdout))


def fax_queue(env: MailgateEnv) -> dict[str, Any] | None:
    found = [q for q in queues(env) if q["DeliveryType"] == "NonSmtpGatewayDelivery"]
    return found[0] if found else None


def messages(env: MailgateEnv, *args: str) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]],
                json.loads(env.cli("message", "get", *args, "--json").stdout))


def gateway_down(env: MailgateEnv) -> Path:
    """Point the Fax connector at a folder that does not exist yet."""
    folder = env.root / "fax-out"
    env.cli("foreign-connector", "set", "Fax", "--drop-directory", str(folder))
    return folder


@pytest.mark.parametrize("cause, event", [("missing", "8008"), ("quota", "8005")])
def test_gateway_down_delay_dsn_at_4_hours_then_ndr_at_2_days(demo_env: MailgateEnv,
                                                              cause: str, event: str) -> None:
    """Drop directory missing (or over its quota) → the Fax queue is in Retry with LastError
    (event 8008 / 8005); after 4 hours the sender gets one delay DSN (Action: delayed);
    after 2 days an NDR (Action: failed, 4.4.7) with the original message attached, and the
    message leaves the queue."""
    env = demo_env
    folder = gateway_down(env)
    if cause == "quota":
        folder.mkdir()
        (folder / "unread.eml").write_bytes(b"x" * 5000)  # the gateway is not reading
        env.cli("foreign-connector", "set", "Fax", "--drop-directory-quota", "5000")
    clock = FakeClock()
    node = NodeThread(env, clock=clock)
    try:
        drop_file(env.pickup, "f1.eml", fax(1))
        q = wait_for(lambda: (lambda q: q if q and q["Status"] == "Retry" else None)(
            fax_queue(env)), what="the Fax queue in Retry")
        assert event in q["LastError"] and q["MessageCount"] == 1  # type: ignore[index]
        [m] = messages(env, "--queue", q["Identity"])  # type: ignore[index]
        assert m["FromAddress"] == ALICE and m["Recipients"][0]["Address"] == "FAX:+16660001"
        assert event in m["LastError"]

        clock.advance(3 * HOUR)
        node.node.queues.wake()
        assert reports(env) == []  # nothing before DelayNotificationTimeout
        clock.advance(1 * HOUR + 60)
        [delay] = wait_for(lambda: reports(env) or None, what="the delay DSN")  # type: ignore[misc]
        assert delay["Subject"] == "Delivery delayed: fax 1"
        assert delay["From"].addresses[0].addr_spec == "postmaster@contoso.test"
        [block] = recipient_blocks(delay)
        assert block["Action"] == "delayed" and block["Status"] == "4.4.7"
        assert block["Final-Recipient"] == "x-fax; +16660001"
        assert "Will-Retry-Until" in block
        assert event in block["Diagnostic-Code"]
        assert messages(env)[0]["Identity"] == m["Identity"]  # still queued

        clock.advance(20 * HOUR)  # one delay DSN only
        node.node.queues.wake()
        clock.advance(24 * HOUR)

        def ndr() -> EmailMessage | None:
            clock.advance(60)  # an attempt in flight is left alone until it ends
            found = [r for r in reports(env) if r["Subject"].startswith("Undeliverable")]
            return found[0] if found else None
        report = cast(EmailMessage, wait_for(ndr, what="the expiry NDR"))
        assert len(reports(env)) == 2
        [block] = recipient_blocks(report)
        assert block["Action"] == "failed" and block["Status"] == "4.4.7"
        assert "QUEUE.Expired" in block["Diagnostic-Code"]
        _, _, returned = report.get_payload()  # type: ignore[misc]
        assert returned.get_content_type() == "message/rfc822"
        assert returned.get_payload()[0]["Message-ID"] == "<fax1@contoso.test>"
        wait_for(lambda: fax_queue(env)["MessageCount"] == 0,  # type: ignore[index]
                 what="an empty Fax queue")
        fail = json.loads(env.cli("tracking", "search", "--event-id", "FAIL", "--message-id",
                                  "<fax1@contoso.test>", "--json").stdout)
        assert [e["RecipientStatus"] for e in fail] == [
            ["550 4.4.7 QUEUE.Expired; message expired"]]
    finally:
        node.stop()


def test_gateway_fixed_before_the_delay_timeout_delivers_without_any_dsn(
        demo_env: MailgateEnv) -> None:
    """The folder appears after 3 hours: the message is delivered at the next retry and the
    sender gets no DSN at all, even when the clock later passes 4 hours and 2 days."""
    env = demo_env
    folder = gateway_down(env)
    clock = FakeClock()
    node = NodeThread(env, clock=clock)
    try:
        drop_file(env.pickup, "f2.eml", fax(2))
        wait_for(lambda: (fax_queue(env) or {}).get("Status") == "Retry", what="Retry")
        clock.advance(3 * HOUR)
        folder.mkdir()
        node.node.queues.wake()
        wait_for(lambda: list(folder.glob("*.eml")), what="the Drop file")
        clock.advance(3 * 24 * HOUR)
        node.node.queues.wake()
        wait_for(lambda: (fax_queue(env) or {}).get("MessageCount") == 0, what="empty queue")
        assert reports(env) == []
    finally:
        node.stop()


def test_notify_never_and_notify_delay_are_honoured(demo_env: MailgateEnv) -> None:
    """NOTIFY=NEVER: no delay DSN and no NDR; without DELAY in NOTIFY no delay DSN but
    still the NDR (recipients' NOTIFY travels in the envelope, here set in the store the
    way Replay and SMTP set it)."""
    import sqlite3

    env = demo_env
    gateway_down(env)
    clock = FakeClock()
    node = NodeThread(env, clock=clock)
    try:
        drop_file(env.pickup, "n1.eml", fax(3))
        drop_file(env.pickup, "n2.eml", fax(4))
        wait_for(lambda: (fax_queue(env) or {}).get("MessageCount") == 2, what="two queued")
        db = sqlite3.connect(env.data / "mailgate.db")
        db.execute("UPDATE recipients SET notify = 'NEVER' WHERE address = 'FAX:+16660003'")
        db.execute("UPDATE recipients SET notify = 'FAILURE' WHERE address = 'FAX:+16660004'")
        db.commit()
        db.close()
        clock.advance(5 * HOUR)
        node.node.queues.wake()
        wait_for(lambda: all(m["Status"] != "Active" for m in messages(env)), what="settle")
        clock.advance(2 * 24 * HOUR)

        def ndr() -> list[EmailMessage] | None:
            clock.advance(60)
            return reports(env) or None
        found = cast(list[EmailMessage], wait_for(ndr, what="the NDR for fax 4"))
        wait_for(lambda: (fax_queue(env) or {}).get("MessageCount") == 0, what="expired")
        assert [r["Subject"] for r in reports(env)] == ["Undeliverable: fax 4"]
        assert len(found) == 1
    finally:
        node.stop()


def test_a_message_that_kills_the_node_twice_goes_to_poison(demo_env: MailgateEnv) -> None:
    """A message whose delivery crashes `mailgate serve` every time: after the first crash
    the messages that were in flight are retried one at a time; the culprit crashes the
    node a second time (PoisonThreshold 2) and is put in the Poison queue, suspended;
    every other message is delivered. Resuming it from Poison resubmits it."""
    env = demo_env
    out = env.drop / "Fax"
    for i in range(1, 10):
        drop_file(env.pickup, f"p{i}.eml", fax(i, "poison pill" if i == 5 else None))
    crashes = 0
    for _ in range(4):
        proc = env.start(env={"MAILGATE_CRASH_ON_SUBJECT": "poison pill"}, may_die=True)
        wait_for(lambda: proc.poll() is not None or len(list(out.glob("*.eml"))) == 8,
                 timeout=20, what="a crash or all other messages delivered")
        if proc.poll() is None:
            break
        assert proc.returncode == 137
        crashes += 1
    assert crashes == 2, env.log.read_text()
    poison = [q for q in queues(env) if q["Identity"].endswith("\\Poison")]
    assert [q["MessageCount"] for q in poison] == [1]
    [m] = messages(env, "--queue", "Poison")
    assert m["Subject"] == "poison pill" and m["Status"] == "Suspended"
    assert len(list(out.glob("*.eml"))) == 8
    events = json.loads(env.cli("tracking", "search", "--event-id", "POISONMESSAGE",
                                "--json").stdout)
    assert [e["MessageSubject"] for e in events] == ["poison pill"]
    # Suspending a poison message is refused; resuming it resubmits it.
    refused = env.cli("message", "suspend", m["Identity"], check=False)
    assert refused.returncode == 1 and "Poison" in refused.stderr
    # ...and the Poison queue is never retried or resubmitted as a whole.
    for args in (("queue", "retry", "Poison"), ("queue", "retry", "Poison", "--resubmit",
                                                 "true")):
        refused = env.cli(*args, check=False)
        assert refused.returncode == 1 and "cannot be retried" in refused.stderr
    env.stop()
    env.start()  # a fixed node (no crash hook) delivers it once resumed
    env.cli("message", "resume", m["Identity"])
    wait_for(lambda: len(list(out.glob("*.eml"))) == 9, what="the resubmitted message")
    assert not [q for q in queues(env) if q["Identity"].endswith("\\Poison")]


@pytest.mark.parametrize("relay_dsn_required", [True, False])
def test_notify_success_gives_a_relayed_dsn_only_with_relay_dsn_required(
        demo_env: MailgateEnv, relay_dsn_required: bool) -> None:
    """NOTIFY=SUCCESS: a Foreign connector with RelayDsnRequired true answers the hand-off
    to its Drop directory with a DSN `Action: relayed`; without it, no DSN at all."""
    import sqlite3

    env = demo_env
    folder = gateway_down(env)
    env.cli("foreign-connector", "set", "Fax", "--relay-dsn-required",
            str(relay_dsn_required).lower())
    node = NodeThread(env)
    try:
        drop_file(env.pickup, "s1.eml", fax(7))
        wait_for(lambda: (fax_queue(env) or {}).get("MessageCount") == 1, what="queued fax")
        db = sqlite3.connect(env.data / "mailgate.db")
        db.execute("UPDATE recipients SET notify = 'SUCCESS,FAILURE'")
        db.commit()
        db.close()
        folder.mkdir()
        env.cli("queue", "retry", "FAX")
        if not relay_dsn_required:
            wait_for(lambda: list(folder.glob("*.eml")), what="the Drop file")
            wait_for(lambda: (fax_queue(env) or {}).get("MessageCount") == 0, what="done")
            assert reports(env) == []
            return
        [relayed] = cast(list[EmailMessage], wait_for(lambda: reports(env) or None,
                                                      what="the relayed DSN"))
        assert relayed["Subject"] == "Relayed: fax 7"
        [block] = recipient_blocks(relayed)
        assert block["Action"] == "relayed" and block["Status"] == "2.0.0"
        assert "Fax connector" in block["Diagnostic-Code"]
    finally:
        node.stop()
