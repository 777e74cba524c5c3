"""Unit tests for mailgate.receive.pickup_parse: the Pickup file header rules.

Reference: exchange-transport.md §2.3 (requirements), §2.4 (header rewriting), §2.7
(NDR versus badmail); reliability.md §2.4 (T33 header injection), §2.6 (T32 parser DoS),
T40 (Pickup limits and rewriting).
"""

from __future__ import annotations

import datetime
import email.utils
import io
import pathlib
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.receive.pickup_parse import (
    PickupError,
    PickupMessage,
    normalise_line_endings,
    parse_pickup,
    read_header_block,
)

NOW = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
RECEIVED = (
    b"Received: from localhost by Pickup with mailgate id 0.1; Tue, 2 Jan 2024 03:04:05 +0000\r\n"
)
GENERATED_ID = "<0f8fad5b-d9cb-469f-a165-70867728950e@contoso.test>"

MINIMAL_LF = (
    b"To: mary@contoso.com\n"
    b"From: bob@fabrikam.com\n"
    b"Subject: Message subject\n"
    b"\n"
    b"This is the body of the message.\n"
)


def parse(head: bytes, max_recipients: int = 100, body_offset: int = 0) -> PickupMessage:
    return parse_pickup(
        head,
        received=RECEIVED,
        max_recipients=max_recipients,
        now=NOW,
        make_message_id=lambda: GENERATED_ID,
        body_offset=body_offset,
    )


def parse_file(data: bytes, max_header_size: int = 65536, **kw: int) -> PickupMessage:
    head, offset = read_header_block(io.BytesIO(data), max_header_size)
    return parse(head, body_offset=offset, **kw)


def bad(head: bytes, max_recipients: int = 100) -> PickupError:
    """Parse a header that must be refused; return the error."""
    with pytest.raises(PickupError) as info:
        parse(head, max_recipients)
    return info.value


def header_lines(msg: PickupMessage) -> list[bytes]:
    assert msg.header.endswith(b"\r\n\r\n")
    return msg.header[:-4].split(b"\r\n")


def field_names(msg: PickupMessage) -> list[str]:
    return [
        line.split(b":", 1)[0].decode().lower()
        for line in header_lines(msg)
        if line[:1] not in (b" ", b"\t")
    ]


# ---------------------------------------------------------------------------------------
# The minimal example of reference §2.3
# ---------------------------------------------------------------------------------------


def test_minimal_example_lf() -> None:
    # The documented minimal Pickup file (LF line endings) is accepted: From is the
    # originator, To the recipient, the rewritten header is CRLF and starts with our
    # Received, and the body starts right after the blank line.
    msg = parse_file(MINIMAL_LF)
    assert msg.sender == "bob@fabrikam.com"
    assert msg.recipients == ["mary@contoso.com"]
    assert msg.line_ending == b"\n"
    assert msg.body_offset == MINIMAL_LF.index(b"This is the body")
    assert msg.subject == "Message subject"
    assert msg.bcc_only is False
    assert msg.header.startswith(RECEIVED)
    assert msg.header == (
        RECEIVED
        + b"To: mary@contoso.com\r\n"
        + b"From: bob@fabrikam.com\r\n"
        + b"Subject: Message subject\r\n"
        + b"Message-ID: "
        + GENERATED_ID.encode()
        + b"\r\n"
        + b"Date: Tue, 02 Jan 2024 03:04:05 +0000\r\n"
        + b"\r\n"
    )


def test_minimal_example_crlf() -> None:
    # The same file with CRLF line endings gives the same result, with line_ending CRLF.
    data = MINIMAL_LF.replace(b"\n", b"\r\n")
    msg = parse_file(data)
    lf = parse_file(MINIMAL_LF)
    assert msg.line_ending == b"\r\n"
    assert msg.header == lf.header
    assert (msg.sender, msg.recipients) == (lf.sender, lf.recipients)
    assert data[msg.body_offset :] == b"This is the body of the message.\r\n"


# ---------------------------------------------------------------------------------------
# read_header_block
# ---------------------------------------------------------------------------------------


class CountingReader(io.RawIOBase):
    """A file that returns at most `step` bytes per read and counts what it handed out."""

    def __init__(self, data: bytes, step: int = 1 << 30):
        self.data = data
        self.pos = 0
        self.step = step
        self.handed_out = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = self.step if size < 0 else min(size, self.step)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        self.handed_out += len(out)
        return out


def test_header_larger_than_limit_is_badmail() -> None:
    # A 70 KB header with the default 64 KB PickupDirectoryMaxHeaderSize is refused by
    # read_header_block as badmail, naming the limit, and the body is never read.
    data = b"From: a@b.test\r\nTo: c@d.test\r\n" + b"X-Pad: " + b"x" * 70_000 + b"\r\n\r\n"
    data += b"body" * 1_000_000
    f = CountingReader(data)
    with pytest.raises(PickupError) as info:
        read_header_block(f, 65536)
    assert info.value.reason == ("header is larger than PickupDirectoryMaxHeaderSize (65536 bytes)")
    assert info.value.ndr is None
    assert f.handed_out <= 65536 + 3


