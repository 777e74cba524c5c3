"""Tests for mailgate.core.units: sizes, durations and range checks."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.core.units import (
    MAX_SIZE,
    UnitError,
    check_range,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

KB, MB, GB, TB = 1024, 1024**2, 1024**3, 1024**4
td = datetime.timedelta


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unlimited", None),
        ("Unlimited", None),
        ("  UNLIMITED ", None),
        ("0", 0),
        ("65536", 65536),
        ("10B", 10),
        ("64KB", 64 * KB),
        ("64kb", 64 * KB),
        ("64 kB", 64 * KB),
        ("10MB", 10 * MB),
        ("100 MB", 100 * MB),
        ("1GB", GB),
        ("2 tb", 2 * TB),
        ("1.5MB", MB + MB // 2),
        ("0.5KB", 512),
        ("1.0000001KB", 1024),  # rounded down to whole bytes
        ("10 MB (10,485,760 bytes)", 10 * MB),
        ("64 KB (65,536 bytes)", 64 * KB),
        ("1,234 B (1,234 bytes)", 1234),
        ("0 B (0 bytes)", 0),
        ("1 B (1 byte)", 1),
        ("1.5 MB (1572864 bytes)", 1572864),
        ("9223372036854775807", MAX_SIZE),
        ("10MB\n", 10 * MB),  # surrounding whitespace, a line end included, is ignored
    ],
)
def test_parse_size(text: str, expected: int | None) -> None:
    """Sizes accept unlimited, byte counts, 1024-based units and Exchange's display form."""
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "use a byte count"),
        ("abc", "use a byte count"),
        ("-1", "negative"),
        ("-5MB", "negative"),
        ("1.5", "whole number"),
        ("1.5B", "whole number"),
        ("10 XB", "use a byte count"),
        ("10MiB", "use a byte count"),
        ("1,5MB", "use a byte count"),
        ("10,485,760", "use a byte count"),
        ("MB", "use a byte count"),
        (".5MB", "use a byte count"),
        ("1e6", "use a byte count"),
        ("\uff11\uff10MB", "use a byte count"),  # full-width digits
        ("10\x00MB", "use a byte count"),
        ("10 MB (10,48,5760 bytes)", "use a byte count"),
        ("9223372036854775808", "larger than"),
        ("8388608TB", "larger than"),
        ("9" * 5000, "larger than"),
        ("unlimitedx", "use a byte count"),
        ("5\u212aB", "use a byte count"),  # Kelvin sign, which folds to "k"
    ],
)
def test_parse_size_refuses(text: str, reason: str) -> None:
    """Negative, fractional-byte, locale-ambiguous, oversized and garbage sizes are errors."""
    with pytest.raises(UnitError) as info:
        parse_size(text)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (None, "unlimited"),
        (0, "0 B (0 bytes)"),
        (1234, "1,234 B (1,234 bytes)"),
        (64 * KB, "64 KB (65,536 bytes)"),
        (10 * MB, "10 MB (10,485,760 bytes)"),
        (MB + MB // 2, "1,536 KB (1,572,864 bytes)"),
        (GB, "1 GB (1,073,741,824 bytes)"),
        (2048 * TB, "2,048 TB (2,251,799,813,685,248 bytes)"),
    ],
)
def test_format_size(size: int | None, expected: str) -> None:
    """format_size uses the largest unit that divides evenly, Exchange style."""
    assert format_size(size) == expected


def test_format_size_refuses_negative() -> None:
    """A negative size cannot be formatted."""
    with pytest.raises(UnitError):
        format_size(-1)


@given(st.one_of(st.none(), st.integers(min_value=0, max_value=MAX_SIZE)))
def test_size_round_trip(size: int | None) -> None:
    """Whatever format_size prints, parse_size reads back to the same value."""
    assert parse_size(format_size(size)) == size


