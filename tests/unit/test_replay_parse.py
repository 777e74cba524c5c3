"""Unit tests for mailgate.receive.replay_parse: the Replay file envelope and header rules.

Reference: exchange-transport.md §2.5 (requirements and X-headers), §2.6 (header
modifications), §2.7 (NDR versus badmail); PRODUCT §4.5 (trust), §4.6 (a Drop file moved into
Replay is accepted as is); reliability.md T41 (Replay trust and malformed files).
"""

from __future__ import annotations

import datetime
import io
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.core.address import xtext
from mailgate.deliver.drop import envelope_header
from mailgate.receive.pickup_parse import PickupError, read_header_block
from mailgate.receive.replay_parse import (
    MAX_FIELD_BYTES,
    MAX_PROPS_BYTES,
    ReplayEnvelope,
    ReplayError,
    ReplayReceiver,
    parse_replay,
    rewrite_replay_header,
)
from mailgate.store import ClaimedDelivery, ClaimedRecipient

NOW = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
RECEIVED = (b"Received: from mbx01 by Replay with mailgate id 0.1;"
            b" Tue, 2 Jan 2024 03:04:05 +0000\r\n")
GENERATED_ID = "<0f8fad5b-d9cb-469f-a165-70867728950e@contoso.test>"

# Reference §2.5, "Minimal valid example (joined from the doc's two code blocks)".
DOC_EXAMPLE = (
    b"X-Receiver: <mary@contoso.com> NOTIFY=NEVER ORcpt=mary@contoso.com\r\n"
    b"X-Sender: <bob@fabrikam.com> BODY=7bit ENVID=12345AB auth=<someAuth>\r\n"
    b"Subject: Optional message subject\r\n"
)
ENVELOPE = b"X-Sender: <bob@fabrikam.test>\r\nX-Receiver: <mary@contoso.test>\r\n"


def head(*lines: str, ending: str = "\r\n") -> bytes:
    return "".join(line + ending for line in lines).encode("utf-8")


def bad(data: bytes) -> ReplayError:
    """Parse a header that must be refused; return the error (always a one-line reason)."""
    with pytest.raises(ReplayError) as info:
        parse_replay(data)
    assert "\r" not in info.value.reason and "\n" not in info.value.reason
    return info.value


def rewrite(data: bytes, *, trusted: bool = False) -> bytes:
    return rewrite_replay_header(data, parse_replay(data), received=RECEIVED, trusted=trusted,
                                 now=NOW, make_message_id=lambda: GENERATED_ID)


def claimed(sender: str, recipients: list[ClaimedRecipient], *, ret: str | None = None,
            envid: str | None = None) -> ClaimedDelivery:
    return ClaimedDelivery(
        id=1, message_id=1, queue_id=1, token=uuid.uuid4().hex, created=0.0, retry_count=0,
        recovering=False, from_address=sender, internet_message_id="<1@contoso.test>",
        subject="s", size=10, date_received=0.0, ret=ret, envid=envid, is_dsn=False,
        recipients=recipients)


def rcpt(address: str, notify: str | None = None, orcpt: str | None = None) -> ClaimedRecipient:
    return ClaimedRecipient(1, address, None, orcpt, notify, None)


# ---------------------------------------------------------------------------------------
# Reference §2.5: requirements and the documented X-headers
# ---------------------------------------------------------------------------------------


def test_documented_minimal_example_parses() -> None:
    """Exchange's own example (X-Receiver first, lower-case BODY value, `auth=`, an ORcpt
    without address type) is accepted; the message starts at Subject."""
    env = parse_replay(DOC_EXAMPLE)
    assert env == ReplayEnvelope(
        sender="bob@fabrikam.com",
        receivers=[ReplayReceiver("mary@contoso.com", "NEVER", "rfc822;mary@contoso.com")],
        header_offset=DOC_EXAMPLE.index(b"Subject:"), body="7BIT", envid="12345AB",
        auth="<someAuth>")


def test_typical_x_sender_parameters() -> None:
    """X-Sender takes BODY, RET, ENVID and AUTH (§2.5 "Typical parameters")."""
    env = parse_replay(head("X-Sender: <bob@fabrikam.test> BODY=8BITMIME RET=HDRS "
                            "ENVID=12345ABCD AUTH=<>", "X-Receiver: <a@contoso.test>"))
    assert (env.body, env.ret, env.envid, env.auth) == ("8BITMIME", "HDRS", "12345ABCD", "<>")


@pytest.mark.parametrize("body", ["7BIT", "8bitmime", "BinaryMime"])
@pytest.mark.parametrize("ret", ["FULL", "hdrs"])
def test_body_and_ret_values_are_case_insensitive(body: str, ret: str) -> None:
    """BODY is 7BIT/8BITMIME/BINARYMIME and RET is FULL/HDRS, in any case, upper-cased."""
    env = parse_replay(head(f"X-Sender: <b@f.test> BODY={body} RET={ret}",
                            "X-Receiver: <a@c.test>"))
    assert (env.body, env.ret) == (body.upper(), ret.upper())


