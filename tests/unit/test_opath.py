"""Tests for mailgate.core.opath: OPATH -Filter parsing, Python evaluation and SQL translation."""

from __future__ import annotations

import datetime
import enum
import sqlite3
from collections.abc import Iterator, Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.core.opath import (
    And,
    Comparison,
    Filter,
    FilterError,
    Not,
    Or,
    Schema,
    parse,
    properties,
)

SCHEMA: Schema = {
    "Status": "enum",
    "DeliveryType": "enum",
    "FromAddress": "string",
    "LastError": "string",
    "MessageCount": "int",
    "NextRetryTime": "datetime",
    "IsSuspended": "bool",
    "Recipients": "list",
}
# Canonical property -> SQL column; Recipients is a list and so has no column.
COLUMNS = {
    "Status": "status",
    "DeliveryType": "delivery_type",
    "FromAddress": "from_address",
    "LastError": "last_error",
    "MessageCount": "message_count",
    "NextRetryTime": "next_retry",
    "IsSuspended": "is_suspended",
}
UTC = datetime.timezone.utc
T_0900 = datetime.datetime(2026, 11, 29, 9, 0, tzinfo=UTC).timestamp()
T_1000 = datetime.datetime(2026, 11, 29, 10, 0, tzinfo=UTC).timestamp()
T_1100 = datetime.datetime(2026, 11, 29, 11, 0, tzinfo=UTC).timestamp()

ROWS: list[dict[str, object]] = [
    {"Status": "Retry", "FromAddress": "alice@contoso.test", "MessageCount": 150,
     "LastError": "452 4.2.2 Mailbox quota exceeded", "NextRetryTime": T_0900,
     "IsSuspended": False, "DeliveryType": "SmtpRelayToRemoteAdSite",
     "Recipients": ["bob@fabrikam.test", "FAX:+15551234"]},
    {"Status": "Suspended", "FromAddress": "Bob@CONTOSO.TEST", "MessageCount": 500,
     "LastError": None, "NextRetryTime": T_1100, "IsSuspended": True,
     "DeliveryType": "SmtpDeliveryToMailbox", "Recipients": ["carol@contoso.test"]},
    {"Status": "Active", "FromAddress": "carol@fabrikam.test", "MessageCount": 3,
     "LastError": "QUOTA: 100%_used\\x", "NextRetryTime": None, "IsSuspended": None,
     "DeliveryType": None, "Recipients": []},
    {"Status": None, "FromAddress": None, "MessageCount": None, "LastError": "it's \"odd\"",
     "NextRetryTime": T_1000, "IsSuspended": False, "DeliveryType": "Undefined",
     "Recipients": None},
]


def py_ids(flt: Filter, rows: Sequence[Mapping[str, object]]) -> set[int]:
    return {i for i, row in enumerate(rows) if flt.matches(row)}


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:")
    yield conn
    conn.close()


def fill(conn: sqlite3.Connection, rows: Sequence[Mapping[str, object]]) -> None:
    conn.execute("DROP TABLE IF EXISTS q")
    conn.execute(
        "CREATE TABLE q (id INTEGER PRIMARY KEY, status TEXT, delivery_type TEXT, "
        "from_address TEXT, last_error TEXT, message_count INTEGER, next_retry REAL, "
        "is_suspended INTEGER)"
    )
    for i, row in enumerate(rows):
        conn.execute(
            "INSERT INTO q VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [i, *(row.get(prop) for prop in COLUMNS)],
        )


def sql_ids(conn: sqlite3.Connection, flt: Filter) -> set[int]:
    translated = flt.to_sql(COLUMNS)
    assert translated is not None
    where, params = translated
    return {row[0] for row in conn.execute(f"SELECT id FROM q WHERE {where}", params)}


