"""Delivery status notifications (RFC 3464 multipart/report), authored by mailgate.

A DSN has three parts: a human-readable explanation, a message/delivery-status part
(per-message fields, then one block per recipient: Original-Recipient from ORCPT,
Final-Recipient, Action, Status, Diagnostic-Code, Remote-MTA when known, Will-Retry-Until
for delays) and the original message (message/rfc822) or only its header
(text/rfc822-headers) when the sender asked for RET=HDRS or the message is larger than
`MAX_ATTACH` (Exchange's DsnMaxMessageAttachSize, 10 MB).

Who gets one (RFC 3461 §4.1, RFC 5321 §6.1): never the null reverse-path, never about a
message that is itself a DSN; per recipient, NOTIFY decides: without NOTIFY a failure and a
delay are reported, with NOTIFY only the listed events, NOTIFY=NEVER none. Success
(Action delivered or relayed) only when NOTIFY asked for SUCCESS.
"""

from __future__ import annotations

import email.utils
import uuid
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.policy import SMTP
from typing import Iterable, cast

from mailgate.clock import utc
from mailgate.core.status import Status

MAX_ATTACH = 10 * 1024 * 1024

FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"
RELAYED = "relayed"

_NOTIFY_EVENT = {FAILED: "FAILURE", DELAYED: "DELAY", DELIVERED: "SUCCESS",
                 RELAYED: "SUCCESS"}
_SUBJECT = {FAILED: "Undeliverable: ", DELAYED: "Delivery delayed: ",
            DELIVERED: "Delivered: ", RELAYED: "Relayed: "}
_TEXT = {
    FAILED: "Delivery has failed to these recipients or groups:",
    DELAYED: "Delivery is delayed to these recipients or groups. The server will keep "
             "trying; you do not need to send the message again.",
    DELIVERED: "Your message has been delivered to these recipients or groups:",
    RELAYED: "Your message has been passed on to a system that does not send delivery "
             "notifications, for these recipients or groups:",
}


@dataclass(frozen=True)
class FailedRecipient:
    """A recipient to report on (the name is historical: any Action is possible)."""

    address: str              # final recipient as routed (SMTP address or TYPE:value)
    status: Status
    original: str | None = None  # ORCPT value (addr-type;xtext) when known
    notify: str | None = None    # the recipient's NOTIFY parameter, e.g. "FAILURE,DELAY"
    action: str = FAILED
    remote_mta: str | None = None


def ndr_required(from_address: str, is_dsn: bool) -> bool:
    """RFC 5321 §6.1, §4.5.4: no notification to <> and never a DSN about a DSN."""
    return bool(from_address) and not is_dsn


def wants(notify: str | None, action: str) -> bool:
    """Whether a recipient with this NOTIFY parameter is to be reported with `action`."""
    if notify is None:
        return action in (FAILED, DELAYED)
    events = {p.strip().upper() for p in notify.split(",")}
    return "NEVER" not in events and _NOTIFY_EVENT[action] in events


def subject_for(action: str, original_subject: str | None) -> str:
    return _SUBJECT[action] + (original_subject or "(no subject)")


def _address_type(address: str) -> str:
    # RFC 3464 Final-Recipient is addr-type ";" address; non-SMTP addresses are typed natively.
    if ("@" in address and ":" not in address.split("@", 1)[0]) or ":" not in address:
        return f"rfc822; {address}"
    kind, _, value = address.partition(":")
    return f"x-{kind.lower()}; {value}"


def build_dsn(*, reporting_mta: str, sender: str, original_message_id: str | None,
              original_subject: str | None, original_headers: bytes,
              recipients: list[FailedRecipient], now: float, domain: str,
              arrival: float | None = None, envid: str | None = None,
              original: Iterable[bytes] | None = None, original_size: int = 0,
              ret: str | None = None, will_retry_until: float | None = None
              ) -> tuple[bytes, str]:
    """Build a DSN to `sender` about `recipients` (all with the same Action). The original
    message is attached whole when `original` is given, RET is not HDRS and it is at most
    MAX_ATTACH bytes; otherwise its header. Returns (bytes with CRLF endings, Message-ID)."""
    action = recipients[0].action if recipients else FAILED
    msg = EmailMessage(policy=SMTP)
    message_id = f"<{uuid.uuid4()}@{domain}>"
    msg["From"] = f"Mail Delivery System <postmaster@{domain}>"
    msg["To"] = sender
    msg["Subject"] = subject_for(action, original_subject)
    msg["Date"] = email.utils.format_datetime(utc(now))
    msg["Message-ID"] = message_id
    if original_message_id:
        msg["In-Reply-To"] = original_message_id
        msg["References"] = original_message_id
    msg["Auto-Submitted"] = "auto-replied"
    lines = [_TEXT[action], ""]
    for r in recipients:
        lines.append(f"{r.address}")
        lines.append(f"    {r.status}")
        lines.append("")
    lines.append(f"Diagnostic information for administrators: generated by {reporting_mta}.")
    msg.set_content("\r\n".join(lines) + "\r\n")
    msg.make_mixed()
    msg.replace_header("Content-Type", "multipart/report; report-type=delivery-status")
    msg.set_boundary(f"=_mailgate_{uuid.uuid4().hex}")

    status_part = Message(policy=SMTP)
    status_part["Content-Type"] = "message/delivery-status"
    per_message = Message(policy=SMTP)
    if envid:
        per_message["Original-Envelope-Id"] = envid
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    if arrival is not None:
        per_message["Arrival-Date"] = email.utils.format_datetime(utc(arrival))
    blocks: list[Message | str] = [per_message]
    for r in recipients:
        block = Message(policy=SMTP)
        if r.original:
            block["Original-Recipient"] = r.original.replace(";", "; ", 1)
        block["Final-Recipient"] = _address_type(r.address)
        block["Action"] = r.action
        block["Status"] = r.status.enhanced
        if r.remote_mta:
            block["Remote-MTA"] = f"dns; {r.remote_mta}"
        block["Diagnostic-Code"] = f"smtp; {r.status}"
        if r.action == DELAYED and will_retry_until is not None:
            block["Will-Retry-Until"] = email.utils.format_datetime(utc(will_retry_until))
        blocks.append(block)
    status_part.set_payload(blocks)
    msg.attach(cast(EmailMessage, status_part))

    whole = (original is not None and (ret or "").upper() != "HDRS"
             and original_size <= MAX_ATTACH)
    # The returned message (or header) is inserted as bytes, exactly as stored: the email
    # package would re-encode it, and message bytes are never re-generated.
    placeholder = f"mailgate-original-{uuid.uuid4().hex}"
    returned = Message(policy=SMTP)
    returned["Content-Type"] = "message/rfc822" if whole else "text/rfc822-headers"
    returned["Content-Transfer-Encoding"] = "8bit"
    returned.set_payload(placeholder)
    msg.attach(cast(EmailMessage, returned))
    if whole:
        assert original is not None
        body = b"".join(original)
    else:
        body = original_headers.rstrip(b"\r\n") + b"\r\n"
    data = msg.as_bytes(policy=SMTP).replace(placeholder.encode(), body, 1)
    return data, message_id