def test_without_parameters_the_options_are_none() -> None:
    """A bare X-Sender and X-Receiver give an envelope without BODY/RET/ENVID/NOTIFY/ORCPT."""
    env = parse_replay(ENVELOPE)
    assert env == ReplayEnvelope("bob@fabrikam.test", [ReplayReceiver("mary@contoso.test")],
                                 len(ENVELOPE))


def test_null_sender() -> None:
    """`X-Sender: <>` is the null reverse-path, returned as ''."""
    assert parse_replay(head("X-Sender: <>", "X-Receiver: <a@c.test>")).sender == ""


def test_addresses_without_angle_brackets() -> None:
    """Addresses may be written without <> (the address then ends at the first blank)."""
    env = parse_replay(head("X-Sender: bob@f.test RET=FULL", "X-Receiver: a@c.test NOTIFY=DELAY"))
    assert env.sender == "bob@f.test" and env.ret == "FULL"
    assert env.receivers == [ReplayReceiver("a@c.test", "DELAY")]


def test_one_receiver_per_field_repeated_in_order() -> None:
    """Each X-Receiver holds one address; the field repeats for more (order kept)."""
    env = parse_replay(head("X-Sender: <b@f.test>",
                            *(f"X-Receiver: <u{i}@c.test>" for i in range(5))))
    assert [r.address for r in env.receivers] == [f"u{i}@c.test" for i in range(5)]


def test_two_addresses_in_one_receiver_field_are_refused() -> None:
    """§2.5: "Each field holds one address"; a second address is not silently dropped."""
    assert "is not a valid" in bad(head("X-Sender: <b@f.test>",
                                        "X-Receiver: <a@c.test>, <d@c.test>")).reason
    assert bad(head("X-Sender: <b@f.test>", "X-Receiver: a@c.test d@c.test")).reason == (
        'X-Receiver at line 2: malformed parameter "d@c.test"')


def test_duplicate_receivers_are_delivered_once() -> None:
    """The same recipient twice (any case) is kept once, with the first field's parameters."""
    env = parse_replay(head("X-Sender: <b@f.test>", "X-Receiver: <Mary@Contoso.test> NOTIFY=NEVER",
                            "X-Receiver: <mary@contoso.TEST> NOTIFY=FAILURE",
                            "X-Receiver: <FAX:+1555>", "X-Receiver: <fax:+1555>"))
    assert env.receivers == [ReplayReceiver("Mary@Contoso.test", "NEVER"),
                             ReplayReceiver("FAX:+1555")]


def test_order_between_sender_and_receivers_is_free() -> None:
    """The docs state no order: X-Sender may come before, between or after the X-Receivers."""
    env = parse_replay(head("X-Receiver: <a@c.test>", "X-Sender: <b@f.test>",
                            "X-Receiver: <d@c.test>"))
    assert env.sender == "b@f.test"
    assert [r.address for r in env.receivers] == ["a@c.test", "d@c.test"]


def test_non_smtp_receivers_are_accepted() -> None:
    """PRODUCT §4.5: X-Receiver takes TYPE:value addresses; the type is upper-cased, the value
    kept verbatim, and a bracketed value may contain blanks (X.400)."""
    env = parse_replay(head("X-Sender: <b@f.test>", "X-Receiver: <FAX:+15551234> NOTIFY=NEVER",
                            "X-Receiver: <x400:c=US;a= ;p=Contoso;o=Exchange;s=Smith>"
                            " NOTIFY=FAILURE",
                            "X-Receiver: SMS:+4470000", "X-Receiver: <SMTP:a@c.test>"))
    assert env.receivers == [
        ReplayReceiver("FAX:+15551234", "NEVER"),
        ReplayReceiver("X400:c=US;a= ;p=Contoso;o=Exchange;s=Smith", "FAILURE"),
        ReplayReceiver("SMS:+4470000"), ReplayReceiver("a@c.test")]


def test_smtputf8_and_quoted_addresses() -> None:
    """UTF-8 addresses and quoted local parts (even with '> ' inside) are read whole."""
    env = parse_replay(head('X-Sender: <"odd> name"@f.test>', "X-Receiver: <jörg@bücher.test>"))
    assert env.sender == '"odd> name"@f.test'
    assert env.receivers == [ReplayReceiver("jörg@bücher.test")]


def test_notify_accepts_success_and_lists() -> None:
    """NOTIFY: NEVER, or a comma list of SUCCESS/FAILURE/DELAY (SUCCESS too, although the
    Exchange page omits it); upper-cased, repeats dropped, order kept."""
    env = parse_replay(head("X-Sender: <b@f.test>", "X-Receiver: <a@c.test> notify=failure,Success",
                            "X-Receiver: <d@c.test> NOTIFY=DELAY,FAILURE,DELAY"))
    assert [r.notify for r in env.receivers] == ["FAILURE,SUCCESS", "DELAY,FAILURE"]