# --------------------------------------------------------------------------- Exchange examples


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Status -eq 'Retry'", {0}),
        ("FromAddress -like '*@contoso.test'", {0, 1}),
        ("MessageCount -gt 100 -and Status -ne 'Suspended'", {0}),
        ("LastError -contains 'quota'", {0, 2}),
        ("NextRetryTime -lt '2026-11-29 10:00'", {0}),
        ("Recipients -like 'FAX:*'", {0}),
        ("LastError -eq $null", {1}),
        ("LastError -ne $null", {0, 2, 3}),
        ("IsSuspended -eq $true", {1}),
        ("IsSuspended -ne $true", {0, 2, 3}),
    ],
)
def test_exchange_examples(text: str, expected: set[int]) -> None:
    """The Get-Queue/Get-Message examples select the rows Exchange would select."""
    assert py_ids(parse(text, SCHEMA), ROWS) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Status -eq 'Retry'",
        "FromAddress -like '*@contoso.test'",
        "MessageCount -gt 100 -and Status -ne 'Suspended'",
        "LastError -contains 'quota'",
        "NextRetryTime -lt '2026-11-29 10:00'",
        "LastError -eq $null",
        "Status -ne $null -or -not (MessageCount -le 3)",
        "-not (Status -eq 'retry')",
        "Status -ne 'Retry'",
        "FromAddress -notlike '*contoso*'",
        "LastError -contains '%_'",
        "LastError -contains '\\'",
        "LastError -like '*100%_*'",
        "LastError -like '*%*'",
        "IsSuspended -eq $false",
        "DeliveryType -like 'smtp*'",
        "NextRetryTime -ge 1795946400",
    ],
)
def test_sql_agrees_with_python_on_samples(db: sqlite3.Connection, text: str) -> None:
    """to_sql run by real SQLite selects exactly the rows matches() accepts, nulls included."""
    fill(db, ROWS)
    flt = parse(text, SCHEMA)
    assert sql_ids(db, flt) == py_ids(flt, ROWS)


# --------------------------------------------------------------------------- syntax


def test_case_insensitive_names_keywords_and_values() -> None:
    """Property names, operators, combiners, variables and string values ignore case."""
    flt = parse("status -EQ 'RETRY' -AND isSUSPENDED -Eq $FALSE -oR lasterror -eq $NULL", SCHEMA)
    assert py_ids(flt, ROWS) == {0, 1}
    assert properties(flt) == {"Status", "IsSuspended", "LastError"}


def test_canonical_names_are_stored() -> None:
    """The parsed comparison carries the schema's spelling, not the one typed."""
    expected = Comparison("FromAddress", "string", "like", "x*")
    assert parse("fromaddress -like 'x*'", SCHEMA) == expected


def test_braces_are_stripped() -> None:
    """A scriptblock-style {...} wrapper parses the same as the bare filter."""
    assert parse("  { Status -eq 'Retry' }  ", SCHEMA) == parse("Status -eq 'Retry'", SCHEMA)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("LastError -eq 'it''s'", "it's"),
        ('LastError -eq "say ""hi"""', 'say "hi"'),
        ("LastError -eq \"it's\"", "it's"),
        ("LastError -eq '\"x\"'", '"x"'),
        ("LastError -eq ''", ""),
        ("LastError -eq 452", "452"),
        ("LastError -eq '(-and)'", "(-and)"),
    ],
)
def test_quoting(text: str, value: str) -> None:
    """Both quote styles work, a doubled quote is literal, bare numbers are text for strings."""
    flt = parse(text, SCHEMA)
    assert isinstance(flt, Comparison) and flt.value == value


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])), st.sampled_from("'\""))
def test_any_string_round_trips_through_quoting(text: str, quote: str) -> None:
    """Any string quoted by doubling the quote character parses back to itself."""
    flt = parse(f"LastError -eq {quote}{text.replace(quote, quote * 2)}{quote}", SCHEMA)
    assert isinstance(flt, Comparison) and flt.value == text


def test_and_binds_tighter_than_or() -> None:
    """a -or b -and c is a -or (b -and c); -not applies to the next condition only."""
    a = Comparison("Status", "enum", "eq", "a")
    b = Comparison("Status", "enum", "eq", "b")
    c = Comparison("Status", "enum", "eq", "c")
    assert parse("Status -eq 'a' -or Status -eq 'b' -and Status -eq 'c'", SCHEMA) == Or(
        (a, And((b, c)))
    )
    assert parse("(Status -eq 'a' -or Status -eq 'b') -and Status -eq 'c'", SCHEMA) == And(
        (Or((a, b)), c)
    )
    assert parse("-not Status -eq 'a' -and Status -eq 'b'", SCHEMA) == And((Not(a), b))
    assert parse("-not -not ((Status -eq 'a'))", SCHEMA) == Not(Not(a))


