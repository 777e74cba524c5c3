"""Tests for mailgate.core.address: SMTP and typed addresses, IMCEA encapsulation."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.core.address import (
    MAX_LOCAL_LENGTH,
    REFUSED_IMCEA_TYPES,
    AddressError,
    RecipientAddress,
    SmtpAddress,
    imcea_decode,
    imcea_encode,
    parse_recipient_address,
    parse_smtp_address,
)

HOSTILE = ["\r", "\n", "\x00", "\r\n", "\t", "\x7f", "\x85", "\u2028", "\u202e", "\ufeff"]


# --------------------------------------------------------------------------- SMTP: accepted


@pytest.mark.parametrize(
    ("text", "local", "domain"),
    [
        ("alice@contoso.test", "alice", "contoso.test"),
        ("<alice@contoso.test>", "alice", "contoso.test"),
        ("  <alice@contoso.test>\t ".replace("\t", " "), "alice", "contoso.test"),
        ("Alice.Smith@Contoso.TEST", "Alice.Smith", "Contoso.TEST"),
        ("a+tag@sub.contoso.test", "a+tag", "sub.contoso.test"),
        ("!#$%&'*+-/=?^_`{|}~@x.test", "!#$%&'*+-/=?^_`{|}~", "x.test"),
        ('"john doe"@contoso.test', '"john doe"', "contoso.test"),
        ('"a@b"@contoso.test', '"a@b"', "contoso.test"),
        ('"a\\"b\\\\c"@contoso.test', '"a\\"b\\\\c"', "contoso.test"),
        ("user@[192.0.2.1]", "user", "[192.0.2.1]"),
        ("user@[IPv6:2001:db8::1]", "user", "[IPv6:2001:db8::1]"),
        ("user@[ipv6:::ffff:192.0.2.1]", "user", "[ipv6:::ffff:192.0.2.1]"),
        ("user@_dmarc.contoso.test", "user", "_dmarc.contoso.test"),
        ("user@localhost", "user", "localhost"),
        ("user@123.test", "user", "123.test"),
        ("jörg@bücher.example", "jörg", "bücher.example"),
        ("用户@例子.测试", "用户", "例子.测试"),
        ("IMCEAFAX-+2B15551234@contoso.test", "IMCEAFAX-+2B15551234", "contoso.test"),
    ],
)
def test_parse_smtp_address_accepts(text: str, local: str, domain: str) -> None:
    """Valid RFC 5321/6531 mailboxes parse, keeping local part and domain as written."""
    address = parse_smtp_address(text)
    assert address == SmtpAddress(local, domain)
    assert str(address) == f"{local}@{domain}"


def test_smtp_key_is_case_insensitive() -> None:
    """The lookup key casefolds the local part and lower-cases the domain."""
    a = parse_smtp_address("Alice.Straße@Contoso.TEST")
    b = parse_smtp_address("alice.strasse@contoso.test")
    assert a.key == "alice.strasse@contoso.test"
    assert a.key == b.key
    assert a != b  # the objects still keep what was written


def test_local_part_of_315_characters_is_accepted() -> None:
    """Exchange's 315-character local-part limit is inclusive."""
    address = parse_smtp_address("a" * MAX_LOCAL_LENGTH + "@contoso.test")
    assert len(address.local) == 315


def test_label_of_63_characters_and_domain_of_255_are_accepted() -> None:
    """63-character labels and a 255-character domain are at the limit, not over it."""
    domain = ".".join(["a" * 63] * 3 + ["b" * 63])  # 4*63 + 3 = 255
    assert len(domain) == 255
    assert parse_smtp_address(f"x@{domain}").domain == domain