@pytest.mark.parametrize("value,problem", [
    ("NEVER,FAILURE", "NOTIFY=NEVER cannot be combined with other values"),
    ("FAILURE,NEVER", "NOTIFY=NEVER cannot be combined with other values"),
    ("SOMETIMES", 'NOTIFY value "SOMETIMES" is not one of NEVER, SUCCESS, FAILURE, DELAY'),
    ("FAILURE,,DELAY", 'NOTIFY value "" is not one of'),
    ("\u017fuccess", "malformed parameter"),  # "ſuccess".upper() == "SUCCESS": still refused
])
def test_bad_notify_is_refused(value: str, problem: str) -> None:
    """NEVER is exclusive; unknown or empty NOTIFY values are refused, naming the field."""
    err = bad(head("X-Sender: <b@f.test>", f"X-Receiver: <a@c.test> NOTIFY={value}"))
    assert err.reason.startswith(f"X-Receiver at line 2: {problem}")
    assert err.ndr is None


def test_orcpt_is_kept_as_given() -> None:
    """ORCPT is addr-type;xtext and kept encoded, exactly as given."""
    env = parse_replay(head("X-Sender: <b@f.test>",
                            "X-Receiver: <a@c.test> ORCPT=rfc822;Old+2BTag@c.test NOTIFY=NEVER",
                            "X-Receiver: <FAX:+1> ORCPT=x-fax;+2B1"))
    assert [r.orcpt for r in env.receivers] == ["rfc822;Old+2BTag@c.test", "x-fax;+2B1"]


@pytest.mark.parametrize("value,problem", [
    ("rfc822;a+ZZ@c.test", "is not valid xtext"),
    ("rfc822;a=b@c.test", 'malformed parameter "ORCPT=rfc822;a=b@c.test"'),
    ("rfc822;jörg@c.test", "malformed parameter"),
    ("rfc822;", "is not valid xtext"),
    ("rfc822;a+0D+0ABcc:x@y.test", "ORCPT decodes to the control character U+000D"),
    ("rfc(822);a@c.test", "ORCPT address type"),
])
def test_bad_orcpt_is_refused(value: str, problem: str) -> None:
    """ORCPT must be an atom, ';', then xtext (printable ASCII, '=' encoded) that does not
    decode to control characters."""
    err = bad(head("X-Sender: <b@f.test>", f"X-Receiver: <a@c.test> ORCPT={value}"))
    assert err.reason.startswith("X-Receiver at line 2: ") and problem in err.reason


def test_envid_is_decoded_from_xtext() -> None:
    """ENVID is xtext (RFC 3461): +XX is decoded, hex digits in either case."""
    env = parse_replay(head("X-Sender: <b@f.test> ENVID=a+2Bb+3dc+20d", "X-Receiver: <a@c.test>"))
    assert env.envid == "a+b=c d"


@pytest.mark.parametrize("value,problem", [
    ("a+2", "ENVID \"a+2\" is not valid xtext"),
    ("a+0D+0AX-Receiver:+20evil", "ENVID decodes to the control character U+000D"),
    ("a+FF", "ENVID does not decode to UTF-8 text"),
    ("a+E2+80+A8b", "ENVID decodes to the control character U+2028"),
])
def test_bad_envid_is_refused(value: str, problem: str) -> None:
    """Bad xtext, a decoded control character (it is written into DSN fields), or bytes that
    are not UTF-8 are refused."""
    err = bad(head(f"X-Sender: <b@f.test> ENVID={value}", "X-Receiver: <a@c.test>"))
    assert err.reason.startswith(f"X-Sender at line 1: {problem}")


def test_auth_is_checked_as_xtext() -> None:
    """AUTH= must be xtext (RFC 4954); '=' would have to be encoded."""
    assert "AUTH" in bad(head("X-Sender: <b@f.test> AUTH=a=b", "X-Receiver: <a@c.test>")).reason


def test_optional_x_headers_are_read() -> None:
    """X-CreatedBy, X-HeloDomain, X-Source, X-SourceIPAddress and X-ExtendedMessageProps are
    optional envelope fields, kept as given (the IP address normalised)."""
    env = parse_replay(head(
        "X-Sender: <b@f.test>", "X-Receiver: <a@c.test>", "X-CreatedBy: MSExchange15",
        "X-HeloDomain: mail.fabrikam.test", "X-Source: Smtp Receive Connector",
        "X-SourceIPAddress: 2001:DB8::1", "X-ExtendedMessageProps: BQAVABYAAgAAAAUAFAAR",
        "Subject: s"))
    assert (env.created_by, env.helo_domain, env.source, env.source_ip, env.extended_props) == (
        "MSExchange15", "mail.fabrikam.test", "Smtp Receive Connector", "2001:db8::1",
        "BQAVABYAAgAAAAUAFAAR")
    assert env.message_source_name == "Smtp Receive Connector"
    assert env.effective_source_ip == "2001:db8::1"


def test_defaults_of_absent_optional_headers() -> None:
    """Absent: X-CreatedBy counts as 'Unspecified', X-Source (MessageSourceName) as 'Replay',
    X-SourceIPAddress as 0.0.0.0 (§2.5)."""
    env = parse_replay(ENVELOPE)
    assert (env.created_by, env.source, env.source_ip) == (None, None, None)
    assert (env.effective_created_by, env.message_source_name, env.effective_source_ip) == (
        "Unspecified", "Replay", "0.0.0.0")


