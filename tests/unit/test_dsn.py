"""DSNs (dsn.py) parse with Python's email package as RFC 3464 reports, and each field is
what RFC 3464/3461 and the README say."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from typing import Any, cast

import pytest

from mailgate.core.status import Status
from mailgate.dsn import (
    DELAYED,
    DELIVERED,
    FAILED,
    MAX_ATTACH,
    RELAYED,
    FailedRecipient,
    build_dsn,
    ndr_required,
    wants,
)

ORIGINAL = (b"From: alice@contoso.test\r\nTo: FAX:+15551234\r\nSubject: caf\xc3\xa9\r\n"
            b"Message-ID: <orig@contoso.test>\r\n\r\nbody with 8-bit \xff bytes\r\n")
HEADER = ORIGINAL.split(b"\r\n\r\n")[0]


def report(recipients: list[FailedRecipient], **kw: Any) -> tuple[EmailMessage, bytes]:
    args: dict[str, Any] = dict(
        reporting_mta="gw.contoso.test", sender="alice@contoso.test",
        original_message_id="<orig@contoso.test>", original_subject="café",
        original_headers=HEADER, recipients=recipients, now=1_800_000_000.0,
        domain="contoso.test", arrival=1_799_990_000.0, original=[ORIGINAL],
        original_size=len(ORIGINAL))
    args.update(kw)
    data, _ = build_dsn(**args)
    return cast(EmailMessage, email.message_from_bytes(data, policy=email.policy.default)), data


def test_failed_report_has_every_rfc_3464_field() -> None:
    """A failure report: multipart/report; report-type=delivery-status from postmaster, a
    human part, per-message fields (Original-Envelope-Id, Reporting-MTA, Arrival-Date) and
    per-recipient fields (Original-Recipient from ORCPT, Final-Recipient typed, Action,
    Status, Remote-MTA, Diagnostic-Code)."""
    st = Status(550, "5.1.1", "RESOLVER.ADR.RecipNotFound; not found")
    msg, _ = report([FailedRecipient("FAX:+15551234", st, "rfc822;IMCEAFAX-+2B1@contoso.test",
                                     None, FAILED, "fax.contoso.test")], envid="ENV-42")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Subject"] == "Undeliverable: café"
    assert msg["To"] == "alice@contoso.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<orig@contoso.test>"
    human, status, returned = msg.get_payload()  # type: ignore[misc]
    assert "FAX:+15551234" in human.get_content()
    per_message, block = status.get_payload()
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert per_message["Reporting-MTA"] == "dns; gw.contoso.test"
    assert per_message["Arrival-Date"].startswith("Fri, 15 Jan 2027")
    assert block["Original-Recipient"] == "rfc822; IMCEAFAX-+2B1@contoso.test"
    assert block["Final-Recipient"] == "x-fax; +15551234"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; fax.contoso.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 RESOLVER.ADR.RecipNotFound; not found"
    assert returned.get_content_type() == "message/rfc822"


def test_original_is_attached_byte_for_byte() -> None:
    """The returned message is the stored bytes, 8-bit included, not re-encoded."""
    _, data = report([FailedRecipient("a@b.test", Status(550, "5.0.0", "x"))])
    assert ORIGINAL in data


@pytest.mark.parametrize("kw", [{"ret": "HDRS"}, {"ret": "hdrs"},
                                {"original_size": MAX_ATTACH + 1}, {"original": None}])
def test_headers_only_for_ret_hdrs_or_over_10_mb(kw: dict[str, Any]) -> None:
    """RET=HDRS, a message over 10 MB (or no content at hand) return only the header, as
    text/rfc822-headers."""
    msg, data = report([FailedRecipient("a@b.test", Status(550, "5.0.0", "x"))], **kw)
    returned = msg.get_payload()[2]  # type: ignore[index]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert HEADER in data and b"body with 8-bit" not in data


def test_delay_report_has_will_retry_until_and_subject() -> None:
    """A delay DSN: Action delayed, a 4.x.x status and Will-Retry-Until."""
    msg, _ = report([FailedRecipient("a@b.test", Status(400, "4.4.7", "Message delayed"),
                                     action=DELAYED)], will_retry_until=1_800_100_000.0)
    assert msg["Subject"] == "Delivery delayed: café"
    block = msg.get_payload()[1].get_payload()[1]  # type: ignore[index]
    assert block["Action"] == "delayed" and block["Status"] == "4.4.7"
    assert block["Will-Retry-Until"].startswith("Sat, 16 Jan 2027")


@pytest.mark.parametrize("notify, action, expected", [
    (None, FAILED, True), (None, DELAYED, True), (None, DELIVERED, False),
    (None, RELAYED, False), ("NEVER", FAILED, False), ("NEVER", DELAYED, False),
    ("SUCCESS", DELIVERED, True), ("success", RELAYED, True), ("SUCCESS", FAILED, False),
    ("FAILURE", FAILED, True), ("FAILURE", DELAYED, False), ("DELAY,FAILURE", DELAYED, True),
    ("SUCCESS, DELAY", FAILED, False),
])
def test_notify_decides_per_recipient(notify: str | None, action: str, expected: bool) -> None:
    """RFC 3461 §4.1: without NOTIFY failures and delays are reported; NEVER nothing;
    otherwise only the listed events (SUCCESS covers delivered and relayed)."""
    assert wants(notify, action) is expected


@pytest.mark.parametrize("sender, is_dsn, expected", [
    ("alice@contoso.test", False, True), ("", False, False), ("alice@contoso.test", True, False),
])
def test_no_dsn_to_the_null_sender_or_about_a_dsn(sender: str, is_dsn: bool,
                                                  expected: bool) -> None:
    """RFC 5321 §6.1: never a notification to <> nor about a notification."""
    assert ndr_required(sender, is_dsn) is expected
