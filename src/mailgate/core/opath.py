"""Exchange OPATH ``-Filter`` expressions, as Get-Queue and Get-Message take them.

Contract:

* :func:`parse` turns text such as ``MessageCount -gt 100 -and Status -ne 'Suspended'`` into
  an immutable :class:`Filter`, checking every property name and value against a caller's
  :data:`Schema`. Any problem raises :class:`FilterError`, whose one-line message gives the
  1-based character position in the text as written and the offending token.
* Grammar: ``or := and (-or and)*``, ``and := unary (-and unary)*``,
  ``unary := -not unary | '(' or ')' | Property -op value``. A whole filter may be wrapped
  in ``{ }`` (scriptblock style). Keywords, operators, property names and ``$true``,
  ``$false``, ``$null`` are case-insensitive.
* Operators: -eq -ne (every type); -gt -ge -lt -le (int, datetime); -like -notlike
  -contains (string, enum, list). In -like patterns ``*`` is any run of characters and
  every other character, ``?`` included, is literal. -contains is a substring test.
* Values: 'single' or "double" quoted strings (a doubled quote is a literal one), bare
  numbers, ``$true``, ``$false``, ``$null``. int takes whole numbers (bare or quoted);
  datetime takes ISO-8601 (naive means UTC) or a POSIX epoch and compares as epoch seconds;
  bool takes $true/$false or 'true'/'false'. ``$null`` only goes with -eq/-ne.
* String comparison folds ASCII letters only, which is exactly what SQLite's NOCASE and
  LIKE do, so :meth:`Filter.matches` and :meth:`Filter.to_sql` give the same answers.
* A missing or None property (or an empty list) is null: ``-eq $null`` is true for it and
  every other comparison is false, while each negative operator (-ne, -notlike) is exactly
  the negation of its positive one. A list property matches when ANY element matches, so
  ``Recipients -ne 'a'`` means "no recipient is 'a'".
"""

from __future__ import annotations

import datetime
import enum
import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

__all__ = [
    "And", "Comparison", "Filter", "FilterError", "Not", "Or", "PropType", "Schema", "Value",
    "parse", "properties",
]

PropType: TypeAlias = Literal["string", "int", "datetime", "bool", "enum", "list"]
Schema: TypeAlias = Mapping[str, PropType]
Value: TypeAlias = str | int | float | bool | None

_TEXT_KINDS: Final = frozenset({"string", "enum", "list"})
_NUMBER_OPS: Final = ("eq", "ne", "gt", "ge", "lt", "le")
_TEXT_OPS: Final = ("eq", "ne", "like", "notlike", "contains")
# Ordering strings is refused: NOCASE and Python would order non-ASCII text differently.
_ALLOWED_OPS: Final[Mapping[str, tuple[str, ...]]] = {
    "string": _TEXT_OPS, "enum": _TEXT_OPS, "list": _TEXT_OPS,
    "int": _NUMBER_OPS, "datetime": _NUMBER_OPS, "bool": ("eq", "ne"),
}
_ALL_OPS: Final = _NUMBER_OPS + _TEXT_OPS[2:]
# Negative operators are evaluated as NOT(positive), in Python and in SQL alike.
_POSITIVE: Final = {"ne": "eq", "notlike": "like"}
_COMPARE: Final[Mapping[str, Callable[[Any, Any], bool]]] = {
    "eq": operator.eq, "gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le,
}
_SQL_OP: Final = {"eq": "=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_INT64: Final = 2**63  # SQLite INTEGER range; larger values could not be bound as parameters
_NUMBER_RE: Final = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")
_TOKEN_RE: Final = re.compile(
    r"(?P<ws>\s+)|(?P<lparen>\()|(?P<rparen>\))|(?P<number>-?[0-9]+(?:\.[0-9]+)?)"
    r"|(?P<op>-[A-Za-z]+)|(?P<var>\$[A-Za-z_][A-Za-z0-9_]*)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<string>'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\")"
)


class FilterError(ValueError):
    """A filter that cannot be parsed; the message is one line naming position and token."""


def _fold(text: str) -> str:
    return text.translate(_ASCII_LOWER)


def _text(value: object) -> str:
    """A string/enum/list element as text; Enum members compare by their string value."""
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value.value, str) else value.name
    return str(value)