def test_blank_created_by_is_refused_but_other_blank_fields_are_absent() -> None:
    """§2.5: X-CreatedBy "if present it must not be blank"; a blank X-Source or X-HeloDomain
    is treated as absent."""
    err = bad(head("X-Sender: <b@f.test>", "X-Receiver: <a@c.test>", "X-CreatedBy:  "))
    assert err.reason == "X-CreatedBy at line 3 is blank (it may be absent, not empty)"
    env = parse_replay(head("X-Sender: <b@f.test>", "X-Receiver: <a@c.test>", "X-Source:",
                            "X-HeloDomain: "))
    assert env.message_source_name == "Replay" and env.helo_domain is None


def test_bad_source_ip_is_refused() -> None:
    """X-SourceIPAddress must be an IPv4 or IPv6 address (it goes into tracking)."""
    err = bad(head("X-Sender: <b@f.test>", "X-Receiver: <a@c.test>",
                   "X-SourceIPAddress: 10.0.0.300"))
    assert err.reason == 'X-SourceIPAddress at line 3: "10.0.0.300" is not an IPv4 or IPv6 address'


def test_names_and_parameters_are_case_insensitive() -> None:
    """Field names and parameter names are matched in any case."""
    env = parse_replay(head("x-sender: <b@f.test> ret=full", "X-RECEIVER: <a@c.test> Notify=Never",
                            "x-createdby: x"))
    assert (env.ret, env.receivers[0].notify, env.created_by) == ("FULL", "NEVER", "x")


def test_from_and_to_are_ignored_for_the_envelope() -> None:
    """§2.5: X-Sender replaces From and X-Receiver replaces To for the envelope."""
    env = parse_replay(ENVELOPE + b"From: other@else.test\r\nTo: someone@else.test\r\n")
    assert env.sender == "bob@fabrikam.test"
    assert [r.address for r in env.receivers] == ["mary@contoso.test"]


def test_lf_and_crlf_give_the_same_envelope() -> None:
    """LF-only files are accepted; header_offset is a byte offset in the file either way."""
    crlf = ENVELOPE + b"Subject: s\r\n"
    lf = crlf.replace(b"\r\n", b"\n")
    a, b = parse_replay(crlf), parse_replay(lf)
    assert (a.sender, a.receivers) == (b.sender, b.receivers)
    assert crlf[a.header_offset:] == b"Subject: s\r\n" and lf[b.header_offset:] == b"Subject: s\n"


def test_folded_field_is_unfolded() -> None:
    """A field folded onto a continuation line is one value."""
    env = parse_replay(b"X-Sender: <b@f.test>\r\nX-Receiver: <a@c.test>\r\n\tNOTIFY=NEVER\r\n")
    assert env.receivers == [ReplayReceiver("a@c.test", "NEVER")]


def test_envelope_only_file_without_final_line_ending() -> None:
    """A header that is nothing but the envelope ends the envelope at len(head)."""
    data = b"X-Sender: <b@f.test>\nX-Receiver: <a@c.test>"
    assert parse_replay(data).header_offset == len(data)


def test_missing_blank_line_before_the_body_is_refused() -> None:
    """§2.5 requires a blank line between header and body: without it, the body lines are read
    as header lines and refused."""
    data = ENVELOPE + b"Subject: s\r\nThis is the body.\r\n"
    h, _ = read_header_block(io.BytesIO(data), 65536)
    assert bad(h).reason.startswith("header line 4 is not a header field")


# ---------------------------------------------------------------------------------------
# Where the envelope ends: "All X-headers must come before all regular header fields"
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("late", ["X-Receiver: <x@c.test>", "X-Sender: <x@f.test>",
                                  "X-EndOfInjectedXHeaders: 10"])
def test_envelope_field_after_a_regular_field_is_refused(late: str) -> None:
    """Without X-EndOfInjectedXHeaders, an X-Sender, X-Receiver or the marker after any other
    header field is refused (T41), naming both lines."""
    name = late.split(":")[0]
    err = bad(head("X-Sender: <b@f.test>", "X-Receiver: <a@c.test>", "Subject: s", late))
    assert err.reason == (f"{name} at line 4 comes after the header field Subject at line 3: "
                          "the Replay X-headers must come before all other header fields")
    assert err.ndr is None


def test_unknown_x_header_ends_the_envelope_without_marker() -> None:
    """Without the marker, the first field that is not a Replay X-header (X-Mailer too) starts
    the message; a Replay field after it is refused."""
    env = parse_replay(ENVELOPE + b"X-Mailer: m\r\nSubject: s\r\n")
    assert env.header_offset == len(ENVELOPE)
    err = bad(b"X-Sender: <b@f.test>\r\nX-Mailer: m\r\nX-Receiver: <a@c.test>\r\n")
    assert err.reason.startswith("X-Receiver at line 3 comes after the header field X-Mailer")