def test_header_of_exactly_the_limit_is_accepted() -> None:
    # A header of exactly max_header_size bytes (without the blank line) is accepted; one
    # byte more is refused.
    line = b"From: a@b.test\r\nTo: c@d.test\r\n"
    pad = 1000 - len(line) - len(b"X: \r\n")
    head = line + b"X: " + b"y" * pad + b"\r\n"
    assert len(head) == 1000
    assert read_header_block(io.BytesIO(head + b"\r\nbody"), 1000) == (head, 1002)
    with pytest.raises(PickupError):
        read_header_block(io.BytesIO(head + b"\r\nbody"), 999)


def test_header_block_split_across_tiny_reads() -> None:
    # The blank line is found even when every read returns one byte (CR, LF and the
    # blank line arrive in separate reads).
    data = b"From: a@b.test\r\nTo: c@d.test\r\n\r\nbody\r\n\r\nmore"
    head, offset = read_header_block(CountingReader(data, step=1), 65536)
    assert head == b"From: a@b.test\r\nTo: c@d.test\r\n"
    assert data[offset:] == b"body\r\n\r\nmore"


def test_header_block_lf_and_eof_without_blank_line() -> None:
    # LF files end the header at "\n\n"; without any blank line the whole file is the
    # header and the body offset is the file length; a leading blank line means an empty
    # header.
    assert read_header_block(io.BytesIO(b"A: 1\nB: 2\n\nbody"), 100) == (b"A: 1\nB: 2\n", 11)
    assert read_header_block(io.BytesIO(b"A: 1\nB: 2\n"), 100) == (b"A: 1\nB: 2\n", 10)
    assert read_header_block(io.BytesIO(b"A: 1"), 100) == (b"A: 1", 4)
    assert read_header_block(io.BytesIO(b"\r\nbody"), 100) == (b"", 2)
    assert read_header_block(io.BytesIO(b"\nbody"), 100) == (b"", 1)
    assert read_header_block(io.BytesIO(b""), 100) == (b"", 0)


def test_header_block_without_blank_line_over_limit() -> None:
    # A file with no blank line that is bigger than the limit is refused after reading
    # only a little more than the limit.
    f = CountingReader(b"X: " + b"y" * 10_000_000)
    with pytest.raises(PickupError):
        read_header_block(f, 32768)
    assert f.handed_out <= 32768 + 3


# ---------------------------------------------------------------------------------------
# Envelope sender (reference §2.3)
# ---------------------------------------------------------------------------------------


def test_sender_and_from_single_from_wins() -> None:
    # If both From and Sender hold one address, From is the envelope originator.
    msg = parse(b"From: f@a.test\nSender: s@a.test\nTo: r@b.test\n")
    assert msg.sender == "f@a.test"


def test_sender_only() -> None:
    # With no From, the single Sender address is the originator.
    msg = parse(b"Sender: Sam <s@a.test>\nTo: r@b.test\n")
    assert msg.sender == "s@a.test"


def test_from_with_two_addresses_and_sender() -> None:
    # From may hold several addresses when Sender holds exactly one; Sender is then the
    # originator.
    msg = parse(b"From: f1@a.test, F Two <f2@a.test>\nSender: s@a.test\nTo: r@b.test\n")
    assert msg.sender == "s@a.test"


def test_from_with_two_addresses_without_sender_is_badmail() -> None:
    # Several From addresses and no Sender: badmail naming From and Sender.
    err = bad(b"From: f1@a.test, f2@a.test\nTo: r@b.test\n")
    assert err.ndr is None
    assert "From: holds 2 addresses" in err.reason and "Sender" in err.reason


def test_two_from_fields_count_as_two_addresses() -> None:
    # Two From fields are two From addresses: without a Sender that is badmail, with
    # one Sender the Sender is the originator.
    err = bad(b"From: f1@a.test\nFrom: f2@a.test\nTo: r@b.test\n")
    assert "From: holds 2 addresses" in err.reason
    msg = parse(b"From: f1@a.test\nFrom: f2@a.test\nSender: s@a.test\nTo: r@b.test\n")
    assert msg.sender == "s@a.test"


def test_sender_with_two_addresses_is_badmail() -> None:
    # Sender may hold only one address, even if From holds one.
    err = bad(b"From: f@a.test\nSender: s1@a.test, s2@a.test\nTo: r@b.test\n")
    assert err.ndr is None
    assert "Sender: holds 2 addresses" in err.reason


def test_no_sender_is_badmail() -> None:
    # No address in From or Sender (absent, or an empty group) is badmail.
    for head in (b"To: r@b.test\n", b"From: nobody:;\nTo: r@b.test\n"):
        err = bad(head)
        assert err.ndr is None
        assert err.reason == "no sender: no address in From: or Sender:"