def test_parentheses_change_the_result() -> None:
    """Grouping changes which rows match, as the precedence rules predict."""
    loose = parse("Status -eq 'Active' -or Status -eq 'Retry' -and MessageCount -gt 200", SCHEMA)
    grouped = parse(
        "(Status -eq 'Active' -or Status -eq 'Retry') -and MessageCount -gt 200", SCHEMA
    )
    assert py_ids(loose, ROWS) == {2}
    assert py_ids(grouped, ROWS) == set()


# --------------------------------------------------------------------------- semantics


def test_like_wildcards() -> None:
    """-like: * is any run, ? and SQL wildcards are literal, no * means whole-value match."""
    rows = [{"FromAddress": v} for v in ["a?c", "abc", "A%C", "ac", "a_c@x"]]
    assert py_ids(parse("FromAddress -like 'a?c'", SCHEMA), rows) == {0}
    assert py_ids(parse("FromAddress -like 'a%c'", SCHEMA), rows) == {2}
    assert py_ids(parse("FromAddress -like 'a*c'", SCHEMA), rows) == {0, 1, 2, 3}
    assert py_ids(parse("FromAddress -like 'a_c*'", SCHEMA), rows) == {4}
    assert py_ids(parse("FromAddress -like 'ab'", SCHEMA), rows) == set()
    assert py_ids(parse("FromAddress -like '*'", SCHEMA), rows) == {0, 1, 2, 3, 4}


def test_case_folding_is_ascii_only() -> None:
    """Only ASCII letters fold, exactly as SQLite NOCASE and LIKE do."""
    rows = [{"LastError": "ÉCHEC"}, {"LastError": "échec"}]
    assert py_ids(parse("LastError -eq 'échec'", SCHEMA), rows) == {1}
    assert py_ids(parse("LastError -like 'éCHEC'", SCHEMA), rows) == {1}


def test_list_property_matches_any_element() -> None:
    """A list matches when any element matches; -ne/-notlike mean no element matches."""
    assert py_ids(parse("Recipients -eq 'CAROL@contoso.test'", SCHEMA), ROWS) == {1}
    assert py_ids(parse("Recipients -notlike 'fax:*'", SCHEMA), ROWS) == {1, 2, 3}
    assert py_ids(parse("Recipients -contains 'fabrikam'", SCHEMA), ROWS) == {0}
    assert py_ids(parse("Recipients -eq $null", SCHEMA), ROWS) == {2, 3}


def test_list_property_is_not_translated_to_sql() -> None:
    """A filter touching a list property or an unmapped one has no SQL form."""
    assert parse("Recipients -like 'FAX:*'", SCHEMA).to_sql(COLUMNS) is None
    assert parse("Status -eq 'a' -and -not (Recipients -eq 'x')", SCHEMA).to_sql(COLUMNS) is None
    assert parse("Status -eq 'a'", SCHEMA).to_sql({"LastError": "last_error"}) is None


def test_sql_uses_parameters_and_escapes_like() -> None:
    """Values travel as parameters; -like/-contains escape %, _ and the escape character."""
    where, params = parse("LastError -contains '1%_\\' -or FromAddress -like '*@x_y'",
                          SCHEMA).to_sql(COLUMNS) or ("", [])
    assert "1%" not in where and "ESCAPE '\\'" in where
    assert params == ["%1\\%\\_\\\\%", "%@x\\_y"]


def test_missing_property_is_null() -> None:
    """An absent key is None: -eq $null is true, comparisons false, negations true."""
    assert parse("MessageCount -eq $null", SCHEMA).matches({})
    assert not parse("MessageCount -lt 5", SCHEMA).matches({})
    assert parse("-not (MessageCount -lt 5)", SCHEMA).matches({})
    assert parse("Status -ne 'Retry'", SCHEMA).matches({})