def test_marker_ends_the_envelope_and_later_x_sender_is_message_content() -> None:
    """With X-EndOfInjectedXHeaders the envelope ends just after it: a message's own X-Sender
    field (Roundcube writes one) is content, not envelope."""
    data = (ENVELOPE + b"X-EndOfInjectedXHeaders: 72\r\n"
            b"X-Sender: user@webmail.test\r\nSubject: s\r\n")
    env = parse_replay(data)
    assert env.sender == "bob@fabrikam.test" and env.injected_size == 72
    assert data[env.header_offset:].startswith(b"X-Sender: user@webmail.test\r\n")


def test_unknown_x_fields_before_the_marker_are_ignored() -> None:
    """Unknown X- fields inside the marked block belong to the injected envelope: they are
    listed in `ignored` and are not part of the message."""
    data = (b"X-Sender: <b@f.test>\r\nX-MessageSource: export\r\nX-Receiver: <a@c.test>\r\n"
            b"X-EndOfInjectedXHeaders: 0\r\nSubject: s\r\n")
    env = parse_replay(data)
    assert env.ignored == ["X-MessageSource"]
    assert data[env.header_offset:] == b"Subject: s\r\n"


def test_bad_marker_value_is_refused() -> None:
    """X-EndOfInjectedXHeaders is a size in bytes."""
    err = bad(ENVELOPE + b"X-EndOfInjectedXHeaders: lots\r\n")
    assert err.reason == 'X-EndOfInjectedXHeaders at line 3: "lots" is not a size in bytes'


# ---------------------------------------------------------------------------------------
# Malformed envelopes (badmail) and the error messages
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("data,reason", [
    (b"", "no X-Sender field: a Replay file must start with the X-Sender and X-Receiver fields"),
    (b"X-Receiver: <a@c.test>\r\nSubject: s\r\n",
     "no X-Sender field: a Replay file must start with the X-Sender and X-Receiver fields"),
    (b"X-Sender: <b@f.test>\r\nSubject: s\r\n",
     "no X-Receiver field: a Replay file needs at least one"),
    (b"X-Sender: <b@f.test>\r\nX-Receiver: <a@c.test>\r\nX-Sender: <c@f.test>\r\n",
     "X-Sender at line 3 repeats X-Sender at line 1; it may appear only once"),
    (ENVELOPE + b"X-Source: a\r\nX-Source: b\r\n",
     "X-Source at line 4 repeats X-Source at line 3; it may appear only once"),
    (b"X-Sender: <b@f.test> SIZE=10\r\nX-Receiver: <a@c.test>\r\n",
     'X-Sender at line 1: unknown parameter "SIZE" (accepted: BODY, RET, ENVID, AUTH)'),
    (b"X-Sender: <b@f.test>\r\nX-Receiver: <a@c.test> RET=FULL\r\n",
     'X-Receiver at line 2: unknown parameter "RET" (accepted: NOTIFY, ORCPT)'),
    (b"X-Sender: <b@f.test> RET=FULL ret=HDRS\r\nX-Receiver: <a@c.test>\r\n",
     "X-Sender at line 1: parameter RET is given twice"),
    (b"X-Sender: <b@f.test> RET=\r\nX-Receiver: <a@c.test>\r\n",
     "X-Sender at line 1: parameter RET has no value"),
    (b"X-Sender: <b@f.test> RET\r\nX-Receiver: <a@c.test>\r\n",
     "X-Sender at line 1: parameter RET has no value"),
    (b"X-Sender: <b@f.test> RET=NONE\r\nX-Receiver: <a@c.test>\r\n",
     'X-Sender at line 1: RET="NONE" is not one of FULL, HDRS'),
    (b"X-Sender: <b@f.test> BODY=8BIT\r\nX-Receiver: <a@c.test>\r\n",
     'X-Sender at line 1: BODY="8BIT" is not one of 7BIT, 8BITMIME, BINARYMIME'),
    (b"X-Sender: <b@f.test> -X=1\r\nX-Receiver: <a@c.test>\r\n",
     'X-Sender at line 1: malformed parameter "-X=1"'),
    (b"X-Sender:\r\nX-Receiver: <a@c.test>\r\n", "X-Sender at line 1 has no address"),
    (b"X-Sender: <b@f.test>\r\nX-Receiver:   \r\n", "X-Receiver at line 2 has no address"),
    (b"X-Sender: <b@f.test\r\nX-Receiver: <a@c.test>\r\n",
     "X-Sender at line 1: the address \"<b@f.test\" has no closing '>'"),
    (b"X-Sender: bob\r\nX-Receiver: <a@c.test>\r\n",
     "X-Sender at line 1: 'bob' is not a valid SMTP address: no '@'"),
    (b"X-Sender: <FAX:+1555>\r\nX-Receiver: <a@c.test>\r\n",
     "X-Sender at line 1: 'FAX:+1555' is not a valid SMTP address: no '@'"),
    (b"X-Sender: Bob <b@f.test>\r\nX-Receiver: <a@c.test>\r\n",
     "X-Sender at line 1: 'Bob' is not a valid SMTP address: no '@'"),
    (b"X-Sender: <@relay.test:b@f.test>\r\nX-Receiver: <a@c.test>\r\n",
     "X-Sender at line 1: '@relay.test:b@f.test' is not a valid SMTP address: source routes"
     " (@host,@host:user@domain) are not accepted"),
])
def test_malformed_envelope_is_badmail(data: bytes, reason: str) -> None:
    """Each malformed envelope raises ReplayError with a one-line reason naming the field and
    line, and no NDR (badmail, §2.7)."""
    err = bad(data)
    assert err.reason == reason
    assert (err.ndr, err.sender) == (None, None)