def test_invalid_from_is_badmail_naming_the_header() -> None:
    # An invalid address in From is badmail naming the header, the line and the value.
    err = bad(b"To: r@b.test\nFrom: Bob <bob at fabrikam>\n")
    assert err.ndr is None
    assert err.reason.startswith("invalid address in From: at header line 2")
    assert '"Bob <bob at fabrikam>"' in err.reason


def test_invalid_sender_is_badmail_even_with_valid_from() -> None:
    # An invalid Sender is badmail even though From alone would give an originator.
    err = bad(b"From: f@a.test\nSender: s@\nTo: r@b.test\n")
    assert err.reason.startswith("invalid address in Sender:")


def test_zero_byte_file_is_badmail() -> None:
    # An empty file has no sender: badmail, never an exception of another kind.
    head, offset = read_header_block(io.BytesIO(b""), 65536)
    with pytest.raises(PickupError) as info:
        parse(head, body_offset=offset)
    assert info.value.reason == "no sender: no address in From: or Sender:"


# ---------------------------------------------------------------------------------------
# Recipients
# ---------------------------------------------------------------------------------------


def test_recipients_from_to_cc_bcc_in_order_deduplicated() -> None:
    # Recipients are To, then Cc, then Bcc addresses, de-duplicated case-insensitively
    # keeping the first spelling; display names, comments, groups and RFC 2047 words are
    # fine.
    head = (
        b"Bcc: hidden@c.test, A@B.TEST\n"
        b"From: f@a.test\n"
        b'To: =?utf-8?q?J=C3=B6rg?= <j@b.test>, undisclosed:;, "Doe, Jane" <a@b.test>\n'
        b"Cc: team: x@c.test, J@B.test;, y@c.test (why)\n"
    )
    msg = parse(head)
    assert msg.recipients == ["j@b.test", "a@b.test", "x@c.test", "y@c.test", "hidden@c.test"]
    assert msg.bcc_only is False


def test_no_recipient_is_badmail() -> None:
    # No address in To, Cc or Bcc (an empty group does not count) is badmail.
    for head in (b"From: f@a.test\n", b"From: f@a.test\nTo: undisclosed-recipients:;\n"):
        err = bad(head)
        assert err.ndr is None
        assert err.reason == "no recipient in To:, Cc: or Bcc:"


def test_invalid_recipient_is_badmail_with_truncated_value() -> None:
    # An invalid recipient is badmail naming the header; the value is cut to 100 chars.
    value = b"ok@b.test, " + b"x" * 300
    err = bad(b"From: f@a.test\nCc: " + value + b"\n")
    assert err.ndr is None
    assert err.reason.startswith("invalid address in Cc: at header line 2")
    assert '"ok@b.test, ' + "x" * 89 + '..."' in err.reason
    assert "x" * 101 not in err.reason


@pytest.mark.parametrize(
    "value",
    [
        "alice@example.org)<bob@example.org>",  # CVE-2023-27043 shape
        "alice@example.org <bob@example.org>",  # unquoted '@' in a display name
        "a@b@c.test",
        "plainword",
        "<>",
        "a@",
        "@b.test",
        "Alice <alice@example.org",
        "a@b.test; c@d.test",
        '"unterminated@b.test',
        "(unbalanced a@b.test",
        "a@b..test",
        "a@b.test\x01",
        "g1: g2: a@b.test;;",
        "a[, hidden@b.test),] :c@b.test",  # '[' in a group name would hide an address
        "[x] <a@b.test>",
    ],
)
def test_malformed_recipient_never_becomes_a_recipient(value: str) -> None:
    # Malformed address lists are refused as a whole (badmail); no part of them is
    # guessed into an envelope recipient.
    err = bad(b"From: f@a.test\nTo: " + value.encode() + b"\n")
    assert err.ndr is None
    assert err.reason.startswith("invalid address in To:")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"a@b"@c.test', ['"a@b"@c.test']),
        ('"alice@example.org" <bob@example.org>', ["bob@example.org"]),
        ('"john.doe"@x.test', ["john.doe@x.test"]),
        ('"john doe"@x.test', ['"john doe"@x.test']),
        ("john . doe @ x.test", ["john.doe@x.test"]),
        ("<@relay.test,@r2.test:u@x.test>", ["u@x.test"]),
        ("u@[192.0.2.1]", ["u@[192.0.2.1]"]),
        ("jörg@bücher.test", ["jörg@bücher.test"]),
        ("a@b.test,,, c@d.test", ["a@b.test", "c@d.test"]),
        ("((nested) comment) a@b.test", ["a@b.test"]),
        ("list: a@b.test", ["a@b.test"]),  # group closed by the end of the value
    ],
)
def test_tricky_but_valid_recipients(value: str, expected: list[str]) -> None:
    # Valid RFC 5322 forms (quoted local parts, obs- forms, literals, UTF-8) give their
    # canonical SMTP address; a quoted '@' stays inside the local part.
    msg = parse(b"From: f@a.test\nTo: " + value.encode() + b"\n")
    assert msg.recipients == expected


