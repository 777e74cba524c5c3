"""Sizes and durations as administrators type them, and Exchange-style display.

PRODUCT §4.2: "Sizes take 64KB, 10MB, 1GB, a byte count, or unlimited. Durations take
Exchange's d.hh:mm:ss and short forms 30s, 5m, 4h, 2d." The CLI, the config file and the
API all parse through here, and ``get`` output formats through here, so what is printed can
always be typed back in (``parse_size(format_size(n)) == n``, and the same for durations).

Every rejection is a :class:`UnitError` (a :class:`ValueError`) whose message is one line
showing the accepted forms.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Final, TypeVar

__all__ = [
    "MAX_SIZE",
    "UnitError",
    "check_range",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
    "seconds_shown",
]

# Sizes are stored as SQLite INTEGERs, which are signed 64-bit.
MAX_SIZE: Final = 2**63 - 1

_SIZE_UNITS: Final = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
# Largest first, for format_size.
_SIZE_UNITS_DESCENDING: Final = sorted(_SIZE_UNITS.items(), key=lambda item: -item[1])
# re.ASCII everywhere: under Unicode case folding "K" would match the Kelvin sign and "s"
# the long s, which then miss the unit tables.
_SIZE_RE: Final = re.compile(r"([0-9]+)(?:\.([0-9]+))?\s*([KMGT]?B)?", re.IGNORECASE | re.ASCII)
# Exchange's display form "10 MB (10,485,760 bytes)": the byte count in parentheses is exact,
# the part before it may be rounded, so only the parentheses are read.
_DISPLAY_RE: Final = re.compile(
    r"[^()]*\(\s*([0-9]{1,3}(?:,[0-9]{3})*|[0-9]+)\s*bytes?\s*\)", re.IGNORECASE | re.ASCII
)
_SIZE_FORMS: Final = (
    "use a byte count, a number with B, KB, MB, GB or TB (e.g. 64KB, 10MB, 1.5GB), or 'unlimited'"
)

_DURATION_UNITS: Final = {
    "ms": datetime.timedelta(milliseconds=1),
    "s": datetime.timedelta(seconds=1),
    "m": datetime.timedelta(minutes=1),
    "h": datetime.timedelta(hours=1),
    "d": datetime.timedelta(days=1),
}
_SHORT_DURATION_RE: Final = re.compile(r"([0-9]+)\s*(ms|s|m|h|d)", re.IGNORECASE | re.ASCII)
# .NET TimeSpan "c" format, which is what Exchange prints and accepts: [d.]hh:mm:ss[.fffffff].
_TIMESPAN_RE: Final = re.compile(
    r"(?:([0-9]+)\.)?([0-9]{1,2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,7}))?"
)
_DURATION_FORMS: Final = (
    "use d.hh:mm:ss, hh:mm:ss, or a number with ms, s, m, h or d (e.g. 30s, 5m, 4h, 2d)"
)
# timedelta's own limit.
_MAX_DAYS: Final = 999_999_999
# Enough digits for any valid value; longer numbers are refused before int() sees them.
_MAX_DIGITS: Final = 30


class UnitError(ValueError):
    """A size, duration or range was refused. ``str(error)`` is one line for an administrator."""


def _show(text: str, limit: int = 60) -> str:
    """Quote *text* for an error message: escaped (one line) and bounded."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def parse_size(text: str) -> int | None:
    """Parse a size into bytes; None means unlimited.

    Accepted (case-insensitive, surrounding whitespace ignored): ``unlimited``; a byte count
    ``65536``; a number and a 1024-based unit ``64KB``, ``100 MB``, ``1GB``, ``2TB``, ``10B``;
    a decimal fraction with a unit larger than B, rounded down to whole bytes (``1.5MB`` is
    1,572,864); Exchange's display form ``10 MB (10,485,760 bytes)``, read from the byte count
    in parentheses. Refused with :class:`UnitError`: negative numbers, fractional bytes
    (``1.5`` or ``1.5B``), thousands separators outside the parentheses (``1,5MB`` means
    different things in different locales), sizes above 2**63-1 bytes, anything else.
    """
    stripped = text.strip()
    if stripped.casefold() == "unlimited":
        return None
    shown = _show(text)
    if stripped.startswith("-"):
        raise UnitError(f"{shown} is not a valid size: sizes cannot be negative")
    display = _DISPLAY_RE.fullmatch(stripped)
    if display is not None:
        digits = display.group(1).replace(",", "")
        return _bounded_size(shown, digits, Fraction(1))
    match = _SIZE_RE.fullmatch(stripped)
    if match is None:
        raise UnitError(f"{shown} is not a valid size: {_SIZE_FORMS}")
    whole, fraction, unit = match.groups()
    multiplier = _SIZE_UNITS[(unit or "B").upper()]
    if fraction is not None:
        if multiplier == 1:
            raise UnitError(f"{shown} is not a valid size: a byte count must be a whole number")
        if len(fraction) > _MAX_DIGITS:
            raise UnitError(f"{shown} is not a valid size: too many decimal places")
        return _bounded_size(shown, whole, Fraction(multiplier), fraction)
    return _bounded_size(shown, whole, Fraction(multiplier))


def _bounded_size(shown: str, whole: str, multiplier: Fraction, fraction: str | None = None) -> int:
    """``whole[.fraction] * multiplier`` rounded down, refusing values above MAX_SIZE."""
    if len(whole) > _MAX_DIGITS:
        raise UnitError(f"{shown} is not a valid size: larger than {MAX_SIZE:,} bytes")
    number = Fraction(int(whole))
    if fraction is not None:
        number += Fraction(int(fraction), 10 ** len(fraction))
    size = int(number * multiplier)  # int() of a non-negative Fraction rounds down
    if size > MAX_SIZE:
        raise UnitError(f"{shown} is not a valid size: larger than {MAX_SIZE:,} bytes")
    return size