def _number(value: object, kind: str) -> float | int:
    if isinstance(value, datetime.datetime) and kind == "datetime":
        aware = value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)
        return aware.timestamp()
    if isinstance(value, (int, float)):
        return value
    raise TypeError(f"{kind} property holds {type(value).__name__} {value!r}")


def _like_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class Filter(ABC):
    """A parsed filter: an immutable tree of :class:`Comparison`, :class:`Not`, :class:`And`
    and :class:`Or` nodes."""

    @abstractmethod
    def matches(self, props: Mapping[str, object]) -> bool:
        """Evaluate against ``props`` keyed by canonical names (missing key = None).

        Values must have the schema's type (int: a number; datetime: epoch seconds or a
        ``datetime``, naive = UTC; bool: a bool; list: an iterable of strings); a non-number
        for int/datetime or a non-iterable for list raises TypeError.
        """

    @abstractmethod
    def to_sql(self, columns: Mapping[str, str]) -> tuple[str, list[object]] | None:
        """A SQLite WHERE fragment with ``?`` parameters that selects exactly the rows
        :meth:`matches` accepts, or None when a property is a list or has no entry in
        ``columns`` (canonical name -> SQL expression): the caller then filters in Python.
        Columns are expected to hold TEXT for string/enum, INTEGER for int, epoch seconds for
        datetime and 0/1 for bool; the fragment relies on SQLite's default
        ``case_sensitive_like = OFF``."""


@dataclass(frozen=True)
class Comparison(Filter):
    """``prop -op value``; ``prop`` is the schema's canonical name, ``value`` is converted
    to the property's type (datetime as epoch seconds) and None stands for ``$null``."""

    prop: str
    kind: PropType
    op: str
    value: Value

    def _test(self, item: object, op: str) -> bool:
        if self.kind in _TEXT_KINDS:
            have, want = _fold(_text(item)), _fold(str(self.value))
            if op == "eq":
                return have == want
            if op == "like":
                return _like_regex(want).fullmatch(have) is not None
            return want in have
        if self.kind == "bool":
            return bool(item) == self.value
        return _COMPARE[op](_number(item, self.kind), self.value)

    def matches(self, props: Mapping[str, object]) -> bool:
        raw = props.get(self.prop)
        items: list[object] = [raw] if raw is not None else []
        if self.kind == "list" and raw is not None:
            if not isinstance(raw, Iterable) or isinstance(raw, str):
                raise TypeError(f"list property {self.prop!r} holds {raw!r}")
            items = list(raw)
        if self.value is None:
            return (not items) == (self.op == "eq")
        op = _POSITIVE.get(self.op, self.op)
        found = any(self._test(item, op) for item in items)
        return found != (op != self.op)

    def to_sql(self, columns: Mapping[str, str]) -> tuple[str, list[object]] | None:
        if self.kind == "list" or self.prop not in columns:
            return None
        col = f"({columns[self.prop]})"
        if self.value is None:
            return f"{col} IS {'' if self.op == 'eq' else 'NOT '}NULL", []
        op = _POSITIVE.get(self.op, self.op)
        param: object = self.value
        if self.kind in _TEXT_KINDS and op == "eq":
            test = f"{col} = ? COLLATE NOCASE"
        elif self.kind in _TEXT_KINDS:
            text = str(self.value)
            param = ("%" + _like_escape(text) + "%" if op == "contains"
                     else "%".join(_like_escape(part) for part in text.split("*")))
            test = f"{col} LIKE ? ESCAPE '\\'"
        else:
            test = f"{col} {_SQL_OP[op]} ?"
        # The IS NOT NULL guard makes the atom 0 rather than NULL for a null column, so NOT
        # and -ne behave as two-valued logic, as matches() does.
        sql = f"({col} IS NOT NULL AND {test})"
        return (f"NOT {sql}" if op != self.op else sql), [param]