def test_undecodable_8bit_address_is_badmail() -> None:
    # 8-bit bytes that are not UTF-8 may appear in display names but not in an address.
    ok = parse(b"From: f@a.test\nTo: Caf\xe9 <r@b.test>\n")
    assert ok.recipients == ["r@b.test"]
    err = bad(b"From: f@a.test\nTo: r\xe9@b.test\n")
    assert err.reason.startswith("invalid address in To:")
    assert "\\xe9" in err.reason  # escaped, the reason stays one clean line


def test_too_many_recipients_is_an_ndr_to_the_sender() -> None:
    # 101 distinct recipients with PickupDirectoryMaxRecipientsPerMessage 100: an NDR
    # (5.5.3) to the valid sender, not badmail.
    to = ", ".join(f"r{i}@b.test" for i in range(101)).encode()
    err = bad(b"From: f@a.test\nTo: " + to + b"\n", max_recipients=100)
    assert err.ndr == (
        "550 5.5.3 too many recipients (101, PickupDirectoryMaxRecipientsPerMessage is 100)"
    )
    assert err.sender == "f@a.test"
    assert "101" in err.reason and "PickupDirectoryMaxRecipientsPerMessage" in err.reason


def test_recipient_limit_counts_after_deduplication() -> None:
    # 100 distinct recipients listed twice stay within a limit of 100.
    to = ", ".join(f"r{i}@b.test" for i in range(100)).encode()
    msg = parse(b"From: f@a.test\nTo: " + to + b"\nCc: " + to.upper() + b"\n")
    assert len(msg.recipients) == 100


def test_too_many_recipients_with_invalid_sender_is_badmail() -> None:
    # Without a valid sender no NDR is possible: the sender problem is reported first.
    to = ", ".join(f"r{i}@b.test" for i in range(101)).encode()
    err = bad(b"From: not-an-address\nTo: " + to + b"\n")
    assert err.ndr is None and err.sender is None
    assert err.reason.startswith("invalid address in From:")


# ---------------------------------------------------------------------------------------
# Header rewriting (reference §2.4)
# ---------------------------------------------------------------------------------------


def test_bcc_only_gets_undisclosed_recipients() -> None:
    # Bcc-only: the Bcc addresses are envelope recipients, Bcc is removed and
    # "To: Undisclosed Recipients:;" is added after the kept fields.
    msg = parse(b"From: f@a.test\nBcc: h1@b.test,\n h2@b.test\nSubject: s\n")
    assert msg.recipients == ["h1@b.test", "h2@b.test"]
    assert msg.bcc_only is True
    assert b"h1@b.test" not in msg.header and b"Bcc" not in msg.header
    lines = header_lines(msg)
    assert lines[-1] == b"To: Undisclosed Recipients:;"
    assert lines.index(b"Subject: s") < lines.index(b"To: Undisclosed Recipients:;")


def test_bcc_only_with_empty_to_group_keeps_it() -> None:
    # An existing (empty) To field is kept and no second To is added.
    msg = parse(b"From: f@a.test\nTo: undisclosed-recipients:;\nBcc: h@b.test\n")
    assert msg.bcc_only is True
    assert field_names(msg).count("to") == 1
    assert b"To: undisclosed-recipients:;\r\n" in msg.header


def test_firewall_fields_removed_and_our_received_first() -> None:
    # Received, Resent-*, Bcc, X-MS-Exchange-Organization-* and X-MS-Exchange-Forest-*
    # fields (any case, folded or not) are removed; every other field keeps its bytes and
    # folding; our Received is the first line.
    head = (
        b"Received: from evil by x; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"\tfolded part of received\r\n"
        b"From: f@a.test\r\n"
        b"RESENT-FROM: r@a.test\r\n"
        b"Resent-Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"To: t@b.test\r\n"
        b"bcc: h@b.test\r\n"
        b"X-MS-Exchange-Organization-AuthAs: Internal\r\n"
        b"x-ms-exchange-forest-RulesExecuted: x\r\n"
        b"X-MS-Exchange-Transport-Other: kept\r\n"
        b"X-Custom: keep\r\n"
        b"  me folded \r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID: <m@a.test>\r\n"
        b"Received-SPF: pass\r\n"
    )
    msg = parse(head)
    assert msg.header.startswith(RECEIVED)
    assert msg.recipients == ["t@b.test", "h@b.test"]
    assert msg.header == RECEIVED + (
        b"From: f@a.test\r\n"
        b"To: t@b.test\r\n"
        b"X-MS-Exchange-Transport-Other: kept\r\n"
        b"X-Custom: keep\r\n"
        b"  me folded \r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID: <m@a.test>\r\n"
        b"Received-SPF: pass\r\n"
        b"\r\n"
    )


