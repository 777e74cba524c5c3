"""Click parameter types for Exchange-style values (PRODUCT §4.2): booleans true|false,
sizes (64KB, 10MB, unlimited), durations (d.hh:mm:ss, 30s, 5m, 4h, 2d)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from mailgate.core.units import UnitError, parse_duration, parse_size


@dataclass(frozen=True)
class Given:
    """A value the user gave explicitly (so 'unlimited' = None differs from 'not given')."""

    value: Any


class BoolType(click.ParamType):
    name = "true|false"

    def convert(self, value: Any, param: Any, ctx: Any) -> bool:
        if isinstance(value, bool):
            return value
        # true|false, and PowerShell's $true|$false for pasted Exchange commands.
        text = str(value).strip().lower()
        if text in ("true", "$true"):
            return True
        if text in ("false", "$false"):
            return False
        self.fail(f"'{value}' is not true or false", param, ctx)


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> Given:
        if isinstance(value, Given):
            return value
        try:
            return Given(parse_size(str(value)))
        except UnitError as exc:
            self.fail(str(exc), param, ctx)


class DurationType(click.ParamType):
    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value)).total_seconds()
        except UnitError as exc:
            self.fail(str(exc), param, ctx)


class CountType(click.ParamType):
    """An integer, or 'unlimited' (None) where the setting allows it."""

    name = "number|unlimited"

    def convert(self, value: Any, param: Any, ctx: Any) -> Given:
        if isinstance(value, Given):
            return value
        text = str(value).strip()
        if text.lower() == "unlimited":
            return Given(None)
        try:
            return Given(int(text))
        except ValueError:
            self.fail(f"'{value}' is not a whole number or 'unlimited'", param, ctx)


class PathOrNull(click.ParamType):
    """A path, or '$null' / '' to disable (Exchange's -PickupDirectoryPath $null)."""

    name = "path|$null"

    def convert(self, value: Any, param: Any, ctx: Any) -> Given:
        if isinstance(value, Given):
            return value
        text = str(value)
        if text == "" or text.strip().lower() == "$null":
            return Given(None)
        if not text.strip() or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
            self.fail(f"'{text}' is not a path (use '$null' to disable)", param, ctx)
        return Given(text.strip())


class ResultSizeType(click.ParamType):
    name = "count|unlimited"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | None:
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text == "unlimited":
            return None
        if text.isdigit() and int(text) > 0:
            return int(text)
        self.fail(f"'{value}' is not a positive number or 'unlimited'", param, ctx)


BOOL = BoolType()
SIZE = SizeType()
DURATION = DurationType()
COUNT = CountType()
PATH_OR_NULL = PathOrNull()
RESULT_SIZE = click.option("--result-size", type=ResultSizeType(), default=1000,
                           show_default=True, help="Most objects to show, or unlimited.")