# --------------------------------------------------------------------------- SMTP: refused


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("<>", "empty"),
        ("alice", "no '@'"),
        ("a@@b", "must be quoted"),
        ("a@b@c.test", "must be quoted"),
        ("@contoso.test", "source route"),
        ("@a,@b:user@d.test", "source route"),
        ("<@a:user@d.test>", "source route"),
        (".alice@contoso.test", "'.'"),
        ("alice.@contoso.test", "'.'"),
        ("al..ice@contoso.test", "'.'"),
        ("al ice@contoso.test", "must be quoted"),
        ("al(ice@contoso.test", "must be quoted"),
        ('"unterminated@contoso.test', "quoted"),
        ('"a"b@contoso.test', "quoted"),
        ('""@contoso.test', "empty"),
        ("alice@", "domain is empty"),
        ("alice@.contoso.test", "empty label"),
        ("alice@contoso.test.", "empty label"),
        ("alice@contoso..test", "empty label"),
        ("alice@-contoso.test", "'-'"),
        ("alice@contoso-.test", "'-'"),
        ("alice@con toso.test", "letters, digits"),
        ("alice@" + "a" * 64 + ".test", "63"),
        ("alice@" + ".".join(["a" * 63] * 4) + ".b", "255"),
        ("a" * 316 + "@contoso.test", "315"),
        ("alice@[1.2.3]", "address literal"),
        ("alice@[256.1.1.1]", "address literal"),
        ("alice@[IPv6:zz::1]", "address literal"),
        ("alice@[IPv6:fe80::1%eth0]", "scope id"),
        ("alice@[192.0.2.1", "']'"),
        ("alice@[tag:something]", "address literal"),
        ("<alice@contoso.test", "angle brackets"),
        ("alice@contoso.test>", "angle brackets"),
        ("alice@b\uff20cher.example", "U+FF20"),  # full-width @
        ("alice@例子\u3002测试", "U+3002"),  # ideographic full stop
        ("x" * 5000 + "@contoso.test", "571"),
    ],
)
def test_parse_smtp_address_refuses(text: str, reason: str) -> None:
    """Malformed addresses raise AddressError with a one-line reason."""
    with pytest.raises(AddressError) as info:
        parse_smtp_address(text)
    message = str(info.value)
    assert reason in message
    assert "is not a valid SMTP address" in message
    assert "\n" not in message and "\r" not in message


def test_error_message_names_the_address() -> None:
    """The error starts with the offending text quoted, as in "'a@@b' is not a valid ..."."""
    with pytest.raises(AddressError, match=r"^'a@@b' is not a valid SMTP address: "):
        parse_smtp_address("a@@b")


def test_error_message_is_bounded_for_huge_input() -> None:
    """A huge input does not produce a huge error message."""
    with pytest.raises(AddressError) as info:
        parse_smtp_address("a" * 100_000)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("bad", HOSTILE)
@pytest.mark.parametrize("position", range(len("<alice@contoso.test>") + 1))
def test_control_characters_refused_in_every_position(bad: str, position: int) -> None:
    """CR, LF, NUL and other control/invisible characters are refused wherever they appear."""
    base = "<alice@contoso.test>"
    text = base[:position] + bad + base[position:]
    with pytest.raises(AddressError) as info:
        parse_smtp_address(text)
    assert "character" in str(info.value)
    with pytest.raises(AddressError):
        parse_recipient_address(text)


@pytest.mark.parametrize("bad", ["\r\n", "\x00", "\n"])
def test_control_characters_refused_in_quoted_local_part(bad: str) -> None:
    """Quoting does not make CR, LF or NUL acceptable (RFC 5321 qtextSMTP excludes them)."""
    with pytest.raises(AddressError):
        parse_smtp_address(f'"a{bad}b"@contoso.test')


def test_trailing_crlf_is_refused_not_stripped() -> None:
    """An address that arrives with a trailing CRLF is refused rather than silently repaired."""
    with pytest.raises(AddressError, match="control character U\\+000D"):
        parse_smtp_address("alice@contoso.test\r\n")


def test_smtp_address_constructor_refuses_control_characters() -> None:
    """SmtpAddress itself refuses CR/LF/NUL, so no code path can build an injectable address."""
    with pytest.raises(AddressError):
        SmtpAddress("alice\r\nRCPT TO:<x@y>", "contoso.test")
    with pytest.raises(AddressError):
        SmtpAddress("alice", "conto\x00so.test")
    with pytest.raises(AddressError):
        SmtpAddress("alice", "a@b")
    with pytest.raises(AddressError):
        SmtpAddress("", "contoso.test")


# --------------------------------------------------------------------------- typed addresses