@given(st.text(max_size=60))
def test_parse_size_raises_only_unit_error(text: str) -> None:
    """On arbitrary text parse_size returns a non-negative int or None, or raises UnitError."""
    try:
        size = parse_size(text)
    except UnitError as error:
        assert "\n" not in str(error)
    else:
        assert size is None or 0 <= size <= MAX_SIZE


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", td(seconds=30)),
        ("5m", td(minutes=5)),
        ("4h", td(hours=4)),
        ("2d", td(days=2)),
        ("500ms", td(milliseconds=500)),
        ("5M", td(minutes=5)),
        (" 10 s ", td(seconds=10)),
        ("0s", td(0)),
        ("2.00:00:00", td(days=2)),
        ("1.02:03:04", td(days=1, hours=2, minutes=3, seconds=4)),
        ("04:00:00", td(hours=4)),
        ("00:05:00", td(minutes=5)),
        ("00:00:01", td(seconds=1)),
        ("4:00:00", td(hours=4)),
        ("23:59:59", td(hours=23, minutes=59, seconds=59)),
        ("00:00:00.5", td(milliseconds=500)),
        ("00:00:00.1234567", td(microseconds=123456)),
        ("999999999d", td(days=999_999_999)),
        ("5m\r\n", td(minutes=5)),  # surrounding whitespace, a line end included, is ignored
    ],
)
def test_parse_duration(text: str, expected: datetime.timedelta) -> None:
    """Durations accept Exchange's [d.]hh:mm:ss and the short forms ms, s, m, h, d."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "d.hh:mm:ss"),
        ("abc", "d.hh:mm:ss"),
        ("-5m", "negative"),
        ("-1.00:00:00", "negative"),
        ("5", "d.hh:mm:ss"),
        ("5 minutes", "d.hh:mm:ss"),
        ("1.5h", "d.hh:mm:ss"),
        ("04:00", "d.hh:mm:ss"),
        ("24:00:00", "hours must be 0-23"),
        ("00:60:00", "minutes and seconds 0-59"),
        ("00:00:60", "minutes and seconds 0-59"),
        ("1.24:00:00", "hours must be 0-23"),
        ("100:00:00", "d.hh:mm:ss"),
        ("00:00:00.12345678", "d.hh:mm:ss"),
        ("1000000000d", "999,999,999 days"),
        ("1000000000.00:00:00", "999,999,999 days"),
        ("9" * 5000 + "s", "too long"),
        ("9" * 40 + ".00:00:00", "999,999,999 days"),
        ("\uff15m", "d.hh:mm:ss"),  # full-width digit
        ("5\u017f", "d.hh:mm:ss"),  # long s, which folds to "s"
    ],
)
def test_parse_duration_refuses(text: str, reason: str) -> None:
    """Negative, out-of-range and garbage durations are errors that list the accepted forms."""
    with pytest.raises(UnitError) as info:
        parse_duration(text)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_duration_error_lists_accepted_forms() -> None:
    """The error for garbage shows every accepted form."""
    with pytest.raises(UnitError) as info:
        parse_duration("soon")
    assert str(info.value) == (
        "'soon' is not a valid duration: use d.hh:mm:ss, hh:mm:ss, or a number with ms, s, m, "
        "h or d (e.g. 30s, 5m, 4h, 2d)"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (td(days=2), "2.00:00:00"),
        (td(hours=4), "04:00:00"),
        (td(minutes=5), "00:05:00"),
        (td(seconds=1), "00:00:01"),
        (td(0), "00:00:00"),
        (td(days=1, hours=2, minutes=3, seconds=4), "1.02:03:04"),
        (td(milliseconds=500), "00:00:00.5000000"),
        (td(minutes=-5), "-00:05:00"),
    ],
)
def test_format_duration(value: datetime.timedelta, expected: str) -> None:
    """format_duration prints Exchange's [d.]hh:mm:ss[.fffffff]."""
    assert format_duration(value) == expected


@given(st.timedeltas(min_value=td(0)))
def test_duration_round_trip(value: datetime.timedelta) -> None:
    """Whatever format_duration prints for a non-negative duration, parse_duration reads back."""
    assert parse_duration(format_duration(value)) == value


@given(st.text(max_size=40))
def test_parse_duration_raises_only_unit_error(text: str) -> None:
    """On arbitrary text parse_duration returns a non-negative timedelta or raises UnitError."""
    try:
        value = parse_duration(text)
    except UnitError as error:
        assert "\n" not in str(error)
    else:
        assert value >= td(0)


# --------------------------------------------------------------------------- check_range


def test_check_range_returns_value_in_range() -> None:
    """A value inside the range (bounds included) is returned unchanged."""
    assert check_range("--poison-threshold", 1, 1, 10) == 1
    assert check_range("--poison-threshold", 10, 1, 10) == 10
    assert check_range("--x", td(hours=1), td(0), td(days=1)) == td(hours=1)


def test_check_range_message() -> None:
    """An out-of-range integer names the option, the range and the value."""
    with pytest.raises(UnitError) as info:
        check_range("--poison-threshold", 11, 1, 10)
    assert str(info.value) == "--poison-threshold must be between 1 and 10 (got 11)"


def test_check_range_formats_durations() -> None:
    """Durations in the message are in Exchange's d.hh:mm:ss form."""
    with pytest.raises(UnitError) as info:
        check_range("--message-expiration-timeout", td(days=91), td(seconds=5), td(days=90))
    assert str(info.value) == (
        "--message-expiration-timeout must be between 00:00:05 and 90.00:00:00 (got 91.00:00:00)"
    )


def test_check_range_custom_format() -> None:
    """A formatter such as format_size can be passed for other units."""
    with pytest.raises(UnitError) as info:
        check_range("--max-message-size", 1000, 65536, 2 * GB, fmt=format_size)
    assert str(info.value) == (
        "--max-message-size must be between 64 KB (65,536 bytes) and "
        "2 GB (2,147,483,648 bytes) (got 1,000 B (1,000 bytes))"
    )