def test_message_id_added_when_missing_or_empty() -> None:
    # A missing or empty (white space, even folded) Message-ID is replaced by the one
    # make_message_id() returns; the empty field is not left beside it.
    for head in (
        b"From: f@a.test\nTo: t@b.test\n",
        b"From: f@a.test\nMessage-ID:\nTo: t@b.test\n",
        b"From: f@a.test\nMessage-ID:   \n \t\nTo: t@b.test\n",
    ):
        msg = parse(head)
        assert msg.message_id == GENERATED_ID
        assert field_names(msg).count("message-id") == 1
        assert b"Message-ID: " + GENERATED_ID.encode() + b"\r\n" in msg.header


def test_message_id_kept_when_present() -> None:
    # An existing Message-ID is kept byte for byte (folding too) and reported; no new one
    # is generated.
    def fail() -> str:
        raise AssertionError("make_message_id must not be called")

    head = b"From: f@a.test\nTo: t@b.test\nMessage-Id:\n <abc@a.test>\n"
    msg = parse_pickup(head, received=RECEIVED, max_recipients=10, now=NOW, make_message_id=fail)
    assert msg.message_id == "<abc@a.test>"
    assert b"Message-Id:\r\n <abc@a.test>\r\n" in msg.header
    assert field_names(msg).count("message-id") == 1


def test_date_added_when_missing() -> None:
    # A missing Date is added with the processing time in RFC 5322 form.
    msg = parse(b"From: f@a.test\nTo: t@b.test\n")
    assert header_lines(msg)[-1] == b"Date: " + email.utils.format_datetime(NOW).encode()


@pytest.mark.parametrize(
    "date", [b"yesterday", b"", b"Mon, 32 Jan 2024 00:00:00 +0000", b"x" * 5000]
)
def test_malformed_date_replaced(date: bytes) -> None:
    # A Date that email.utils.parsedate_to_datetime refuses is removed and replaced by
    # the processing time.
    msg = parse(b"From: f@a.test\nDate: " + date + b"\nTo: t@b.test\n")
    dates = [line for line in header_lines(msg) if line.lower().startswith(b"date:")]
    assert dates == [b"Date: Tue, 02 Jan 2024 03:04:05 +0000"]


def test_valid_date_kept_and_later_bad_dates_removed() -> None:
    # The first Date that parses is kept where it is; malformed ones are removed.
    msg = parse(
        b"Date: garbage\nFrom: f@a.test\nDate: Mon, 1 Jan 2024 10:00:00 +0100\n"
        b"To: t@b.test\nDate: more garbage\n"
    )
    assert header_lines(msg)[1:] == [
        b"From: f@a.test",
        b"Date: Mon, 1 Jan 2024 10:00:00 +0100",
        b"To: t@b.test",
        b"Message-ID: " + GENERATED_ID.encode(),
    ]


def test_subject_8bit_utf8_and_rfc2047_decoded_for_tracking() -> None:
    # The tracking subject decodes raw UTF-8 and RFC 2047 words, collapses white space
    # and is cut to 255 characters; the header keeps the original bytes.
    raw = "Grüße".encode() + b" =?utf-8?q?caf=C3=A9?=\n  \t folded"
    msg = parse(b"From: f@a.test\nTo: t@b.test\nSubject: " + raw + b"\n")
    assert msg.subject == "Grüße café folded"
    assert b"Subject: " + raw.replace(b"\n", b"\r\n") + b"\r\n" in msg.header
    long = parse(b"From: f@a.test\nTo: t@b.test\nSubject: " + b"word " * 200 + b"\n")
    assert len(long.subject) == 255
    invalid = parse(b"From: f@a.test\nTo: t@b.test\nSubject: caf\xe9\n")
    assert invalid.subject == "caf\ufffd"


def test_rewritten_header_is_all_crlf() -> None:
    # Every line of the rewritten header ends in CRLF: no bare CR or LF remains.
    msg = parse_file(MINIMAL_LF)
    assert msg.header.count(b"\n") == msg.header.count(b"\r\n") == msg.header.count(b"\r")


# ---------------------------------------------------------------------------------------
# Header syntax and injection (reliability.md §2.4, T33)
# ---------------------------------------------------------------------------------------


def test_injected_bcc_via_bare_lf_is_badmail() -> None:
    # T33: in a CRLF file, "Subject: a\nBcc: hidden@example.test\r\n" must never add a
    # recipient: the bare LF makes the file badmail.
    head = b"From: f@a.test\r\nTo: t@b.test\r\nSubject: a\nBcc: hidden@example.test\r\n"
    err = bad(head)
    assert err.ndr is None
    assert "mixed line endings" in err.reason and "line 3" in err.reason