@pytest.mark.parametrize(
    ("text", "type_", "value", "shown"),
    [
        ("FAX:+15551234", "FAX", "+15551234", "FAX:+15551234"),
        ("fax:+15551234", "FAX", "+15551234", "FAX:+15551234"),
        ("<FAX:+15551234>", "FAX", "+15551234", "FAX:+15551234"),
        ("  FAX:+1 (555) 123/4  ", "FAX", "+1 (555) 123/4", "FAX:+1 (555) 123/4"),
        (
            "X400:c=US;a= ;p=Contoso;o=Exchange;s=Smith;",
            "X400",
            "c=US;a= ;p=Contoso;o=Exchange;s=Smith;",
            "X400:c=US;a= ;p=Contoso;o=Exchange;s=Smith;",
        ),
        (
            "EX:/o=Contoso/ou=First/cn=Recipients/cn=alice",
            "EX",
            "/o=Contoso/ou=First/cn=Recipients/cn=alice",
            None,
        ),
        ("My-Type_2:Value", "MY-TYPE_2", "Value", "MY-TYPE_2:Value"),
        ("a:b@c.test", "A", "b@c.test", "A:b@c.test"),
        ("SMTP:alice@contoso.test", "SMTP", "alice@contoso.test", "alice@contoso.test"),
        ("smtp:<alice@contoso.test>", "SMTP", "alice@contoso.test", "alice@contoso.test"),
        ("alice@contoso.test", "SMTP", "alice@contoso.test", "alice@contoso.test"),
        ('"a:b"@c.test', "SMTP", '"a:b"@c.test', '"a:b"@c.test'),
        ("user@[IPv6:::1]", "SMTP", "user@[IPv6:::1]", "user@[IPv6:::1]"),
    ],
)
def test_parse_recipient_address(text: str, type_: str, value: str, shown: str | None) -> None:
    """TYPE:value is typed (type upper-cased, value verbatim); anything else must be SMTP."""
    address = parse_recipient_address(text)
    assert address.type == type_
    assert address.value == value
    assert str(address) == (shown if shown is not None else f"{type_}:{value}")
    assert address.is_smtp == (type_ == "SMTP")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "FAX:",
        "<FAX:>",
        "FAX:" + "1" * 1025,
        "SMTP:not-an-address",
        "SMTP:",
        "@a,@b:user@d.test",
        "T" * 33 + ":value",  # too long for a type, so it must be an SMTP address: it is not
        "no-type-and-no-at",
        "FAX:+1555\x00",
        "FAX:+15\r\n55",
    ],
)
def test_parse_recipient_address_refuses(text: str) -> None:
    """Empty or over-long values, bad SMTP values and control characters are refused."""
    with pytest.raises(AddressError) as info:
        parse_recipient_address(text)
    assert "\n" not in str(info.value)


def test_typed_value_of_1024_characters_is_accepted() -> None:
    """The 1024-character limit on typed values is inclusive."""
    assert len(parse_recipient_address("FAX:" + "1" * 1024).value) == 1024


def test_recipient_keys_are_case_insensitive() -> None:
    """key is TYPE: plus the casefolded value (SMTP: plus SmtpAddress.key)."""
    assert parse_recipient_address("fax:ABC").key == "FAX:abc"
    assert parse_recipient_address("Alice@Contoso.Test").key == "SMTP:alice@contoso.test"
    assert parse_recipient_address("X400:C=us").key == parse_recipient_address("x400:c=US").key


def test_recipient_smtp_constructor_and_accessor() -> None:
    """RecipientAddress.smtp wraps an SmtpAddress, and smtp_address gives it back."""
    smtp = parse_smtp_address("Alice@Contoso.Test")
    recipient = RecipientAddress.smtp(smtp)
    assert recipient == RecipientAddress("SMTP", "Alice@Contoso.Test")
    assert recipient.is_smtp
    assert recipient.smtp_address == smtp
    assert str(recipient) == "Alice@Contoso.Test"


def test_smtp_address_accessor_refuses_other_types() -> None:
    """smtp_address on a FAX recipient is an error, not a silent None."""
    with pytest.raises(AddressError, match="not SMTP"):
        _ = parse_recipient_address("FAX:123").smtp_address


def test_recipient_constructor_validates() -> None:
    """RecipientAddress normalises the type and refuses invalid types, values and SMTP text."""
    assert RecipientAddress("fax", "1").type == "FAX"
    assert RecipientAddress("smtp", " <a@b.test> ").value == "a@b.test"
    for type_, value in [("", "x"), ("F X", "x"), ("FAX", ""), ("FAX", "a\nb"), ("SMTP", "x")]:
        with pytest.raises(AddressError):
            RecipientAddress(type_, value)


# --------------------------------------------------------------------------- IMCEA