def test_replay_error_is_a_pickup_error() -> None:
    """ReplayError is handled wherever PickupError is (.bad file with reason, optional NDR)."""
    assert issubclass(ReplayError, PickupError)
    with pytest.raises(PickupError):
        parse_replay(b"Subject: no envelope\r\n")


# ---------------------------------------------------------------------------------------
# Reference §2.7: NDR versus badmail for invalid recipients
# ---------------------------------------------------------------------------------------


def test_invalid_receiver_with_valid_sender_is_an_ndr() -> None:
    """A well-formed file with a valid sender but an invalid recipient address gets an NDR
    (5.1.3) to that sender, listing every invalid recipient."""
    err = bad(head("X-Sender: <b@f.test>", "X-Receiver: <a@c.test>", "X-Receiver: <bad>",
                   "X-Receiver: <also bad@c.test>"))
    assert err.reason == ("X-Receiver at line 3: 'bad' is not a valid SMTP address: no '@' "
                          "(and 1 more invalid X-Receiver)")
    assert err.ndr == "550 5.1.3 invalid recipient address"
    assert err.sender == "b@f.test" and err.recipients == ["bad", "also bad@c.test"]


def test_invalid_receiver_with_null_sender_is_badmail() -> None:
    """§2.7: when no NDR is possible (the null sender), invalid recipients make badmail."""
    err = bad(head("X-Sender: <>", "X-Receiver: <bad>"))
    assert err.reason.endswith("; no NDR is possible to the null sender")
    assert err.ndr is None and err.sender is None


def test_format_errors_win_over_invalid_addresses() -> None:
    """A malformed parameter is a format error (badmail) even when the sender is valid."""
    err = bad(head("X-Sender: <b@f.test>", "X-Receiver: <bad>", "X-Receiver: <a@c.test> FOO=1"))
    assert err.ndr is None and "unknown parameter" in err.reason


# ---------------------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------------------


def test_bare_cr_cannot_inject_a_receiver() -> None:
    """`X-Receiver: <a@c.test>\\rX-Receiver: <evil>` is refused, not read as two fields."""
    err = bad(b"X-Sender: <b@f.test>\r\nX-Receiver: <a@c.test>\rX-Receiver: <evil@x.test>\r\n")
    assert err.reason == "bare CR inside header line 2 (header lines must not contain CR)"


def test_bare_lf_in_a_crlf_envelope_is_refused() -> None:
    """A lone LF inside a CRLF file would start a new field: refused as mixed line endings."""
    err = bad(b"X-Sender: <b@f.test>\r\nX-Receiver: <a@c.test>\nX-Receiver: <evil@x.test>\r\n")
    assert err.reason.startswith("mixed line endings in the header")


def test_nul_is_refused() -> None:
    """A NUL byte in an X-header value is refused."""
    assert bad(b"X-Sender: <b@f.test>\r\nX-Receiver: <a@c.test\x00>\r\n").reason == (
        "NUL byte in the header at line 2")


@pytest.mark.parametrize("char", ["\x1b", "\x7f", "\x85", "\u2028"])
def test_control_characters_in_values_are_refused(char: str) -> None:
    """Other control characters and Unicode line breaks are refused in every envelope value
    (they would reach log lines and DSN fields)."""
    err = bad(head("X-Sender: <b@f.test>", "X-Receiver: <a@c.test>", f"X-HeloDomain: a{char}b"))
    assert err.reason == f"X-HeloDomain at line 3: control character U+{ord(char):04X} in the value"


def test_invalid_utf8_is_refused() -> None:
    """Envelope values must be UTF-8."""
    err = bad(b"X-Sender: <b@f.test>\r\nX-Receiver: <\xff@c.test>\r\n")
    assert err.reason == "X-Receiver at line 2: the value is not valid UTF-8"


def test_folding_cannot_smuggle_a_second_receiver() -> None:
    """A continuation line is part of the same value: `X-Receiver:` inside it is refused."""
    err = bad(b"X-Sender: <b@f.test>\r\nX-Receiver: <a@c.test>\r\n X-Receiver: <evil@x.test>\r\n")
    assert err.reason == 'X-Receiver at line 2: malformed parameter "X-Receiver:"'