def test_injected_header_via_bare_cr_is_badmail() -> None:
    # T33: "Subject: a\rX-Injected: 1\r\n" and a bare CR before a Bcc are badmail.
    for head in (
        b"From: f@a.test\r\nTo: t@b.test\r\nSubject: a\rX-Injected: 1\r\n",
        b"From: f@a.test\r\nTo: t@b.test\r\nSubject: a\rBcc: hidden@example.test\r\n",
        b"From: f@a.test\nTo: t@b.test\nSubject: a\rBcc: hidden@example.test\n",
    ):
        err = bad(head)
        assert "bare CR inside header line 3" in err.reason


def test_injection_in_lf_file_via_crlf_is_badmail() -> None:
    # An LF file with one CRLF line is mixed: badmail.
    err = bad(b"From: f@a.test\nTo: t@b.test\r\nBcc: hidden@example.test\n")
    assert "mixed line endings" in err.reason and "line 2" in err.reason


def test_nul_byte_is_badmail() -> None:
    # A NUL anywhere in the header is badmail naming the line.
    err = bad(b"From: f@a.test\nTo: t@b.test\nSubject: a\x00b\n")
    assert err.reason == "NUL byte in the header at line 3"


def test_body_line_before_blank_line_is_badmail() -> None:
    # A line that is neither a field nor a continuation (a body line with no blank line
    # before it) is badmail naming the line; a later To is not silently used.
    err = bad(b"From: f@a.test\nThis is the body\nTo: t@b.test\n")
    assert err.reason.startswith("header line 2 is not a header field")
    assert '"This is the body"' in err.reason


def test_first_line_continuation_and_bad_field_names_are_badmail() -> None:
    # A first line starting with white space, a name with a space before the colon, an
    # 8-bit name and an empty line inside the header are all badmail.
    assert "line 1" in bad(b" From: f@a.test\nTo: t@b.test\n").reason
    assert (
        "header line 2 has an invalid field name" in bad(b"From: f@a.test\nTo : t@b.test\n").reason
    )
    assert "header line 2" in bad(b"From: f@a.test\nT\xf6: t@b.test\n").reason
    assert "header line 2 is empty" in bad(b"From: f@a.test\n\nTo: t@b.test\n").reason


def test_mixed_line_endings_is_badmail() -> None:
    # The first line decides the ending; a later different one is badmail.
    err = bad(b"From: f@a.test\r\nTo: t@b.test\nSubject: x\r\n")
    assert err.reason == ("mixed line endings in the header: line 1 ends with CRLF, line 2 with LF")


def test_reason_is_always_one_line() -> None:
    # Values copied into a reason cannot break it into several lines.
    err = bad(b"From: f@a.test\nTo: a\x0bb\x1b[31m\n")
    assert "\n" not in err.reason and "\r" not in err.reason and "\x1b" not in err.reason


# ---------------------------------------------------------------------------------------
# normalise_line_endings
# ---------------------------------------------------------------------------------------