@pytest.mark.parametrize(
    ("recipient", "encapsulated"),
    [
        ("FAX:+1 (555) 123/4", "IMCEAFAX-+2B1+20+28555+29+20123_4@contoso.com"),
        ("FAX:+15551234", "IMCEAFAX-+2B15551234@contoso.test"),
        ("FAX:1234567890", "IMCEAFAX-1234567890@MyDomain.com"),
        ("X400:c=US;a= ;p=Org", "IMCEAX400-c=US+3Ba=+20+3Bp=Org@contoso.test"),
        ("EX:/o=Org/cn=a-b", "IMCEAEX-_o=Org_cn=a-b@contoso.test"),
        ("FAX:é", "IMCEAFAX-+C3+A9@contoso.test"),
    ],
)
def test_imcea_round_trip(recipient: str, encapsulated: str) -> None:
    """IMCEA keeps letters, digits, '=' and '-', maps '/' to '_', and escapes the rest as +XX."""
    address = parse_recipient_address(recipient)
    domain = encapsulated.rpartition("@")[2]
    encoded = imcea_encode(address, domain)
    assert str(encoded) == encapsulated
    assert imcea_decode(parse_smtp_address(encapsulated)) == address


def test_imcea_decode_is_case_insensitive() -> None:
    """IMCEA prefix, type and hex digits may be in any case; the type comes back upper-case."""
    decoded = imcea_decode(parse_smtp_address("imceafax-+2b1+20+2a@contoso.test"))
    assert decoded == RecipientAddress("FAX", "+1 *")


def test_imcea_decode_takes_unescaped_characters_literally() -> None:
    """Characters a strict encoder would have escaped ('.', non-ASCII) are decoded as themselves."""
    decoded = imcea_decode(parse_smtp_address("IMCEAFAX-a.b+2Eé@contoso.test"))
    assert decoded == RecipientAddress("FAX", "a.b.é")


@pytest.mark.parametrize(
    "address",
    [
        "alice@contoso.test",
        "IMCEA@contoso.test",
        "IMCEAFAX@contoso.test",  # no '-'
        "IMCEA-123@contoso.test",  # empty type
        "IMCEAFAX-@contoso.test",  # empty rest
        "IMCEAF_X-1@contoso.test",  # '_' is not allowed in an IMCEA type
        "IMCEA" + "X" * 33 + "-1@contoso.test",  # type longer than 32
        "IMCEFAX-123@contoso.test",
        '"IMCEAFAX-123"@contoso.test',
        "\u0131MCEAFAX-123@contoso.test",  # dotless i upper-cases to "I"
    ],
)
def test_imcea_decode_returns_none_for_non_imcea(address: str) -> None:
    """An address that is not IMCEA<type>-<rest> is not decoded."""
    assert imcea_decode(parse_smtp_address(address)) is None


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("IMCEAFAX-123+@contoso.test", "hex"),
        ("IMCEAFAX-123+2@contoso.test", "hex"),
        ("IMCEAFAX-+G1@contoso.test", "hex"),
        ("IMCEAFAX-+ 1@contoso.test", "hex"),
        ("IMCEAFAX-+FF@contoso.test", "UTF-8"),
        ("IMCEAFAX-+C3@contoso.test", "UTF-8"),
        ("IMCEAFAX-a+0D+0AMAIL@contoso.test", "control character"),
        ("IMCEAFAX-+00@contoso.test", "control character"),
        ("IMCEASMTP-not+20an+20address@contoso.test", "SMTP address"),
    ],
)
def test_imcea_decode_refuses_malformed(address: str, reason: str) -> None:
    """A bad escape, invalid UTF-8 or a decoded value that is not a valid address is an error."""
    smtp = SmtpAddress(*address.rsplit("@", 1))
    with pytest.raises(AddressError, match=reason):
        imcea_decode(smtp)


def test_imcea_decode_does_not_refuse_smtp_or_x500() -> None:
    """SMTP and X500 are decoded; refusing them is the caller's job, via REFUSED_IMCEA_TYPES."""
    smtp = imcea_decode(parse_smtp_address("IMCEASMTP-bob+40fabrikam+2Etest@contoso.test"))
    x500 = imcea_decode(parse_smtp_address("IMCEAX500-_o=Org_cn=bob@contoso.test"))
    assert smtp == RecipientAddress("SMTP", "bob@fabrikam.test")
    assert x500 == RecipientAddress("X500", "/o=Org/cn=bob")
    assert smtp.type in REFUSED_IMCEA_TYPES
    assert x500.type in REFUSED_IMCEA_TYPES
    assert "FAX" not in REFUSED_IMCEA_TYPES
    assert frozenset({"SMTP", "X500"}) == REFUSED_IMCEA_TYPES


def test_imcea_decode_ignores_the_domain() -> None:
    """Decoding does not look at the domain: the caller decides which domain to decode for."""
    decoded = imcea_decode(parse_smtp_address("IMCEAFAX-123@elsewhere.example"))
    assert decoded == RecipientAddress("FAX", "123")