@dataclass(frozen=True)
class Not(Filter):
    """``-not operand``."""

    operand: Filter

    def matches(self, props: Mapping[str, object]) -> bool:
        return not self.operand.matches(props)

    def to_sql(self, columns: Mapping[str, str]) -> tuple[str, list[object]] | None:
        inner = self.operand.to_sql(columns)
        return None if inner is None else (f"(NOT {inner[0]})", inner[1])


def _join_sql(parts: tuple[Filter, ...], word: str,
              columns: Mapping[str, str]) -> tuple[str, list[object]] | None:
    sqls: list[str] = []
    params: list[object] = []
    for part in parts:
        sql = part.to_sql(columns)
        if sql is None:
            return None
        sqls.append(sql[0])
        params.extend(sql[1])
    return "(" + f" {word} ".join(sqls) + ")", params


@dataclass(frozen=True)
class And(Filter):
    """All of ``operands`` (two or more)."""

    operands: tuple[Filter, ...]

    def matches(self, props: Mapping[str, object]) -> bool:
        return all(operand.matches(props) for operand in self.operands)

    def to_sql(self, columns: Mapping[str, str]) -> tuple[str, list[object]] | None:
        return _join_sql(self.operands, "AND", columns)


@dataclass(frozen=True)
class Or(Filter):
    """Any of ``operands`` (two or more)."""

    operands: tuple[Filter, ...]

    def matches(self, props: Mapping[str, object]) -> bool:
        return any(operand.matches(props) for operand in self.operands)

    def to_sql(self, columns: Mapping[str, str]) -> tuple[str, list[object]] | None:
        return _join_sql(self.operands, "OR", columns)


def properties(node: Filter) -> set[str]:
    """The canonical names of every property ``node`` mentions."""
    if isinstance(node, Comparison):
        return {node.prop}
    if isinstance(node, Not):
        return properties(node.operand)
    if isinstance(node, (And, Or)):
        return set().union(*(properties(operand) for operand in node.operands))
    raise TypeError(f"not a filter node: {node!r}")


@dataclass(frozen=True)
class _Token:
    kind: str  # a _TOKEN_RE group name, or "end"
    text: str  # as written
    pos: int  # 0-based offset in the original text


def _describe(token: _Token) -> str:
    return "the end of the filter" if token.kind == "end" else repr(token.text)


def _error(token: _Token, message: str) -> FilterError:
    return FilterError(f"filter error at position {token.pos + 1}: {message}")


def _tokenize(text: str) -> list[_Token]:
    start, end = 0, len(text)
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start < end and text[start] == "{":
        if text[end - 1] != "}":
            brace = f"missing '}}' to close '{{' at position {start + 1}"
            raise _error(_Token("end", "", end), brace)
        start, end = start + 1, end - 1
    tokens: list[_Token] = []
    pos = start
    while pos < end:
        found = _TOKEN_RE.match(text, pos, end)
        if found is None or found.lastgroup is None:
            what = "unterminated string" if text[pos] in "'\"" else "unexpected character"
            raise _error(_Token("char", text[pos], pos), f"{what} {text[pos:pos + 20]!r}")
        if found.lastgroup != "ws":
            tokens.append(_Token(found.lastgroup, found.group(), pos))
        pos = found.end()
    if not tokens:
        raise FilterError("filter error at position 1: the filter is empty")
    tokens.append(_Token("end", "", end))
    return tokens


def _parse_datetime(text: str) -> float | None:
    text = text.strip()
    if _NUMBER_RE.fullmatch(text):
        return float(text)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)).timestamp()