def reference_crlf(data: bytes) -> bytes:
    """One-shot reference conversion: CRLF, lone CR and lone LF all become CRLF."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"a\nb\n"], b"a\r\nb\r\n"),
        ([b"a\rb\r"], b"a\r\nb\r\n"),
        ([b"a\r\nb\r\n"], b"a\r\nb\r\n"),
        ([b"a\r\n\n\r\r\nb"], b"a\r\n\r\n\r\n\r\nb"),
        ([b"a\r", b"\nb"], b"a\r\nb"),  # CRLF split over two chunks is one line break
        ([b"a\r", b"", b"\nb"], b"a\r\nb"),  # an empty chunk in between changes nothing
        ([b"a\r", b"\rb"], b"a\r\n\r\nb"),
        ([b"a\n", b"\nb"], b"a\r\n\r\nb"),
        ([b"\r", b"\n", b"\r", b"\n"], b"\r\n\r\n"),
        ([b"no line end"], b"no line end"),
    ],
)
def test_normalise_line_endings_examples(chunks: list[bytes], expected: bytes) -> None:
    # LF, CR, CRLF and mixed endings become CRLF, also across chunk boundaries.
    assert b"".join(normalise_line_endings(chunks)) == expected


@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=10))
def test_normalise_line_endings_any_split(data: bytes, cuts: list[int]) -> None:
    # For any split of the input into chunks the result equals the one-shot conversion.
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert b"".join(normalise_line_endings(iter(chunks))) == reference_crlf(data)


def test_normalise_line_endings_is_lazy() -> None:
    # The converter consumes its input one chunk at a time (it can stream a body).
    consumed = []

    def source():
        for chunk in (b"a\n", b"b\r", b"\nc"):
            consumed.append(chunk)
            yield chunk

    it = normalise_line_endings(source())
    assert next(it) == b"a\r\n"
    assert consumed == [b"a\n"]


# ---------------------------------------------------------------------------------------
# Robustness: no exception but PickupError, bounded time (rule 5/6, T32, T34)
# ---------------------------------------------------------------------------------------


def assert_only_pickup_error(head: bytes) -> PickupMessage | None:
    try:
        msg = parse(head, max_recipients=10_000)
    except PickupError as err:
        assert not err.reason.startswith("internal error"), err.reason
        assert "\n" not in err.reason and "\r" not in err.reason
        return None
    # A success must be a well-formed result.
    assert msg.header.startswith(RECEIVED)
    assert msg.header.endswith(b"\r\n\r\n")
    assert msg.header.count(b"\n") == msg.header.count(b"\r\n") == msg.header.count(b"\r")
    assert msg.recipients and msg.sender
    assert "bcc" not in field_names(msg)
    return msg


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_pickup_error(head: bytes) -> None:
    # Any bytes at all either parse or raise PickupError (never an internal error).
    assert_only_pickup_error(head)


_NAMES = st.sampled_from(
    [
        "From",
        "Sender",
        "To",
        "Cc",
        "Bcc",
        "Subject",
        "Date",
        "Message-ID",
        "Received",
        "Resent-From",
        "X-MS-Exchange-Organization-X",
        "X-Other",
        "to",
        "FROM",
        " ",
        "Bad Name",
    ]
)
_VALUE_ALPHABET = st.sampled_from(
    [*'ab.@<>,;:"()[]\\ \t=?-_', "\r", "\n", "\r\n", "\x00", "é", "\udcff", "a@b.c"]
)
_VALUES = st.lists(_VALUE_ALPHABET, max_size=40).map("".join)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(_NAMES, _VALUES), max_size=10),
    st.sampled_from(["\r\n", "\n"]),
)
def test_arbitrary_header_like_text_raises_only_pickup_error(
    fields: list[tuple[str, str]], ending: str
) -> None:
    # Header-shaped input built from address specials, CR/LF/NUL, 8-bit and undecodable
    # bytes either parses into a well-formed result or raises PickupError.
    text = "".join(f"{name}:{value}{ending}" for name, value in fields)
    msg = assert_only_pickup_error(text.encode("utf-8", "surrogateescape"))
    if msg is not None:
        for addr in [*msg.recipients, msg.sender]:
            assert "@" in addr and not re.search(r"[\x00-\x1f\x7f]", addr)


@given(
    st.lists(
        st.sampled_from(["(", ")", '"', "\\", "<", ">", "a@b.c", ",", ":", ";", " "]), max_size=60
    )
)
def test_address_specials_soup(parts: list[str]) -> None:
    # Random mixes of address specials in To never raise anything but PickupError.
    assert_only_pickup_error(b"From: f@a.test\nTo: " + "".join(parts).encode() + b"\n")


def timed(head: bytes, max_recipients: int = 10_000) -> tuple[float, PickupMessage | None]:
    start = time.perf_counter()
    msg = assert_only_pickup_error(head) if max_recipients == 10_000 else None
    return time.perf_counter() - start, msg


def test_64k_to_with_9000_addresses_is_fast() -> None:
    # A 64 KB To with 9 000 short addresses parses in well under the budget (~1 s; the
    # assertion allows 2 s for slow CI machines).
    to = b",".join(b"%x@a" % i for i in range(9000))
    assert len(to) < 65536
    elapsed, msg = timed(b"From: f@a.test\nTo: " + to + b"\n")
    assert msg is not None and len(msg.recipients) == 9000
    assert elapsed < 2.0


FIVE_MB = 5_000_000


def fill(unit: bytes) -> bytes:
    return unit * (FIVE_MB // len(unit))


@pytest.mark.parametrize(
    ("name", "head"),
    [
        (
            "distinct addresses",
            b"From: f@a.test\nTo: "
            + b",".join(b"u%d@e.test" % i for i in range(FIVE_MB // 10))
            + b"\n",
        ),
        ("one address repeated", b"From: f@a.test\nTo: " + fill(b"a@b.c,") + b"x@y.z\n"),
        ("quoted addresses", b"From: f@a.test\nTo: " + fill(b'"a"@b.c,') + b"x@y.z\n"),
        ("nested comment openers", b"From: f@a.test\nTo: " + fill(b"(") + b"\n"),
        (
            "deeply nested comments",
            b"From: f@a.test\nTo: " + b"(" * 100_000 + b")" * 100_000 + b"a@b\n",
        ),
        ("flat comments", b"From: f@a.test\nTo: " + fill(b"()") + b"x@y.z\n"),
        (
            "comments nested 16 deep",
            b"From: f@a.test\nTo: " + fill(b"(" * 16 + b")" * 16) + b"x@y.z\n",
        ),
        ("empty quoted strings", b"From: f@a.test\nTo: " + fill(b'""') + b"<x@y.z>\n"),
        ("unterminated quote", b'From: f@a.test\nTo: "' + fill(b"a") + b"\n"),
        ("quoted pairs", b'From: f@a.test\nTo: "' + fill(b"\\a") + b'"@x.y\n'),
        ("long display name", b"From: f@a.test\nTo: " + fill(b"a ") + b"<x@y.z>\n"),
        ("commas", b"From: f@a.test\nTo: " + fill(b",") + b"x@y.z\n"),
        ("empty groups", b"From: f@a.test\nTo: " + fill(b"g:;,") + b"x@y.z\n"),
        ("angle brackets", b"From: f@a.test\nTo: " + fill(b"<") + b"\n"),
        ("long local part", b"From: f@a.test\nTo: " + fill(b"a") + b"@b\n"),
        ("source route", b"From: f@a.test\nTo: <" + fill(b"@r,") + b"@r:a@b>\n"),
        ("many To fields", b"From: f@a.test\n" + fill(b"To: a@b\n")),
        ("many empty To fields", b"From: f@a.test\n" + fill(b"To:\n") + b"To: a@b\n"),
        ("many Received fields", b"From: f@a.test\nTo: a@b\n" + fill(b"Received: x\n")),
        ("many bad Date fields", b"From: f@a.test\nTo: a@b\n" + fill(b"Date: x\n")),
        ("many empty Message-IDs", b"From: f@a.test\nTo: a@b\n" + fill(b"Message-ID:\n")),
        ("many small fields", b"From: f@a.test\nTo: a@b\n" + fill(b"X:y\n")),
        ("huge Subject", b"From: f@a.test\nTo: a@b\nSubject: " + fill(b"=?utf-8?q?a?= ") + b"\n"),
        ("huge From", b"To: a@b\nFrom: " + fill(b"a@b,") + b"c@d\n"),
        ("mixed ending at the end", b"From: f@a.test\nTo: a@b\n" + fill(b"X: y\n") + b"Z:\r\n"),
    ],
)
def test_hostile_5mb_headers_are_bounded(name: str, head: bytes) -> None:
    # T32: hostile 5 MB headers (PickupDirectoryMaxHeaderSize raised to 8 MB) parse or
    # fail with PickupError within the time budget (~1 s measured; 2 s asserted), with no
    # RecursionError or other exception.
    elapsed, _ = timed(head)
    assert elapsed < 2.0, f"{name}: {elapsed:.2f}s"


def test_deep_comment_nesting_is_refused_cleanly() -> None:
    # Nesting beyond the supported depth is badmail naming the problem, not a crash.
    err = bad(b"From: f@a.test\nTo: " + b"(" * 1000 + b")" * 1000 + b"a@b.test\n")
    assert "nested" in err.reason


def test_huge_address_list_is_an_ndr() -> None:
    # Far more addresses than any allowed limit stops parsing early with the
    # too-many-recipients NDR to the valid sender.
    err = bad(b"From: f@a.test\nTo: " + fill(b"a@b.c,") + b"x@y.z\n", max_recipients=10_000)
    assert err.ndr is not None and err.ndr.startswith("550 5.5.3 too many recipients")
    assert err.sender == "f@a.test"


def _cpython_email_corpus() -> list[pathlib.Path]:
    try:
        import test as cpython_tests  # the CPython test package (not always installed)
    except ImportError:
        return []
    data = pathlib.Path(cpython_tests.__path__[0]) / "test_email" / "data"
    return sorted(data.glob("msg_*.txt"))


def test_cpython_odd_message_corpus() -> None:
    # T34: every file of CPython's odd-message corpus (with From/To added when missing)
    # is either accepted or refused with a one-line reason; nothing crashes.
    # The corpus ships with full CPython builds (pyenv's, Debian's libpython3.11-testsuite);
    # .ci/run makes sure it is there.
    assert _cpython_email_corpus(), "CPython's test_email data is not installed"
    accepted = refused = 0
    for path in _cpython_email_corpus():
        data = path.read_bytes()
        top = data.split(b"\n\n", 1)[0].lower()
        if not re.search(rb"(?m)^from:", top):
            data = b"From: f@a.test\n" + data
        if not re.search(rb"(?m)^to:", top):
            data = b"To: t@b.test\n" + data
        head, offset = read_header_block(io.BytesIO(data), 65536)
        try:
            parse(head, 1000, offset)
            accepted += 1
        except PickupError as err:
            assert not err.reason.startswith("internal error"), (path.name, err.reason)
            refused += 1
    assert accepted + refused == len(_cpython_email_corpus())
    assert accepted > refused


def test_invalid_arguments_are_programming_errors() -> None:
    # A malformed `received` or a failing make_message_id is a caller bug (ValueError),
    # never disguised as badmail.
    with pytest.raises(ValueError):
        parse_pickup(
            b"From: f@a.test\nTo: t@b.test\n",
            received=b"Received: x\n",
            max_recipients=1,
            now=NOW,
            make_message_id=lambda: GENERATED_ID,
        )
    with pytest.raises(ValueError):
        parse_pickup(
            b"From: f@a.test\nTo: t@b.test\n",
            received=RECEIVED,
            max_recipients=1,
            now=NOW,
            make_message_id=lambda: "bad id",
        )