def test_imcea_encode_refuses_types_with_separators() -> None:
    """A type with '-' or '_' cannot be encapsulated, since the decoder splits at the first '-'."""
    with pytest.raises(AddressError, match="letters and digits"):
        imcea_encode(RecipientAddress("MY-FAX", "1"), "contoso.test")


def test_imcea_encode_refuses_bad_domain() -> None:
    """The encapsulation domain must itself be a valid domain."""
    for domain in ["", "bad domain", "a..b", "x\r\ny"]:
        with pytest.raises(AddressError):
            imcea_encode(RecipientAddress("FAX", "1"), domain)


def test_imcea_encode_enforces_315_character_local_part() -> None:
    """Exchange does not support IMCEA local parts over 315 characters."""
    ok = imcea_encode(RecipientAddress("FAX", "1" * (315 - len("IMCEAFAX-"))), "contoso.test")
    assert len(ok.local) == 315
    with pytest.raises(AddressError, match="315"):
        imcea_encode(RecipientAddress("FAX", "1" * (316 - len("IMCEAFAX-"))), "contoso.test")
    with pytest.raises(AddressError, match="315"):
        imcea_encode(RecipientAddress("FAX", " " * 200), "contoso.test")


def test_imcea_output_is_a_valid_smtp_address() -> None:
    """The encapsulated address parses back as an ordinary SMTP address."""
    encoded = imcea_encode(RecipientAddress("FAX", '+1 (555) "x" <y> @z'), "contoso.test")
    assert parse_smtp_address(str(encoded)) == encoded


# --------------------------------------------------------------------------- properties

_printable_values = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Zl", "Zp")),
    min_size=1,
    max_size=20,
)
_imcea_types = st.from_regex(r"[A-Za-z0-9]{1,8}", fullmatch=True).filter(
    lambda t: t.upper() != "SMTP"
)


@given(type_=_imcea_types, value=_printable_values)
def test_imcea_round_trip_property(type_: str, value: str) -> None:
    """Every printable typed address survives IMCEA encoding and decoding unchanged."""
    address = RecipientAddress(type_, value)
    encoded = imcea_encode(address, "contoso.test")
    assert set(encoded.local[len("IMCEA") :]) <= set(string.ascii_letters + string.digits + "=-_+")
    assert imcea_decode(parse_smtp_address(str(encoded))) == address


_atext = st.sampled_from(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~é")
_atoms = st.text(alphabet=_atext, min_size=1, max_size=10)
_labels = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)


@given(
    local=st.lists(_atoms, min_size=1, max_size=4).map(".".join),
    domain=st.lists(_labels, min_size=1, max_size=4).map(".".join),
)
def test_valid_addresses_round_trip(local: str, domain: str) -> None:
    """Generated dot-atom@hostname addresses parse, and str() gives back the same text."""
    text = f"{local}@{domain}"
    address = parse_smtp_address(text)
    assert str(address) == text
    assert parse_recipient_address(text) == RecipientAddress.smtp(address)


@given(st.text(max_size=200))
def test_parsers_raise_only_address_error(text: str) -> None:
    """On arbitrary text the parsers either succeed or raise AddressError, never anything else."""
    for parse in (parse_smtp_address, parse_recipient_address):
        try:
            result = parse(text)
        except AddressError as error:
            assert "\n" not in str(error)
        else:
            assert "\r" not in str(result) and "\n" not in str(result) and "\x00" not in str(result)


@given(local=st.text(min_size=1, max_size=60))
def test_imcea_decode_raises_only_address_error(local: str) -> None:
    """imcea_decode never fails with anything but AddressError on arbitrary local parts."""
    try:
        address = SmtpAddress("IMCEAFAX-" + local, "contoso.test")
    except AddressError:
        return  # refused at construction, which is also fine
    try:
        decoded = imcea_decode(address)
    except AddressError as error:
        assert "IMCEA" in str(error) or "address" in str(error)
    else:
        assert decoded is None or decoded.type == "FAX"


def test_unicode_spaces_are_not_trimmed_into_another_address() -> None:
    """Only ASCII spaces around an address are trimmed: "\\u00a0admin@x.test" is not
    "admin@x.test" (found by the T28 fuzz test: without SMTPUTF8 it must be refused as
    non-ASCII, not accepted as someone else)."""
    assert str(parse_smtp_address("\u00a0admin@contoso.test")) == "\u00a0admin@contoso.test"
    assert str(parse_smtp_address(" <admin@contoso.test> ")) == "admin@contoso.test"