def test_overlong_fields_are_refused_before_parsing() -> None:
    """An envelope field over MAX_FIELD_BYTES is refused with the limit in the reason;
    X-ExtendedMessageProps may be longer (up to MAX_PROPS_BYTES)."""
    long_rcpt = "X-Receiver: <a@c.test> " + "NOTIFY=NEVER " * 1000
    err = bad(head("X-Sender: <b@f.test>", long_rcpt))
    assert err.reason.startswith("X-Receiver at line 2 is ")
    assert err.reason.endswith(f"bytes long, more than the limit of {MAX_FIELD_BYTES}")
    props = "A" * (MAX_FIELD_BYTES * 2)
    env = parse_replay(head("X-Sender: <b@f.test>", "X-Receiver: <a@c.test>",
                            f"X-ExtendedMessageProps: {props}"))
    assert env.extended_props == props
    err = bad(head("X-Sender: <b@f.test>", "X-Receiver: <a@c.test>",
                   "X-ExtendedMessageProps: " + "A" * MAX_PROPS_BYTES))
    assert err.reason.endswith(f"more than the limit of {MAX_PROPS_BYTES}")


def test_overlong_address_is_refused() -> None:
    """An address longer than Exchange's 571-character limit is refused (an invalid recipient,
    so an NDR to the valid sender); the reason quotes only the start of it."""
    err = bad(head("X-Sender: <b@f.test>", f"X-Receiver: <{'a' * 600}@c.test>"))
    assert err.reason.endswith("(607 characters) is not a valid SMTP address: longer than 571 "
                               "characters")
    assert len(err.reason) < 200 and err.ndr is not None


def test_ten_thousand_receivers() -> None:
    """10,000 X-Receiver fields parse (a recipient limit is the caller's decision)."""
    data = head("X-Sender: <b@f.test>", *(f"X-Receiver: <user{i}@c.test> NOTIFY=FAILURE"
                                          for i in range(10_000)), "Subject: s")
    env = parse_replay(data)
    assert len(env.receivers) == 10_000 and env.receivers[-1].address == "user9999@c.test"
    assert data[env.header_offset:] == b"Subject: s\r\n"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_an_envelope_or_a_one_line_replay_error(noise: bytes) -> None:
    """For any input after a valid start, parse_replay returns or raises ReplayError with a
    one-line reason; nothing else escapes."""
    for data in (noise, ENVELOPE + noise, b"X-Sender: <b@f.test> " + noise):
        try:
            env = parse_replay(data)
        except ReplayError as exc:
            assert "\n" not in exc.reason and "\r" not in exc.reason
        else:
            assert env.receivers and 0 < env.header_offset <= len(data)


# ---------------------------------------------------------------------------------------
# Round trip with the Drop directory writer (PRODUCT §4.6)
# ---------------------------------------------------------------------------------------


def test_drop_envelope_round_trips() -> None:
    """envelope_header() of a delivery with RET, an ENVID needing xtext, NOTIFY, ORCPT and
    non-SMTP recipients parses back to the same envelope; the marker's size is the block's."""
    d = claimed("a@contoso.test", [
        rcpt("julia@contoso.test", "SUCCESS,FAILURE", "rfc822;" + xtext("jülia+x@contoso.test")),
        rcpt("FAX:+15551234"), rcpt("SMS:+4470000", "NEVER")], ret="HDRS", envid="a+b=c d\u00e9")
    block = envelope_header(d)
    env = parse_replay(block)
    assert env == ReplayEnvelope(
        sender="a@contoso.test",
        receivers=[ReplayReceiver("julia@contoso.test", "SUCCESS,FAILURE",
                                  "rfc822;j+C3+BClia+2Bx@contoso.test"),
                   ReplayReceiver("FAX:+15551234"), ReplayReceiver("SMS:+4470000", "NEVER")],
        header_offset=len(block), ret="HDRS", envid="a+b=c d\u00e9",
        injected_size=len(block) - len(block.splitlines(keepends=True)[-1]))


def test_drop_file_moved_into_replay_is_accepted_as_is() -> None:
    """A whole Drop file (envelope, our Received line, the stored message) read with
    read_header_block parses, and the rewritten header is the message's without the envelope."""
    d = claimed("", [rcpt("FAX:+15551234")])
    message = (b"Received: from smtp by mbx01; Tue, 2 Jan 2024 03:04:05 +0000\r\n"
               b"Message-ID: <1@contoso.test>\r\nDate: Tue, 2 Jan 2024 03:04:05 +0000\r\n"
               b"X-Sender: user@webmail.test\r\nSubject: fax\r\n\r\nbody\r\n")
    data = envelope_header(d) + message
    h, body_offset = read_header_block(io.BytesIO(data), 65536)
    env = parse_replay(h)
    assert env.sender == "" and env.receivers == [ReplayReceiver("FAX:+15551234")]
    assert rewrite(h) == RECEIVED + message[:message.index(b"\r\n\r\n") + 4]
    assert data[body_offset:] == b"body\r\n"


SMTP_ADDRESSES = ["a@contoso.test", "Bob.Smith@Fabrikam.test", '"two words"@c.test',
                  "jörg@bücher.test", "x+tag@[192.0.2.1]"]
TYPED_ADDRESSES = ["FAX:+15551234", "X400:c=US;a= ;p=Contoso;s=Smith", "EX:/o=Org/cn=u"]
NOTIFY = st.one_of(st.none(), st.just("NEVER"),
                   st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY"]), min_size=1,
                            max_size=3, unique=True).map(",".join))


