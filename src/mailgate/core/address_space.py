"""Exchange address spaces ``[TYPE:]SPACE[;COST]`` and how recipients match them.

Foreign, Delivery Agent and Send connectors each carry a list of address spaces; routing
keeps the connectors with a matching space and prefers the most specific match, then the
lowest cost (PRODUCT §4.4, reference §1.4, §1.6, §8.1 A2). This module parses and validates
the spaces and answers "does this recipient match, and how specifically?"; choosing a
connector is the router's job.

Syntax and validation:

* Type: optional, default ``SMTP``, case-insensitive, stored upper-case. The text before the
  first ':' is the type only when it looks like one (1-32 letters, digits, '-' or '_').
* Cost: 1-100, default 1. The last ';'-segment is the cost when it is an integer. A non-SMTP
  space that contains ';' must therefore give the cost explicitly (Exchange documents this).
* SMTP spaces: ``*`` (every domain), ``contoso.com`` (that domain only, not subdomains),
  ``*.contoso.com`` (the domain and all subdomains); RFC 1035 names, stored lower-case.
* X400 spaces: an RFC 1685 attribute list ``key=value;key=value...``.
* Other types (``FAX``, ``EX``, ...): free text, kept as given, with ``*`` allowed only as the
  last character (a prefix pattern).

Matching (reference §1.4 marks the non-SMTP rules as INFERRED; these are ours): a match
returns a specificity key where a larger tuple is more specific. ``(length of the literal
part, 1 if exact else 0)`` for SMTP and free-text types; ``(number of attributes, 0)`` for
X.400.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from mailgate.core.address import RecipientAddress, first_bad_character, is_address_type

__all__ = [
    "MAX_COST",
    "MIN_COST",
    "AddressSpace",
    "AddressSpaceError",
    "parse_address_spaces",
]

MIN_COST: Final = 1
MAX_COST: Final = 100
# Free-text spaces get the same bound as non-SMTP recipient values: a space longer than any
# value it could match is useless.
_MAX_SPACE_LENGTH: Final = 1024
_MAX_RAW_INPUT: Final = 4096

_DIGITS_RE: Final = re.compile(r"[0-9]+")
_RFC1035_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
# RFC 1685 keys: c, a, p, o, s, g, i, q, ou1..ou4, cn, ... and domain-defined attributes
# written "dda:TYPE" (for example "dda:RFC-822").
_X400_KEY_RE: Final = re.compile(r"[A-Za-z0-9]+(?::[A-Za-z0-9-]+)?")

_SMTP_HINT: Final = 'use "*", a domain such as "contoso.com", or "*." and a domain'
_WILDCARD_RULE: Final = 'a wildcard must be "*" alone or "*." followed by a domain'


class AddressSpaceError(ValueError):
    """An address space was refused. ``str(error)`` is one line naming the value and the rule."""


def _q(text: str, limit: int = 80) -> str:
    """Double-quote *text* for an error message: escaped (one line) and bounded."""
    if len(text) <= limit:
        return json.dumps(text, ensure_ascii=False)
    return f"{json.dumps(text[:limit], ensure_ascii=False)}... ({len(text)} characters)"


@dataclass(frozen=True)
class AddressSpace:
    """One address space of a connector: ``type``, ``space`` and ``cost``.

    Every instance is valid and canonical: the constructor upper-cases the type, lower-cases
    SMTP spaces, trims the space and checks the cost range, raising
    :class:`AddressSpaceError` otherwise. ``str()`` gives ``TYPE:space;cost``, which
    :meth:`parse` reads back to an equal object.
    """

    type: str
    space: str
    cost: int = MIN_COST
    # The X.400 attributes, parsed once at construction because matching runs per recipient
    # and per connector.
    _x400: tuple[tuple[str, str], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not is_address_type(self.type):
            raise AddressSpaceError(
                f"{_q(self.type)} is not a valid address-space type: use 1-32 letters, digits, "
                "'-' or '_'"
            )
        type_ = self.type.upper()
        object.__setattr__(self, "type", type_)
        # bool is an int subclass; "True" as a cost is a caller bug, not a cost of 1.
        if not isinstance(self.cost, int) or isinstance(self.cost, bool):
            raise AddressSpaceError(f"{_q(repr(self.cost))} is not a valid cost: use 1-100")
        if not MIN_COST <= self.cost <= MAX_COST:
            raise AddressSpaceError(
                f"{_q(f'{type_}:{self.space};{self.cost}')} is not a valid address space: "
                f"the cost must be between {MIN_COST} and {MAX_COST} (got {self.cost})"
            )
        space = self.space.strip()
        if type_ == "SMTP":
            space = _check_smtp_space(space)
        elif type_ == "X400":
            object.__setattr__(self, "_x400", _check_x400_space(space))
        else:
            _check_other_space(type_, space)
        object.__setattr__(self, "space", space)

    @classmethod
    def parse(cls, text: str) -> AddressSpace:
        """Parse ``[TYPE:]SPACE[;COST]``; surrounding whitespace and one pair of quotes are removed.

        Raises :class:`AddressSpaceError` for anything :class:`AddressSpace` refuses, for a
        cost that is not an integer in 1-100, and for a non-SMTP space that contains ';'
        without an explicit cost.
        """
        if len(text) > _MAX_RAW_INPUT:
            raise AddressSpaceError(f"{_q(text)} is not a valid address space: it is too long")
        bad = first_bad_character(text)
        if bad is not None:
            raise AddressSpaceError(f"{_q(text)} is not a valid address space: {bad}")
        body = _unquote(text.strip(), text)
        if not body:
            raise AddressSpaceError(f"{_q(text)} is not a valid address space: it is empty")
        prefix, colon, rest = body.partition(":")
        if colon and is_address_type(prefix):
            type_ = prefix.upper()
        else:
            type_, rest = "SMTP", body
        space, cost = _split_cost(type_, rest, text)
        if not space:
            raise AddressSpaceError(
                f"{_q(text)} is not a valid {type_} address space: the space is empty"
            )
        return cls(type_, space, cost)

    @property
    def key(self) -> tuple[str, str]:
        """Identity for duplicate detection: the type and the casefolded space (not the cost)."""
        return (self.type, self.space.casefold())

    def __str__(self) -> str:
        return f"{self.type}:{self.space};{self.cost}"

    def match(self, address: RecipientAddress) -> tuple[int, int] | None:
        """How specifically this space matches *address*: None, or a key (larger wins).

        Types must be equal. SMTP: ``*`` gives (0, 0); ``contoso.com`` matches only that
        domain, (len, 1); ``*.contoso.com`` matches it and its subdomains, (len of
        "contoso.com", 0). X400: every attribute of the space must be in the recipient's
        value (keys and values case-insensitive, a space value ``*`` matches any value),
        (number of attributes, 0). Other types, case-insensitively: a literal must equal the
        whole value, (len, 1); ``prefix*`` matches values that start with the prefix,
        (len of prefix, 0).
        """
        if address.type != self.type:
            return None
        if self.type == "SMTP":
            return _match_smtp(self.space, address.smtp_address.domain.lower())
        if self.type == "X400":
            return _match_x400(self._x400, address.value)
        return _match_text(self.space, address.value)


def _unquote(body: str, original: str) -> str:
    """Remove one pair of surrounding PowerShell quotes (" or ')."""
    if len(body) >= 2 and body[0] == body[-1] and body[0] in "\"'":
        return body[1:-1].strip()
    if body[:1] in ("'", '"') or body[-1:] in ("'", '"'):
        raise AddressSpaceError(f"{_q(original)} is not a valid address space: unbalanced quote")
    return body


def _split_cost(type_: str, rest: str, original: str) -> tuple[str, int]:
    """Split ``space;cost`` into the space and the cost (default 1)."""
    head, semi, tail = rest.rpartition(";")
    if not semi:
        return rest.strip(), MIN_COST
    cost_text = tail.strip()
    if _DIGITS_RE.fullmatch(cost_text) is None:
        if type_ == "SMTP":
            raise AddressSpaceError(
                f"{_q(original)} is not a valid SMTP address space: the text after ';' must be "
                f"the cost, a whole number between {MIN_COST} and {MAX_COST}"
            )
        # Show the administrator their own value with ";1" appended, which is usually the fix.
        example = f"{type_}:{rest.strip().rstrip(';')};1"
        if len(example) > 60:
            example = "X400:c=US;a=Fabrikam;1"
        raise AddressSpaceError(
            f"{_q(original)} is not a valid {type_} address space: it contains ';', so the cost "
            f"must be given explicitly, e.g. {example}"
        )
    # Check the length before int(): a huge digit string is out of range anyway, and int()
    # of more than 4300 digits raises an unrelated ValueError.
    cost = int(cost_text) if len(cost_text) <= 3 else MAX_COST + 1
    if not MIN_COST <= cost <= MAX_COST:
        got = cost_text if len(cost_text) <= 10 else "a larger number"
        raise AddressSpaceError(
            f"{_q(original)} is not a valid {type_} address space: the cost must be between "
            f"{MIN_COST} and {MAX_COST} (got {got})"
        )
    space = head.strip()
    if type_ == "SMTP" and ";" in space:
        raise AddressSpaceError(
            f"{_q(original)} is not a valid SMTP address space: an SMTP space cannot contain ';'"
        )
    return space, cost


def _check_smtp_space(space: str) -> str:
    """Validate an SMTP space and return it lower-cased."""
    shown = f"{_q(space)} is not a valid SMTP address space"
    if not space:
        raise AddressSpaceError(f"{shown}: it is empty; {_SMTP_HINT}")
    if space == "*":
        return space
    bad = first_bad_character(space)
    if bad is not None:
        raise AddressSpaceError(f"{shown}: {bad}")
    domain = space.removeprefix("*.")
    if "*" in domain:
        raise AddressSpaceError(f"{shown}: {_WILDCARD_RULE}")
    if ";" in domain:
        raise AddressSpaceError(f"{shown}: an SMTP space cannot contain ';'")
    if len(domain) > 255:
        raise AddressSpaceError(f"{shown}: the domain is longer than 255 characters")
    lowered = domain.lower()
    for label in lowered.split("."):
        if not label:
            raise AddressSpaceError(f"{shown}: empty label (leading, trailing or double '.')")
        if len(label) > 63:
            raise AddressSpaceError(f"{shown}: a label is longer than 63 characters")
        if not label.isascii() or _RFC1035_LABEL_RE.fullmatch(label) is None:
            raise AddressSpaceError(
                f"{shown}: RFC 1035 labels contain only letters, digits and '-' and do not "
                f"start or end with '-' ({_q(label, 20)})"
            )
    return space.lower()


def _parse_x400(text: str, strict: bool) -> tuple[tuple[str, str], ...] | None:
    """Parse ``key=value;...`` into (casefolded key, stripped casefolded value) pairs.

    strict (address spaces): every element must be ``key=value`` and empty elements are
    refused; returns None on the first problem. Lenient (recipient values): empty elements
    are skipped, because proxy addresses such as ``c=US;a= ;p=Org;`` end in ';'.
    """
    pairs: list[tuple[str, str]] = []
    for element in text.split(";"):
        if not element.strip():
            if strict:
                return None
            continue
        key, eq, value = element.partition("=")
        key = key.strip()
        # The value may be a single space: "a= " is Exchange's "any ADMD".
        if not eq or not value or _X400_KEY_RE.fullmatch(key) is None:
            return None
        pairs.append((key.casefold(), value.strip().casefold()))
    return tuple(pairs)


def _check_x400_space(space: str) -> tuple[tuple[str, str], ...]:
    """Validate an X400 space and return its parsed attributes."""
    shown = f"{_q(space)} is not a valid X400 address space"
    if not space:
        raise AddressSpaceError(f"{shown}: it is empty; use e.g. c=US;a=Fabrikam;p=Contoso")
    if len(space) > _MAX_SPACE_LENGTH:
        raise AddressSpaceError(f"{shown}: longer than {_MAX_SPACE_LENGTH} characters")
    bad = first_bad_character(space)
    if bad is not None:
        raise AddressSpaceError(f"{shown}: {bad}")
    pairs = _parse_x400(space, strict=True)
    if not pairs:
        raise AddressSpaceError(
            f"{shown}: RFC 1685 needs key=value elements separated by ';' (keys are letters "
            "and digits), e.g. c=US;a=Fabrikam;p=Contoso"
        )
    return pairs


def _check_other_space(type_: str, space: str) -> None:
    """Validate a free-text space: non-empty, bounded, no controls, '*' only at the end."""
    shown = f"{_q(f'{type_}:{space}')} is not a valid {type_} address space"
    if not space:
        raise AddressSpaceError(f"{shown}: the space is empty")
    if len(space) > _MAX_SPACE_LENGTH:
        raise AddressSpaceError(f"{shown}: longer than {_MAX_SPACE_LENGTH} characters")
    bad = first_bad_character(space)
    if bad is not None:
        raise AddressSpaceError(f"{shown}: {bad}")
    if "*" in space[:-1]:
        raise AddressSpaceError(
            f"{shown}: '*' may appear only as the last character (a prefix pattern, e.g. "
            f"{type_}:+44*)"
        )


def _match_smtp(space: str, domain: str) -> tuple[int, int] | None:
    """Match a lower-cased SMTP space against a lower-cased domain."""
    if space == "*":
        return (0, 0)
    if space.startswith("*."):
        parent = space[2:]
        if domain == parent or domain.endswith("." + parent):
            return (len(parent), 0)
        return None
    return (len(space), 1) if domain == space else None


def _match_text(space: str, value: str) -> tuple[int, int] | None:
    """Match a free-text literal or ``prefix*`` space, case-insensitively."""
    value_folded = value.casefold()
    if space.endswith("*"):
        prefix = space[:-1].casefold()
        return (len(prefix), 0) if value_folded.startswith(prefix) else None
    literal = space.casefold()
    return (len(literal), 1) if value_folded == literal else None


def _match_x400(attributes: tuple[tuple[str, str], ...], value: str) -> tuple[int, int] | None:
    """Match X.400 space attributes as a subset of the recipient's attributes."""
    recipient = _parse_x400(value, strict=False)
    if recipient is None:
        return None
    present: dict[str, set[str]] = {}
    for key, attribute_value in recipient:
        present.setdefault(key, set()).add(attribute_value)
    for key, wanted in attributes:
        values = present.get(key)
        if values is None or (wanted != "*" and wanted not in values):
            return None
    return (len(attributes), 0)


def _split_list(value: str) -> list[str]:
    """Split a PowerShell-style list on commas; quoted items keep their commas.

    An item that starts with a quote (after whitespace) runs to the matching quote, so an
    X.400 value with a comma can be written ``"X400:o=A,B;c=US;1"``. Quotes elsewhere are
    ordinary characters (``X400:s=O'Brien;c=US;1`` needs no quoting). Items are returned with
    their quotes; :meth:`AddressSpace.parse` removes them.
    """
    items: list[str] = []
    index, length = 0, len(value)
    while True:
        while index < length and value[index].isspace():
            index += 1
        if index < length and value[index] in "\"'":
            close = value.find(value[index], index + 1)
            if close < 0:
                raise AddressSpaceError(
                    f"{_q(value)} is not a valid address-space list: unbalanced quote"
                )
            items.append(value[index : close + 1])
            index = close + 1
            while index < length and value[index].isspace():
                index += 1
            if index < length and value[index] != ",":
                raise AddressSpaceError(
                    f"{_q(value)} is not a valid address-space list: text after a closing quote "
                    "(separate items with ',')"
                )
        else:
            comma = value.find(",", index)
            end = length if comma < 0 else comma
            items.append(value[index:end])
            index = end
        if index >= length:
            return items
        index += 1  # past the comma


def parse_address_spaces(values: Iterable[str]) -> list[AddressSpace]:
    """Parse the values of a multi-valued ``--address-spaces`` option, in order.

    Each value may itself be a comma-separated list in PowerShell style
    (``"contoso.com;2","fabrikam.com;3"``); commas inside quotes do not split. Raises
    :class:`AddressSpaceError` for an invalid or empty item, and for a duplicate (same type
    and space, case-insensitive, whatever the costs).
    """
    result: list[AddressSpace] = []
    seen: dict[tuple[str, str], AddressSpace] = {}
    for value in values:
        if len(value) > _MAX_RAW_INPUT * 16:
            raise AddressSpaceError(f"{_q(value)} is not a valid address-space list: too long")
        bad = first_bad_character(value)
        if bad is not None:
            raise AddressSpaceError(f"{_q(value)} is not a valid address-space list: {bad}")
        for item in _split_list(value):
            if not item.strip():
                raise AddressSpaceError(
                    f"{_q(value)} is not a valid address-space list: it has an empty item"
                )
            space = AddressSpace.parse(item)
            previous = seen.get(space.key)
            if previous is not None:
                raise AddressSpaceError(
                    f"{_q(str(space))} duplicates {_q(str(previous))}: each address space may "
                    "appear only once per connector"
                )
            seen[space.key] = space
            result.append(space)
    return result