def test_datetime_values() -> None:
    """Dates parse as ISO-8601 (naive = UTC, offsets honoured) or epoch; props may be datetimes."""
    def value(text: str) -> object:
        flt = parse(f"NextRetryTime -eq {text}", SCHEMA)
        assert isinstance(flt, Comparison)
        return flt.value

    assert value("'2026-11-29 10:00'") == T_1000
    assert value("'2026-11-29T11:00:00+01:00'") == T_1000
    assert value("'2026-11-29T10:00Z'") == T_1000
    assert value("'2026-11-29'") == T_1000 - 10 * 3600
    assert value(str(int(T_1000))) == T_1000
    assert value(f"'{T_1000}'") == T_1000
    flt = parse("NextRetryTime -lt '2026-11-29 10:00'", SCHEMA)
    assert flt.matches({"NextRetryTime": datetime.datetime(2026, 11, 29, 9, 59)})
    assert not flt.matches({"NextRetryTime": datetime.datetime(2026, 11, 29, 10, 0, tzinfo=UTC)})


def test_int_values() -> None:
    """int properties take bare, signed or quoted whole numbers."""
    assert py_ids(parse("MessageCount -ge '150'", SCHEMA), ROWS) == {0, 1}
    assert py_ids(parse("MessageCount -gt -1 -and MessageCount -lt 4", SCHEMA), ROWS) == {2}


def test_enum_members_compare_by_value() -> None:
    """An Enum in the props compares by its string value (or name for non-string values)."""

    class QueueStatus(enum.Enum):
        RETRY = "Retry"

    class Kind(enum.Enum):
        SMTP = 1

    assert parse("Status -eq 'retry'", SCHEMA).matches({"Status": QueueStatus.RETRY})
    assert parse("DeliveryType -eq 'smtp'", SCHEMA).matches({"DeliveryType": Kind.SMTP})