class _Parser:
    def __init__(self, tokens: list[_Token], schema: Schema) -> None:
        self.tokens, self.index, self.schema = tokens, 0, schema
        bad = {name: kind for name, kind in schema.items() if kind not in _ALLOWED_OPS}
        if bad:  # a programming error in the caller, so not a FilterError
            raise ValueError(f"schema has unknown property types: {bad}")
        self.names = {_fold(name): name for name in schema}

    def next(self) -> _Token:
        token = self.tokens[self.index]
        self.index = min(self.index + 1, len(self.tokens) - 1)
        return token

    def at_keyword(self, word: str) -> bool:
        token = self.tokens[self.index]
        return token.kind == "op" and _fold(token.text) == "-" + word

    def parse(self) -> Filter:
        node = self.either()
        token = self.next()
        if token.kind == "rparen":
            raise _error(token, "')' without a matching '('")
        if token.kind != "end":
            raise _error(token, f"unexpected {_describe(token)}; expected -and, -or or the end")
        return node

    def either(self) -> Filter:
        parts = [self.both()]
        while self.at_keyword("or"):
            self.next()
            parts.append(self.both())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def both(self) -> Filter:
        parts = [self.unary()]
        while self.at_keyword("and"):
            self.next()
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def unary(self) -> Filter:
        if self.at_keyword("not"):
            self.next()
            return Not(self.unary())
        token = self.next()
        if token.kind == "lparen":
            node = self.either()
            close = self.next()
            if close.kind != "rparen":
                raise _error(close, f"missing ')' to close '(' at position {token.pos + 1}, "
                             f"found {_describe(close)}")
            return node
        if token.kind == "ident":
            return self.comparison(token)
        raise _error(token, f"expected a property name, '(' or -not, found {_describe(token)}")

    def comparison(self, name_token: _Token) -> Comparison:
        prop = self.names.get(_fold(name_token.text))
        if prop is None:
            known = ", ".join(sorted(self.schema))
            raise _error(name_token, f"unknown property {name_token.text!r} (known: {known})")
        kind = self.schema[prop]
        op_token = self.next()
        op = _fold(op_token.text)[1:]
        if op_token.kind != "op" or op not in _ALL_OPS:
            raise _error(op_token, f"expected an operator (-{', -'.join(_ALL_OPS)}) after "
                         f"{prop!r}, found {_describe(op_token)}")
        if op not in _ALLOWED_OPS[kind]:
            raise _error(op_token, f"operator -{op} cannot be used with {kind} property {prop!r}")
        return Comparison(prop, kind, op, self.value(prop, kind, op, self.next()))

    def value(self, prop: str, kind: PropType, op: str, token: _Token) -> Value:
        word = _fold(token.text)
        if word == "$null":
            if op not in ("eq", "ne"):
                raise _error(token, f"$null can only be compared with -eq or -ne, not -{op}")
            return None
        if token.kind == "var" and word not in ("$true", "$false"):
            raise _error(token, f"unknown variable {token.text!r} (use $true, $false or $null)")
        if word in ("$true", "$false") and kind == "bool":
            return word == "$true"
        if token.kind == "end":
            raise _error(token, f"unexpected end of the filter; expected a value after -{op}")
        if token.kind not in ("string", "number"):
            raise _error(token, f"{_describe(token)} is not a valid value for -{op} with "
                         f"{kind} property {prop!r}")
        text = token.text
        if token.kind == "string":  # strip the quotes and undouble the inner ones
            text = text[1:-1].replace(text[0] * 2, text[0])
        result: Value = text
        if kind == "int":
            stripped = text.strip()
            fits = re.fullmatch(r"[+-]?[0-9]+", stripped) and abs(int(stripped)) < _INT64
            result = int(stripped) if fits else None
        elif kind == "datetime":
            result = _parse_datetime(text)
        elif kind == "bool":
            result = {"true": True, "false": False}.get(_fold(text.strip()))
        if result is None:
            wanted = {"int": "a whole number", "datetime": "an ISO-8601 date-time or epoch",
                      "bool": "$true or $false"}[kind]
            raise _error(token, f"{text!r} is not {wanted}, as {kind} property "
                         f"{prop!r} requires")
        return result


def parse(text: str, schema: Schema) -> Filter:
    """Parse OPATH ``text`` against ``schema`` (property name -> type, names matched
    case-insensitively); raises :class:`FilterError` on any syntax, name or type error."""
    return _Parser(_tokenize(text), schema).parse()