def format_size(n: int | None) -> str:
    """Exchange display form: ``unlimited`` or ``10 MB (10,485,760 bytes)``.

    The unit is the largest of TB, GB, MB, KB that divides *n* exactly, else B
    (``1,234 B (1,234 bytes)``; zero is ``0 B (0 bytes)``). Raises :class:`UnitError` for a
    negative size.
    """
    if n is None:
        return "unlimited"
    if n < 0:
        raise UnitError(f"{n} is not a valid size: sizes cannot be negative")
    for unit, multiplier in _SIZE_UNITS_DESCENDING:
        if multiplier == 1 or (n and n % multiplier == 0):
            return f"{n // multiplier:,} {unit} ({n:,} bytes)"
    raise AssertionError("unreachable: B divides every size")  # pragma: no cover


def parse_duration(text: str) -> datetime.timedelta:
    """Parse a duration.

    Accepted (surrounding whitespace ignored): Exchange's ``d.hh:mm:ss`` and ``hh:mm:ss``
    (hours 0-23, minutes and seconds 0-59, an optional fraction of a second ``.fffffff`` so
    that :func:`format_duration` output reads back; digits beyond microseconds are
    truncated), and the short
    forms ``500ms``, ``30s``, ``5m``, ``4h``, ``2d`` (whole numbers, unit case-insensitive,
    ``m`` is minutes). Refused with :class:`UnitError`: negative values, values beyond
    999,999,999 days, anything else; the message lists the accepted forms.
    """
    stripped = text.strip()
    shown = _show(text)
    if stripped.startswith("-"):
        raise UnitError(f"{shown} is not a valid duration: durations cannot be negative")
    short = _SHORT_DURATION_RE.fullmatch(stripped)
    if short is not None:
        number, unit = short.groups()
        if len(number) > _MAX_DIGITS:
            raise UnitError(f"{shown} is not a valid duration: too long")
        try:
            return int(number) * _DURATION_UNITS[unit.lower()]
        except OverflowError:
            raise UnitError(
                f"{shown} is not a valid duration: longer than {_MAX_DAYS:,} days"
            ) from None
    span = _TIMESPAN_RE.fullmatch(stripped)
    if span is None:
        raise UnitError(f"{shown} is not a valid duration: {_DURATION_FORMS}")
    days_text, hours_text, minutes_text, seconds_text, fraction = span.groups()
    days = 0
    if days_text is not None:
        # Refuse by length first so int() never sees thousands of digits.
        if len(days_text) > len(str(_MAX_DAYS)) or int(days_text) > _MAX_DAYS:
            raise UnitError(f"{shown} is not a valid duration: longer than {_MAX_DAYS:,} days")
        days = int(days_text)
    hours, minutes, seconds = int(hours_text), int(minutes_text), int(seconds_text)
    if hours > 23 or minutes > 59 or seconds > 59:
        raise UnitError(
            f"{shown} is not a valid duration: hours must be 0-23 and minutes and seconds 0-59 "
            "(write 1.02:00:00 for 26 hours)"
        )
    # Seven digits are .NET ticks (100 ns); timedelta keeps microseconds, so drop the last.
    microseconds = int((fraction or "").ljust(7, "0")[:6])
    try:
        return datetime.timedelta(
            days=days, hours=hours, minutes=minutes, seconds=seconds, microseconds=microseconds
        )
    except OverflowError:
        raise UnitError(
            f"{shown} is not a valid duration: longer than {_MAX_DAYS:,} days"
        ) from None


def format_duration(td: datetime.timedelta) -> str:
    """Exchange display form ``[d.]hh:mm:ss[.fffffff]``: ``2.00:00:00``, ``04:00:00``.

    The day part appears only when non-zero, and the seven-digit fraction only when there
    are microseconds. A negative duration is shown with a leading '-' (as .NET does) rather
    than refused, because this is for display.
    """
    sign = "-" if td < datetime.timedelta(0) else ""
    td = abs(td)
    hours, remainder = divmod(td.seconds, 3600)
    minutes, seconds = divmod(remainder, 60)
    text = f"{hours:02d}:{minutes:02d}:{seconds:02d}"
    if td.days:
        text = f"{td.days}.{text}"
    if td.microseconds:
        text = f"{text}.{td.microseconds:06d}0"
    return sign + text


def seconds_shown(seconds: float) -> str:
    """A duration given in seconds, shown as format_duration does."""
    return format_duration(datetime.timedelta(seconds=seconds))


_Value = TypeVar("_Value", int, float, datetime.timedelta)


def check_range(
    name: str,
    value: _Value,
    low: _Value,
    high: _Value,
    fmt: Callable[[_Value], str] | None = None,
) -> _Value:
    """Return *value* if ``low <= value <= high``, else raise :class:`UnitError`.

    The message names the setting: ``--poison-threshold must be between 1 and 10 (got 11)``.
    Durations are shown with :func:`format_duration`; pass *fmt* for other display forms
    (``fmt=format_size`` for sizes).
    """
    if low <= value <= high:
        return value
    if fmt is None:
        if isinstance(value, datetime.timedelta):
            show: Callable[[_Value], str] = format_duration
        else:
            show = str
    else:
        show = fmt
    raise UnitError(f"{name} must be between {show(low)} and {show(high)} (got {show(value)})")