def test_properties_lists_canonical_names() -> None:
    """properties() names every property used, in schema spelling."""
    flt = parse("-not (recipients -eq 'a' -or status -eq $null) -and MESSAGECOUNT -gt 1", SCHEMA)
    assert properties(flt) == {"Recipients", "Status", "MessageCount"}


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Statuss -eq 'Retry'", "position 1: unknown property 'Statuss' (known: DeliveryType,"),
        ("Status -gtt 1", "position 8: expected an operator"),
        ("Status 'Retry'", "position 8: expected an operator"),
        ("Status -and Status -eq 'a'", "position 8: expected an operator"),
        ("Status -gt 'Retry'", "position 8: operator -gt cannot be used with enum property"),
        ("LastError -lt 'a'", "operator -lt cannot be used with string property 'LastError'"),
        ("MessageCount -like '1*'", "operator -like cannot be used with int property"),
        ("IsSuspended -gt $true", "operator -gt cannot be used with bool property"),
        ("Recipients -ge 'a'", "operator -ge cannot be used with list property"),
        ("Status -eq 'Retry", "position 12: unterminated string"),
        ('Status -eq "Retry', "position 12: unterminated string"),
        ("Status -eq 'Retry' Status", "position 20: unexpected 'Status'"),
        ("Status -eq 'a' -and", "position 20: expected a property name, '(' or -not, found the"),
        ("Status -eq 'a' & x", "position 16: unexpected character '&"),
        ("Status -eq", "position 11: unexpected end of the filter; expected a value after -eq"),
        ("Status", "position 7: expected an operator"),
        ("MessageCount -gt 'abc'", "position 18: 'abc' is not a whole number"),
        ("MessageCount -gt 1.5", "'1.5' is not a whole number"),
        ("MessageCount -gt 99999999999999999999", "is not a whole number"),
        ("NextRetryTime -lt 'tomorrow'", "'tomorrow' is not an ISO-8601 date-time or epoch"),
        ("IsSuspended -eq 'yes'", "'yes' is not $true or $false"),
        ("Status -eq $true", "'$true' is not a valid value for -eq with enum property"),
        ("Status -eq $nul", "unknown variable '$nul'"),
        ("MessageCount -gt $null", "$null can only be compared with -eq or -ne, not -gt"),
        ("Status -eq -eq", "'-eq' is not a valid value"),
        ("", "position 1: the filter is empty"),
        ("   ", "the filter is empty"),
        ("{ }", "the filter is empty"),
        ("{Status -eq 'a'", "position 16: missing '}' to close '{' at position 1"),
        ("Status -eq 'a'}", "position 15: unexpected character '}'"),
        ("(Status -eq 'a'", "position 16: missing ')' to close '(' at position 1"),
        ("(Status -eq 'a' Status", "missing ')' to close '(' at position 1, found 'Status'"),
        ("Status -eq 'a')", "position 15: ')' without a matching '('"),
        ("()", "position 2: expected a property name, '(' or -not, found ')'"),
    ],
)
def test_errors_name_problem_and_position(text: str, message: str) -> None:
    """Each malformed filter raises a one-line FilterError giving position and token."""
    with pytest.raises(FilterError) as caught:
        parse(text, SCHEMA)
    assert str(caught.value).startswith("filter error at position ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_filter_error_is_a_value_error() -> None:
    """Callers that catch ValueError also catch filter errors."""
    with pytest.raises(ValueError, match="unknown property"):
        parse("Nope -eq 1", SCHEMA)


def test_schema_with_unknown_type_is_rejected() -> None:
    """A schema naming a type outside the six supported ones is a caller bug: ValueError."""
    with pytest.raises(ValueError, match="unknown property types: {'Size': 'bytes'}"):
        parse("Size -gt 1", {"Size": "bytes"})  # type: ignore[dict-item]


# --------------------------------------------------------------------------- SQL vs Python

# Characters chosen to hit LIKE metacharacters, the escape character, quotes, ASCII case
# folding and non-ASCII letters that must not fold.
TEXT = st.text(alphabet="aAbB%_\\*?' éÉ", max_size=4)
TEXT_PROPS = ["Status", "DeliveryType", "FromAddress", "LastError"]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _comparisons() -> st.SearchStrategy[str]:
    text_ops = st.sampled_from(["-eq", "-ne", "-like", "-notlike", "-contains"])
    number_ops = st.sampled_from(["-eq", "-ne", "-gt", "-ge", "-lt", "-le"])
    return st.one_of(
        st.builds(
            lambda p, o, v: f"{p} {o} {_quote(v)}", st.sampled_from(TEXT_PROPS), text_ops, TEXT
        ),
        st.builds(lambda o, n: f"MessageCount {o} {n}", number_ops, st.integers(-2, 2)),
        st.builds(lambda o, n: f"NextRetryTime {o} {n}", number_ops, st.integers(0, 3)),
        st.builds(lambda o, v: f"IsSuspended {o} {v}", st.sampled_from(["-eq", "-ne"]),
                  st.sampled_from(["$true", "$false"])),
        st.builds(lambda p, o: f"{p} {o} $null", st.sampled_from(list(COLUMNS)),
                  st.sampled_from(["-eq", "-ne"])),
    )


FILTERS = st.recursive(
    _comparisons(),
    lambda inner: st.one_of(
        st.builds(lambda a, b: f"{a} -and {b}", inner, inner),
        st.builds(lambda a, b: f"{a} -or {b}", inner, inner),
        st.builds(lambda a: f"({a})", inner),
        st.builds(lambda a: f"-not ({a})", inner),
    ),
    max_leaves=6,
)
ROW = st.fixed_dictionaries(
    {
        **{prop: st.none() | TEXT for prop in TEXT_PROPS},
        "MessageCount": st.none() | st.integers(-3, 3),
        "NextRetryTime": st.none() | st.sampled_from([0.0, 1.0, 1.5, 2.0, 3.0]),
        "IsSuspended": st.none() | st.booleans(),
    }
)


@settings(max_examples=300, deadline=None)
@given(FILTERS, st.lists(ROW, min_size=1, max_size=6))
def test_sql_and_python_agree(text: str, rows: list[dict[str, object]]) -> None:
    """For generated filters and rows, SQLite running to_sql selects what matches() accepts."""
    conn = sqlite3.connect(":memory:")
    try:
        fill(conn, rows)
        flt = parse(text, SCHEMA)
        assert sql_ids(conn, flt) == py_ids(flt, rows)
    finally:
        conn.close()


@given(FILTERS, ROW)
def test_negative_operators_negate(text: str, row: dict[str, object]) -> None:
    """-not (F) is exactly the opposite of F, null properties included."""
    assert parse(f"-not ({text})", SCHEMA).matches(row) != parse(text, SCHEMA).matches(row)