@st.composite
def recipients(draw: st.DrawFn) -> list[ClaimedRecipient]:
    addresses = draw(st.lists(st.sampled_from(SMTP_ADDRESSES + TYPED_ADDRESSES), min_size=1,
                              unique=True))
    out = []
    for a in addresses:
        orcpt = draw(st.sampled_from([None, "rfc822;" + xtext(a)])) if "@" in a else None
        out.append(rcpt(a, draw(NOTIFY), orcpt))
    return out


@settings(max_examples=200, deadline=None)
@given(sender=st.sampled_from(["", *SMTP_ADDRESSES]), rcpts=recipients(),
       ret=st.sampled_from([None, "FULL", "HDRS"]),
       envid=st.one_of(st.none(), st.text(
           st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40)))
def test_any_drop_envelope_round_trips(sender: str, rcpts: list[ClaimedRecipient],
                                       ret: str | None, envid: str | None) -> None:
    """Whatever the Drop writer writes for valid envelopes parses back to the same envelope."""
    block = envelope_header(claimed(sender, rcpts, ret=ret, envid=envid))
    env = parse_replay(block)
    assert (env.sender, env.ret, env.envid) == (sender, ret, envid)
    assert [(r.address, r.notify, r.orcpt) for r in env.receivers] == [
        (r.address, r.notify, r.orcpt) for r in rcpts]
    assert env.header_offset == len(block)


# ---------------------------------------------------------------------------------------
# Reference §2.6: header modifications
# ---------------------------------------------------------------------------------------

MESSAGE = (b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
           b"Resent-From: r@f.test\r\n"
           b"From: bob@fabrikam.test\r\nTo: mary@contoso.test\r\nBcc: hidden@contoso.test,\r\n"
           b" other@contoso.test\r\n"
           b"X-MS-Exchange-Organization-SCL: -1\r\nX-MS-Exchange-Forest-Rules: 1\r\n"
           b"Message-ID: <m@f.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: s\r\n")


def test_rewrite_strips_envelope_and_bcc_and_keeps_routing_headers() -> None:
    """The envelope block and Bcc (with its continuation) are removed; Received and Resent-*
    are kept (unlike Pickup); our Received comes first; the header ends with the empty line."""
    out = rewrite(ENVELOPE + MESSAGE)
    assert out.startswith(RECEIVED + b"Received: from a by b;")
    assert b"Resent-From: r@f.test\r\n" in out
    assert b"X-Sender" not in out and b"X-Receiver" not in out
    assert b"Bcc" not in out and b"other@contoso.test" not in out
    assert out.endswith(b"Subject: s\r\n\r\n")


def test_rewrite_removes_org_and_forest_headers_unless_trusted() -> None:
    """Organization and forest X-headers are removed unless the directory is trusted; an
    `X-CreatedBy: MSExchange15` line grants no trust (PRODUCT §4.5)."""
    data = ENVELOPE + b"X-CreatedBy: MSExchange15\r\n" + MESSAGE
    untrusted = rewrite(data)
    assert b"X-MS-Exchange-Organization" not in untrusted
    assert b"X-MS-Exchange-Forest" not in untrusted
    trusted = rewrite(data, trusted=True)
    assert b"X-MS-Exchange-Organization-SCL: -1\r\nX-MS-Exchange-Forest-Rules: 1\r\n" in trusted
    assert b"X-CreatedBy" not in trusted


def test_rewrite_adds_message_id_and_date_when_missing() -> None:
    """Message-ID (missing or empty) and Date (missing or malformed) are repaired as for
    Pickup."""
    out = rewrite(ENVELOPE + b"Message-ID:  \r\nDate: yesterday\r\nSubject: s\r\n")
    assert out == (RECEIVED + b"Subject: s\r\nMessage-ID: " + GENERATED_ID.encode()
                   + b"\r\nDate: Tue, 02 Jan 2024 03:04:05 +0000\r\n\r\n")


def test_rewrite_keeps_existing_message_id_and_first_good_date() -> None:
    """A present Message-ID and the first valid Date stay where they are; later Dates go."""
    out = rewrite(ENVELOPE + b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <m@f.test>\r\n"
                  b"Date: Sun, 31 Dec 2023 00:00:00 +0000\r\n")
    assert out == (RECEIVED + b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                   b"Message-ID: <m@f.test>\r\n\r\n")


def test_rewrite_of_an_lf_file_is_crlf() -> None:
    """An LF file's kept fields come out with CRLF line endings."""
    data = (ENVELOPE + b"Subject: s\r\nMessage-ID: <m@f.test>\r\n"
            b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n").replace(b"\r\n", b"\n")
    assert rewrite(data) == RECEIVED + (b"Subject: s\r\nMessage-ID: <m@f.test>\r\n"
                                        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n")


def test_rewrite_refuses_a_bad_received_argument() -> None:
    """`received` must be one CRLF-terminated Received field: a caller bug is a ValueError."""
    with pytest.raises(ValueError):
        rewrite_replay_header(ENVELOPE, parse_replay(ENVELOPE), received=b"Received: x\n",
                              trusted=False, now=NOW, make_message_id=lambda: GENERATED_ID)
