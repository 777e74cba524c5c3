"""Message tracking of the whole path, and NDRs for recipients that fail routing, through
the real node (issue #2 §4 and §7)."""

from __future__ import annotations

import asyncio
import email
import email.policy
from pathlib import Path

from mailgate.store import TrackingEvent
from mailgate.store.sqlite import SqliteStore
from tests.conftest import NODE, MailgateEnv, NodeThread, drop_file, wait_for


def events(env: MailgateEnv) -> list[TrackingEvent]:
    store = SqliteStore(env.data / "mailgate.db", node=NODE)
    try:
        return asyncio.run(store.search_tracking(result_size=10000))
    finally:
        store.close_sync()


def maildir_files(env: MailgateEnv, address: str) -> list[Path]:
    new = env.maildir(address) / "new"
    return sorted(new.iterdir()) if new.exists() else []


def test_every_step_is_tracked(demo_env: MailgateEnv, node: NodeThread) -> None:
    """RECEIVE (PICKUP, file name), SUBMIT (ROUTING), DELIVER (STOREDRIVER: Maildir file;
    GATEWAY: connector and Drop file), FAIL and DSN for an unknown recipient."""
    env = demo_env
    drop_file(env.pickup, "three.eml",
              b"From: alice@contoso.test\nTo: alice@contoso.test, "
              b"IMCEAFAX-+2B15551234@contoso.test\nCc: nobody@contoso.test\n"
              b"Subject: three ways\nMessage-ID: <three@contoso.test>\n\nHi.\n")
    fax_dir = env.drop / "Fax"
    [fax] = wait_for(lambda: sorted(fax_dir.glob("*.eml")), what="the drop file")  # type: ignore[misc]
    # alice gets the message and the NDR for nobody@contoso.test.
    wait_for(lambda: len(maildir_files(env, "alice@contoso.test")) == 2, what="two messages")
    evs = wait_for(lambda: (lambda e: e if sum(x.event_id == "DELIVER" for x in e) >= 3
                            else None)(events(env)), what="three DELIVER events")
    mine = [e for e in evs if e.message_id == "<three@contoso.test>"]  # type: ignore[union-attr]
    by = {(e.event_id, e.source): e for e in mine}
    receive = by[("RECEIVE", "PICKUP")]
    assert receive.source_context == "three.eml"
    assert receive.sender == "alice@contoso.test"
    assert receive.recipients == ["alice@contoso.test", "IMCEAFAX-+2B15551234@contoso.test",
                                  "nobody@contoso.test"]
    assert receive.subject == "three ways" and receive.total_bytes and receive.timestamp
    submit = by[("SUBMIT", "ROUTING")]
    assert submit.recipients == ["alice@contoso.test", "FAX:+15551234"]
    fail = by[("FAIL", "ROUTING")]
    assert fail.recipients == ["nobody@contoso.test"]
    assert fail.recipient_status[0].startswith("550 5.1.1")
    gateway = by[("DELIVER", "GATEWAY")]
    assert gateway.connector_id == "Fax" and gateway.source_context == fax.name
    assert gateway.recipients == ["FAX:+15551234"]
    store = by[("DELIVER", "STOREDRIVER")]
    assert store.recipients == ["alice@contoso.test"]
    assert store.source_context in {p.name for p in maildir_files(env, "alice@contoso.test")}
    dsn = [e for e in evs if e.event_id == "DSN"]  # type: ignore[union-attr]
    assert len(dsn) == 1 and dsn[0].reference == "<three@contoso.test>"
    assert dsn[0].recipients == ["alice@contoso.test"]
    assert all(e.internal_message_id for e in mine if e.event_id != "FAIL")


def test_ndr_is_an_rfc_3464_report_from_the_null_sender(demo_env: MailgateEnv,
                                                        node: NodeThread) -> None:
    """The NDR for an unknown recipient is multipart/report with a delivery-status part per
    failed recipient and the original message attached (no RET=HDRS, under 10 MB), from
    <>."""
    env = demo_env
    drop_file(env.pickup, "x.eml", b"From: alice@contoso.test\nTo: nobody@contoso.test, "
                                   b"IMCEASMS-+2B1555@contoso.test\nSubject: lost\n"
                                   b"Message-ID: <lost@contoso.test>\n\nbody\n")
    [ndr_file] = wait_for(lambda: maildir_files(env, "alice@contoso.test"), what="the NDR")  # type: ignore[misc]
    data = ndr_file.read_bytes()
    assert data.startswith(b"Return-Path: <>\n")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Subject"] == "Undeliverable: lost"
    assert msg["In-Reply-To"] == "<lost@contoso.test>"
    human, status, returned = msg.get_payload()
    assert "nobody@contoso.test" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    per_rcpt = {b["Final-Recipient"]: b for b in blocks[1:]}
    assert per_rcpt["rfc822; nobody@contoso.test"]["Status"] == "5.1.1"
    assert per_rcpt["x-sms; +1555"]["Status"] == "5.1.2"
    assert all(b["Action"] == "failed" for b in blocks[1:])
    assert blocks[0]["Reporting-MTA"].startswith("dns; ")
    assert returned.get_content_type() == "message/rfc822"
    [original] = returned.get_payload()
    assert original["Message-ID"] == "<lost@contoso.test>"
    assert original.get_content().strip() == "body"


def test_no_ndr_about_an_ndr(demo_env: MailgateEnv, node: NodeThread) -> None:
    """A message from the null sender that fails routing is dropped with a FAIL event, never
    answered with another NDR."""
    env = demo_env
    # A Pickup file cannot carry <>; an NDR to an unknown local sender is the real case.
    drop_file(env.pickup, "y.eml", b"From: ghost@contoso.test\nTo: nobody@contoso.test\n"
                                   b"Subject: boo\n\nx\n")
    evs = wait_for(lambda: (lambda e: e if any(x.event_id == "FAIL" and x.sender == "<>"
                                               for x in e) else None)(events(env)),
                   what="the NDR's own FAIL")
    assert sum(e.event_id == "DSN" for e in evs) == 1  # type: ignore[union-attr]
    assert not any(maildir_files(env, a) for a in ("alice@contoso.test",))


def test_pickup_file_over_max_message_size_gets_an_ndr_per_recipient(
        demo_env: MailgateEnv) -> None:
    """A Pickup file larger than MaxMessageSize is answered with an NDR (5.3.4) that names
    each of its recipients and the original Subject, and the file is deleted."""
    env = demo_env
    env.cli("transport-service", "set", "--max-message-size", "64KB")
    node = NodeThread(env)
    try:
        drop_file(env.pickup, "big.eml",
                  b"From: alice@contoso.test\nTo: bob@fabrikam.test, IMCEAFAX-+2B1@contoso.test"
                  b"\nSubject: too big\n\n" + b"x" * 70000 + b"\n")
        [ndr_file] = wait_for(lambda: maildir_files(env, "alice@contoso.test"),  # type: ignore[misc]
                              what="the NDR")
        wait_for(lambda: not list(env.pickup.iterdir()), what="the file to be deleted")
    finally:
        node.stop()
    msg = email.message_from_bytes(ndr_file.read_bytes(), policy=email.policy.default)
    assert msg["Subject"] == "Undeliverable: too big"
    blocks = msg.get_payload()[1].get_payload()
    finals = sorted(b["Final-Recipient"] for b in blocks[1:])
    assert finals == ["rfc822; IMCEAFAX-+2B1@contoso.test", "rfc822; bob@fabrikam.test"]
    assert all(b["Status"] == "5.3.4" for b in blocks[1:])
