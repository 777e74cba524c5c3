"""Tests for mailgate.core.address_space: parsing, validation and matching of address spaces."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.core.address import RecipientAddress, parse_recipient_address
from mailgate.core.address_space import AddressSpace, AddressSpaceError, parse_address_spaces


def _best(spaces: list[str], recipient: str) -> str | None:
    """The space (as given) that matches *recipient* most specifically, or None."""
    address = parse_recipient_address(recipient)
    scored = [
        (score, text)
        for text in spaces
        if (score := AddressSpace.parse(text).match(address)) is not None
    ]
    return max(scored)[1] if scored else None


# --------------------------------------------------------------------------- parsing (§8.4)


@pytest.mark.parametrize(
    ("text", "type_", "space", "cost", "canonical"),
    [
        ("FAX:*;1", "FAX", "*", 1, "FAX:*;1"),
        (
            "X400:c=US;a=Fabrikam;P=Contoso;5",
            "X400",
            "c=US;a=Fabrikam;P=Contoso",
            5,
            "X400:c=US;a=Fabrikam;P=Contoso;5",
        ),
        ('"contoso.com;1"', "SMTP", "contoso.com", 1, "SMTP:contoso.com;1"),
        ("'contoso.com;1'", "SMTP", "contoso.com", 1, "SMTP:contoso.com;1"),
        ('"SMTP:contoso.com"', "SMTP", "contoso.com", 1, "SMTP:contoso.com;1"),
        ("contoso.com", "SMTP", "contoso.com", 1, "SMTP:contoso.com;1"),
        ("*.contoso.com", "SMTP", "*.contoso.com", 1, "SMTP:*.contoso.com;1"),
        ("*", "SMTP", "*", 1, "SMTP:*;1"),
        ("*.com", "SMTP", "*.com", 1, "SMTP:*.com;1"),
        ("smtp:Contoso.COM;100", "SMTP", "contoso.com", 100, "SMTP:contoso.com;100"),
        ("  contoso.com ; 7  ", "SMTP", "contoso.com", 7, "SMTP:contoso.com;7"),
        ("fax:+44*;3", "FAX", "+44*", 3, "FAX:+44*;3"),
        ("FAX:+441234", "FAX", "+441234", 1, "FAX:+441234;1"),
        ("FAX:a;b;2", "FAX", "a;b", 2, "FAX:a;b;2"),
        ("X400:c=US", "X400", "c=US", 1, "X400:c=US;1"),
        ("X400:c=US;a= ;p=Org;2", "X400", "c=US;a= ;p=Org", 2, "X400:c=US;a= ;p=Org;2"),
        ("X400:c=US;dda:RFC-822=a(a)b;1", "X400", "c=US;dda:RFC-822=a(a)b", 1, None),
        ("X400:ou1=Sales;OU2=East;cn=Bob;1", "X400", "ou1=Sales;OU2=East;cn=Bob", 1, None),
        ("EX:/o=Contoso/*", "EX", "/o=Contoso/*", 1, "EX:/o=Contoso/*;1"),
        ("My_Type-1:anything at all", "MY_TYPE-1", "anything at all", 1, None),
    ],
)
def test_parse_accepts(text: str, type_: str, space: str, cost: int, canonical: str | None) -> None:
    """Valid [TYPE:]SPACE[;COST] values parse to the canonical type, space and cost."""
    parsed = AddressSpace.parse(text)
    assert (parsed.type, parsed.space, parsed.cost) == (type_, space, cost)
    assert str(parsed) == (canonical if canonical is not None else f"{type_}:{space};{cost}")
    assert AddressSpace.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("*contoso.com", 'a wildcard must be "*" alone or "*." followed by a domain'),
        ("contoso.*", "wildcard"),
        ("a.*.com", "wildcard"),
        ("*.*.com", "wildcard"),
        ("**", "wildcard"),
        ("contoso.com;0", "between 1 and 100 (got 0)"),
        ("contoso.com;101", "between 1 and 100 (got 101)"),
        ("FAX:*;0", "between 1 and 100"),
        ("FAX:*;101", "between 1 and 100"),
        ("contoso.com;" + "9" * 500, "between 1 and 100 (got a larger number)"),
        ("contoso.com;-1", "the cost"),
        ("contoso.com;1.5", "the cost"),
        ("contoso.com;abc", "the cost"),
        ("contoso.com;", "the cost"),
        ("contoso.com;1;2", "cannot contain ';'"),
        (
            "X400:c=US;a=Fabrikam",
            "contains ';', so the cost must be given explicitly, e.g. X400:c=US;a=Fabrikam;1",
        ),
        ("FAX:a;b", "cost must be given explicitly"),
        ("FAX:*;", "cost must be given explicitly"),
        ("", "empty"),
        ('""', "empty"),
        ("SMTP:", "empty"),
        ("FAX:", "empty"),
        ("FAX:;5", "empty"),
        ("contoso com", "RFC 1035"),
        ("contoso_com.test", "RFC 1035"),
        ("-contoso.com", "RFC 1035"),
        ("contoso-.com", "RFC 1035"),
        ("contoso..com", "empty label"),
        ("contoso.com.", "empty label"),
        ("bücher.example", "RFC 1035"),
        ("a" * 64 + ".com", "63"),
        (".".join(["a" * 63] * 4) + ".b", "255"),
        ("[192.0.2.1]", "RFC 1035"),
        ("X400:c", "key=value"),
        ("X400:c=US;a;1", "key=value"),
        ("X400:c=US;;a=F;1", "key=value"),
        ("X400:=US;1", "key=value"),
        ("X400:c=;1", "key=value"),
        ("X400:c/x=US;1", "key=value"),
        ("X400:*", "key=value"),
        ("FAX:*44", "'*' may appear only as the last character"),
        ("FAX:+4*4*", "'*' may appear only as the last character"),
        ("FAX:" + "1" * 1025, "longer than 1024"),
        ('"contoso.com', "unbalanced quote"),
        ("contoso.com'", "unbalanced quote"),
        ("contoso.com\r\n", "control character"),
        ("FAX:1\x002", "control character"),
        ("X400:c=US\n;1", "control character"),
    ],
)
def test_parse_refuses(text: str, reason: str) -> None:
    """Invalid address spaces raise AddressSpaceError with a one-line reason naming the rule."""
    with pytest.raises(AddressSpaceError) as info:
        AddressSpace.parse(text)
    message = str(info.value)
    assert reason in message
    assert "\n" not in message and "\r" not in message


def test_wildcard_error_message_matches_the_documented_wording() -> None:
    """The *contoso.com error names the value and states the wildcard rule in one line."""
    with pytest.raises(AddressSpaceError) as info:
        AddressSpace.parse("*contoso.com")
    assert str(info.value) == (
        '"*contoso.com" is not a valid SMTP address space: a wildcard must be "*" alone or '
        '"*." followed by a domain'
    )


@pytest.mark.parametrize("bad", ["\r", "\n", "\x00"])
@pytest.mark.parametrize("position", range(len("FAX:+44*;2") + 1))
def test_control_characters_refused_in_every_position(bad: str, position: int) -> None:
    """CR, LF and NUL are refused wherever they appear in an address space."""
    text = "FAX:+44*;2"[:position] + bad + "FAX:+44*;2"[position:]
    with pytest.raises(AddressSpaceError, match="control character"):
        AddressSpace.parse(text)


def test_constructor_normalises_and_validates() -> None:
    """AddressSpace() itself upper-cases the type, lower-cases SMTP spaces and checks the cost."""
    assert AddressSpace("smtp", " Contoso.COM ") == AddressSpace("SMTP", "contoso.com", 1)
    assert AddressSpace("fax", "ABC*").space == "ABC*"  # non-SMTP spaces keep their case
    for args in [("SMTP", "*contoso.com", 1), ("SMTP", "a.com", 0), ("bad type", "x", 1)]:
        with pytest.raises(AddressSpaceError):
            AddressSpace(*args)
    with pytest.raises(AddressSpaceError):
        AddressSpace("SMTP", "a.com", True)


def test_key_ignores_case_and_cost() -> None:
    """key identifies a space regardless of case and cost, for duplicate detection."""
    assert AddressSpace.parse("FAX:ABC;1").key == AddressSpace.parse("fax:abc;9").key
    assert AddressSpace.parse("FAX:abc").key != AddressSpace.parse("EX:abc").key


# --------------------------------------------------------------------------- lists


def test_parse_address_spaces_powershell_list() -> None:
    """A comma-separated, quoted PowerShell list yields one space per item, in order."""
    spaces = parse_address_spaces(['"contoso.com;2","fabrikam.com;3"', "FAX:*"])
    assert [str(s) for s in spaces] == ["SMTP:contoso.com;2", "SMTP:fabrikam.com;3", "FAX:*;1"]


def test_parse_address_spaces_unquoted_list_and_repeats() -> None:
    """Unquoted comma lists split too, and repeated option values are concatenated."""
    spaces = parse_address_spaces(["contoso.com, fabrikam.com;4", "*.example"])
    assert [str(s) for s in spaces] == [
        "SMTP:contoso.com;1",
        "SMTP:fabrikam.com;4",
        "SMTP:*.example;1",
    ]


def test_parse_address_spaces_quoted_item_keeps_commas_and_apostrophes() -> None:
    """A comma inside a quoted item belongs to it; an apostrophe inside an item is a character."""
    spaces = parse_address_spaces(['"X400:o=A,B;c=US;2"', "X400:s=O'Brien;c=US;3"])
    assert [s.space for s in spaces] == ["o=A,B;c=US", "s=O'Brien;c=US"]


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (["contoso.com", "Contoso.COM;5"], "duplicates"),
        (['"contoso.com;2","contoso.com;3"'], "duplicates"),
        (["FAX:ABC*", "fax:abc*;2"], "duplicates"),
        (["contoso.com,,fabrikam.com"], "empty item"),
        (["contoso.com,"], "empty item"),
        ([""], "empty item"),
        (['"contoso.com'], "unbalanced quote"),
        (['"contoso.com" x'], "after a closing quote"),
        (["contoso.com,*bad.com"], "wildcard"),
    ],
)
def test_parse_address_spaces_refuses(values: list[str], reason: str) -> None:
    """Duplicates (same type and space, any case or cost), empty items and bad items are errors."""
    with pytest.raises(AddressSpaceError, match=reason):
        parse_address_spaces(values)


def test_parse_address_spaces_empty_input() -> None:
    """No values give an empty list."""
    assert parse_address_spaces([]) == []


def test_distinct_types_with_same_space_are_not_duplicates() -> None:
    """FAX:123 and EX:123 are different spaces."""
    assert len(parse_address_spaces(["FAX:123", "EX:123"])) == 2


# --------------------------------------------------------------------------- matching: SMTP


@pytest.mark.parametrize(
    ("space", "recipient", "expected"),
    [
        ("*", "a@contoso.com", (0, 0)),
        ("*", "a@[192.0.2.1]", (0, 0)),
        ("contoso.com", "a@contoso.com", (11, 1)),
        ("contoso.com", "a@CONTOSO.Com", (11, 1)),
        ("contoso.com", "a@sub.contoso.com", None),
        ("contoso.com", "a@notcontoso.com", None),
        ("*.contoso.com", "a@contoso.com", (11, 0)),
        ("*.contoso.com", "a@marketing.contoso.com", (11, 0)),
        ("*.contoso.com", "a@a.b.Contoso.com", (11, 0)),
        ("*.contoso.com", "a@notcontoso.com", None),
        ("*.contoso.com", "a@contoso.com.evil", None),
        ("marketing.contoso.com", "julia@marketing.contoso.com", (21, 1)),
        ("contoso.com", "FAX:contoso.com", None),
        ("*", "FAX:123", None),
    ],
)
def test_smtp_match(space: str, recipient: str, expected: tuple[int, int] | None) -> None:
    """SMTP spaces: '*' all, 'd' that domain only, '*.d' the domain and its subdomains."""
    assert AddressSpace.parse(space).match(parse_recipient_address(recipient)) == expected


def test_smtp_specificity_julia() -> None:
    """julia@marketing.contoso.com: marketing.contoso.com > *.contoso.com > * (reference §1.6)."""
    recipient = parse_recipient_address("julia@marketing.contoso.com")
    scores = [
        AddressSpace.parse(s).match(recipient)
        for s in ["marketing.contoso.com", "*.contoso.com", "*"]
    ]
    assert None not in scores
    assert scores[0] > scores[1] > scores[2]  # type: ignore[operator]
    assert _best(["*", "*.contoso.com", "marketing.contoso.com"], str(recipient)) == (
        "marketing.contoso.com"
    )


def test_exact_domain_beats_subdomain_wildcard() -> None:
    """For x@contoso.com an exact contoso.com is more specific than *.contoso.com."""
    assert _best(["*.contoso.com", "contoso.com", "*"], "x@contoso.com") == "contoso.com"


def test_longer_subdomain_wildcard_is_more_specific() -> None:
    """*.marketing.contoso.com beats *.contoso.com for a deeper subdomain."""
    assert (
        _best(["*.contoso.com", "*.marketing.contoso.com"], "a@x.marketing.contoso.com")
        == "*.marketing.contoso.com"
    )


# --------------------------------------------------------------------------- matching: other


@pytest.mark.parametrize(
    ("space", "recipient", "expected"),
    [
        ("FAX:*", "FAX:+441234", (0, 0)),
        ("FAX:+44*", "FAX:+441234", (3, 0)),
        ("FAX:+441234", "FAX:+441234", (7, 1)),
        ("FAX:+441234", "FAX:+4412345", None),
        ("FAX:+44*", "FAX:+331234", None),
        ("fax:abc*", "FAX:ABCdef", (3, 0)),
        ("FAX:ABC", "fax:abc", (3, 1)),
        ("FAX:*", "EX:/o=x", None),
        ("FAX:*", "a@contoso.com", None),
        ("EX:/o=Contoso/*", "EX:/O=CONTOSO/ou=x/cn=bob", (11, 0)),
    ],
)
def test_text_match(space: str, recipient: str, expected: tuple[int, int] | None) -> None:
    """Free-text spaces: literal or trailing-'*' prefix, case-insensitive, same type only."""
    assert AddressSpace.parse(space).match(parse_recipient_address(recipient)) == expected


def test_fax_specificity() -> None:
    """For FAX:+441234: literal +441234 > prefix +44* > *."""
    assert _best(["FAX:*", "FAX:+44*"], "FAX:+441234") == "FAX:+44*"
    assert _best(["FAX:*", "FAX:+44*", "FAX:+441234"], "FAX:+441234") == "FAX:+441234"
    assert _best(["FAX:+441234*", "FAX:+441234"], "FAX:+441234") == "FAX:+441234"


@pytest.mark.parametrize(
    ("space", "recipient", "expected"),
    [
        ("X400:c=US", "X400:c=US;a= ;p=Contoso;o=Exchange;s=Smith;", (1, 0)),
        ("X400:c=us;P=CONTOSO;1", "X400:c=US;a= ;p=Contoso;o=Exchange;s=Smith;", (2, 0)),
        ("X400:c=US;p=*;1", "X400:c=US;a= ;p=Contoso;", (2, 0)),
        ("X400:c=US;a=Fabrikam;P=Contoso;5", "X400:c=US;a=Fabrikam;p=Contoso;s=Lee", (3, 0)),
        ("X400:c=US;a=Fabrikam;1", "X400:c=US;a=Other;p=Contoso", None),
        ("X400:c=US;o=Sales;1", "X400:c=US;p=Contoso", None),
        ("X400:c=US", "X400:not an attribute list", None),
        ("X400:c=US", "FAX:c=US", None),
    ],
)
def test_x400_match(space: str, recipient: str, expected: tuple[int, int] | None) -> None:
    """X400 spaces match when every attribute is present (case-insensitive, '*' any value)."""
    assert AddressSpace.parse(space).match(parse_recipient_address(recipient)) == expected


def test_x400_more_attributes_is_more_specific() -> None:
    """An X400 space with more matching attributes beats one with fewer."""
    recipient = "X400:c=US;a=Fabrikam;p=Contoso;s=Lee"
    assert _best(["X400:c=US", "X400:c=US;a=Fabrikam;1"], recipient) == "X400:c=US;a=Fabrikam;1"


# --------------------------------------------------------------------------- properties


@given(st.text(max_size=120))
def test_parse_raises_only_address_space_error(text: str) -> None:
    """On arbitrary text, AddressSpace.parse succeeds (and round-trips) or raises its own error."""
    try:
        space = AddressSpace.parse(text)
    except AddressSpaceError as error:
        assert "\n" not in str(error)
    else:
        assert AddressSpace.parse(str(space)) == space


@given(st.lists(st.text(max_size=60), max_size=4))
def test_parse_address_spaces_raises_only_its_error(values: list[str]) -> None:
    """parse_address_spaces on arbitrary values either succeeds or raises AddressSpaceError."""
    try:
        spaces = parse_address_spaces(values)
    except AddressSpaceError as error:
        assert "\n" not in str(error)
    else:
        assert len({s.key for s in spaces}) == len(spaces)


_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(
    wildcard=st.booleans(),
    labels=st.lists(_labels, min_size=1, max_size=4),
    cost=st.integers(min_value=1, max_value=100),
    recipient_labels=st.lists(_labels, min_size=0, max_size=2),
)
def test_smtp_space_round_trip_and_match(
    wildcard: bool, labels: list[str], cost: int, recipient_labels: list[str]
) -> None:
    """Generated SMTP spaces round-trip through str() and match exactly the documented domains."""
    domain = ".".join(labels)
    text = f"{'*.' if wildcard else ''}{domain};{cost}"
    space = AddressSpace.parse(text)
    assert AddressSpace.parse(str(space)) == space
    recipient_domain = ".".join([*recipient_labels, domain])
    score = space.match(RecipientAddress("SMTP", f"u@{recipient_domain}"))
    if recipient_labels and not wildcard:
        assert score is None
    else:
        assert score == (len(domain), 0 if wildcard else 1)


@given(
    prefix=st.text(
        alphabet=st.characters(
            blacklist_categories=("Cc", "Cf", "Cs", "Zl", "Zp"), blacklist_characters="*;\"'"
        ),
        min_size=1,
        max_size=12,
    ).filter(lambda s: s.strip() == s),
    suffix=st.text(alphabet="0123456789", max_size=5),
)
def test_prefix_space_matches_values_starting_with_prefix(prefix: str, suffix: str) -> None:
    """A trailing-'*' FAX space matches any value that starts with its prefix."""
    space = AddressSpace("FAX", prefix + "*")
    assert space.match(RecipientAddress("FAX", prefix + suffix)) == (len(prefix.casefold()), 0)
