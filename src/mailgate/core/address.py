"""SMTP and non-SMTP (typed) addresses, and IMCEA encapsulation.

This module is the single gate through which every address enters mailgate: the SMTP
receiver, the Pickup/Replay parsers, the CLI and the categorizer all call the parse
functions here, so the rules about what an address may contain live in one place
(PRODUCT §4.3, reference §1.7 and §8.1 B1/B2).

Contract, in short:

* :func:`parse_smtp_address` accepts an RFC 5321 mailbox (dot-atom or quoted-string local
  part, hostname or ``[IPv4]``/``[IPv6:...]`` domain), with SMTPUTF8 (non-ASCII) characters
  allowed, and Exchange's length limits (local part 315, domain 255, whole 571 characters).
* :func:`parse_recipient_address` accepts ``TYPE:value`` or a bare SMTP address.
* :func:`imcea_encode` / :func:`imcea_decode` convert between a typed address and the
  ``IMCEA<TYPE>-<encoded>@domain`` form that carries it inside SMTP (MS-OXCMAIL).
* The dataclasses check their invariants on construction (a :class:`RecipientAddress` is
  fully validated; a :class:`SmtpAddress` at least has no control characters and no '@' in
  its domain), so a CR, LF or NUL can never reach an envelope, a header or a log line.
* Every rejection is an :class:`AddressError` (a :class:`ValueError`) whose message is one
  line an administrator can act on.

Pure functions only: no I/O, no configuration. Which domain is the default accepted domain,
and whether an IMCEA type is refused, is the caller's decision.
"""

from __future__ import annotations

import functools

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_DOMAIN_LENGTH",
    "MAX_LOCAL_LENGTH",
    "MAX_SMTP_ADDRESS_LENGTH",
    "MAX_TYPED_VALUE_LENGTH",
    "REFUSED_IMCEA_TYPES",
    "AddressError",
    "RecipientAddress",
    "SmtpAddress",
    "first_bad_character",
    "imcea_decode",
    "imcea_encode",
    "is_address_type",
    "parse_recipient_address",
    "parse_smtp_address",
]

# Exchange's limits (reference §1.7, [S22]): RFC 5321 says 64 for the local part, but
# Exchange's resolver accepts 315 so that long IMCEA-encapsulated addresses fit.
MAX_LOCAL_LENGTH: Final = 315
MAX_DOMAIN_LENGTH: Final = 255
MAX_SMTP_ADDRESS_LENGTH: Final = 571
# Values of non-SMTP types (FAX numbers, X.400 O/R addresses, EX DNs) have no documented
# limit; 1024 keeps them bounded for storage and log lines.
MAX_TYPED_VALUE_LENGTH: Final = 1024
MAX_TYPE_LENGTH: Final = 32

# Encapsulated SMTP and X500 addresses are refused by Exchange's recipient resolution
# (reference §1.7). The decoder does not refuse them itself; callers check this set.
REFUSED_IMCEA_TYPES: Final = frozenset({"SMTP", "X500"})

# Anything longer than this cannot be valid whatever the surrounding whitespace or angle
# brackets; refusing it first keeps the work bounded for hostile input.
_MAX_RAW_INPUT: Final = 4096

_TYPE_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
# IMCEA types are stricter: the type ends at the first '-', so it cannot contain one.
_IMCEA_TYPE_RE: Final = re.compile(r"[A-Za-z0-9]{1,32}")

# RFC 5321 atext plus every non-ASCII character (RFC 6531 UTF8-non-ascii); characters that
# are never acceptable anywhere have already been refused by first_bad_character().
_DOT_ATOM_RE: Final = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
    r"(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+)*"
)
# RFC 5321 Quoted-string: qtextSMTP (32-126 except '"' and '\') or quoted-pairSMTP ('\' and
# 32-126), plus UTF8-non-ascii. The two alternatives cannot overlap, so no backtracking blowup.
_QUOTED_RE: Final = re.compile(
    r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
)
_ASCII_LABEL_RE: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?")
# C0 controls, DEL and C1 controls: the fast path for first_bad_character().
_ASCII_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_IMCEA_KEEP: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789=-")
_HEX: Final = frozenset("0123456789abcdefABCDEF")


class AddressError(ValueError):
    """An address was refused. ``str(error)`` is one line meant for an administrator."""


def _show(text: str, limit: int = 80) -> str:
    """Quote *text* for an error message: escaped (one line, no controls) and bounded."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def first_bad_character(text: str) -> str | None:
    """Describe the first character that may never appear in an address, or return None.

    Refused everywhere: control characters (C0, DEL, C1, so CR, LF, NUL and TAB), Unicode
    format characters (bidi overrides, zero-width characters, BOM: invisible and used for
    spoofing), lone surrogates (not encodable as UTF-8) and the Unicode line and paragraph
    separators (``str.splitlines`` breaks on them, so they could split a header or log line).
    """
    match = _ASCII_CONTROL_RE.search(text)
    if match is not None:
        return f"control character {_char_name(match.group())} at position {match.start()}"
    if text.isascii():
        return None
    for position, char in enumerate(text):
        if char.isascii():
            continue
        category = unicodedata.category(char)
        if category in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            return f"invisible or control character {_char_name(char)} at position {position}"
    return None


def _char_name(char: str) -> str:
    """U+000D style name of a character, for error messages."""
    return f"U+{ord(char):04X}"


def is_address_type(text: str) -> bool:
    """True if *text* is a valid address type: 1-32 ASCII letters, digits, '-' or '_'."""
    return _TYPE_RE.fullmatch(text) is not None


def _strip_brackets(text: str, what: str, *, strict_end: bool) -> str:
    """Remove surrounding whitespace and one optional pair of angle brackets.

    A leading '<' needs its '>'. With *strict_end*, a lone trailing '>' is refused too; a
    typed value may legitimately end in '>', so parse_recipient_address passes False (an SMTP
    value is checked again by parse_smtp_address).
    """
    body = text.strip(" ")   # ASCII spaces only: U+00A0 and kin are not trimmed away
    opened = body.startswith("<")
    closed = body.endswith(">") and len(body) >= 2
    if opened != closed and (opened or strict_end):
        raise AddressError(f"{_show(text)} is not a valid {what}: unbalanced angle brackets")
    return body[1:-1] if opened else body


# ---------------------------------------------------------------------------------------
# SMTP addresses
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmtpAddress:
    """An SMTP mailbox ``local@domain``.

    ``local`` is kept exactly as received (including the quotes of a quoted-string) and so is
    the case of ``domain``: a relayed address must leave byte-identical to how it arrived.
    Use :attr:`key` to compare addresses. Build instances with :func:`parse_smtp_address`;
    the constructor only enforces the invariants that protect envelopes and headers (non-empty
    parts, no '@' in the domain, no control characters), not the full grammar.
    """

    local: str
    domain: str

    def __post_init__(self) -> None:
        text = f"{self.local}@{self.domain}"
        if not self.local or not self.domain or "@" in self.domain:
            raise AddressError(f"{_show(text)} is not a valid SMTP address: empty part or '@'")
        bad = first_bad_character(text)
        if bad is not None:
            raise AddressError(f"{_show(text)} is not a valid SMTP address: {bad}")

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def key(self) -> str:
        """Lookup key: local part casefolded, domain lower-cased.

        Exchange compares local parts case-insensitively (RFC 5321 lets the receiving system
        decide), and domains are case-insensitive by DNS rules.
        """
        return f"{self.local.casefold()}@{self.domain.lower()}"


def parse_smtp_address(text: str) -> SmtpAddress:
    """Parse an RFC 5321 mailbox, optionally in ``<...>`` and surrounded by whitespace.

    Accepted: a dot-atom or quoted-string local part, and a hostname (labels of letters,
    digits, '-' and '_', each 1-63 characters, no leading or trailing '-') or an address
    literal ``[1.2.3.4]`` / ``[IPv6:...]``. Non-ASCII (SMTPUTF8) characters are allowed in the
    local part, and letters, marks and digits of any script in domain labels (IDN U-labels).

    Refused with :class:`AddressError`: empty text, no '@', control or invisible characters
    anywhere (CR, LF and NUL included, even at the very end), source routes
    (``@a,@b:user@d``), a local part over 315 characters, a domain over 255, a whole address
    over 571.
    """
    what = "SMTP address"
    if len(text) > _MAX_RAW_INPUT:
        raise AddressError(f"{_show(text)} is not a valid {what}: longer than 571 characters")
    # Controls are checked before stripping: str.strip() would silently remove a trailing
    # CR/LF, and an address that arrived with one must be refused, not repaired.
    bad = first_bad_character(text)
    if bad is not None:
        raise AddressError(f"{_show(text)} is not a valid {what}: {bad}")
    body = _strip_brackets(text, what, strict_end=True)
    if not body:
        raise AddressError(f"{_show(text)} is not a valid {what}: it is empty")
    if body.startswith("@"):
        raise AddressError(
            f"{_show(text)} is not a valid {what}: source routes (@host,@host:user@domain) "
            "are not accepted"
        )
    if len(body) > MAX_SMTP_ADDRESS_LENGTH:
        raise AddressError(f"{_show(text)} is not a valid {what}: longer than 571 characters")
    # The domain never contains '@' (only IPv4/IPv6 literals are accepted), while a quoted
    # local part may: so the last '@' is the separator.
    local, at, domain = body.rpartition("@")
    if not at:
        raise AddressError(f"{_show(text)} is not a valid {what}: no '@'")
    if not local:
        raise AddressError(f"{_show(text)} is not a valid {what}: the local part is empty")
    if len(local) > MAX_LOCAL_LENGTH:
        raise AddressError(
            f"{_show(text)} is not a valid {what}: the local part is longer than 315 characters"
        )
    problem = _local_part_problem(local)
    if problem is not None:
        raise AddressError(f"{_show(text)} is not a valid {what}: {problem}")
    problem = _domain_problem(domain)
    if problem is not None:
        raise AddressError(f"{_show(text)} is not a valid {what}: {problem}")
    return SmtpAddress(local, domain)


def _local_part_problem(local: str) -> str | None:
    """Why *local* is not an RFC 5321/6531 local part, or None if it is one."""
    if local.startswith('"'):
        if _QUOTED_RE.fullmatch(local) is None:
            return "the quoted local part is malformed (unescaped '\"' or '\\', or text after it)"
        if local == '""':
            # RFC 5321's grammar allows an empty quoted string, but no mailbox has an empty
            # name and Exchange refuses it; refusing avoids a second "null" address form.
            return "the local part is empty"
        return None
    if _DOT_ATOM_RE.fullmatch(local) is None:
        if local.startswith(".") or local.endswith(".") or ".." in local:
            return "the local part has a leading, trailing or double '.'"
        return "the local part contains characters that must be quoted (or an extra '@')"
    return None


def _domain_problem(domain: str) -> str | None:
    """Why *domain* is not a hostname or an IPv4/IPv6 address literal, or None."""
    if not domain:
        return "the domain is empty"
    if len(domain) > MAX_DOMAIN_LENGTH:
        return "the domain is longer than 255 characters"
    if domain.startswith("["):
        return _literal_problem(domain)
    labels = domain.split(".")
    for label in labels:
        if not label:
            return "the domain has an empty label (leading, trailing or double '.')"
        problem = _label_problem(label)
        if problem is not None:
            return problem
    return None


def _label_problem(label: str) -> str | None:
    """Why *label* is not a hostname label (ASCII or IDN U-label), or None."""
    if label.isascii():
        if len(label) > 63:
            return f"the domain label {_show(label, 20)} is longer than 63 characters"
        if _ASCII_LABEL_RE.fullmatch(label) is None:
            return (
                f"the domain label {_show(label, 20)} may contain only letters, digits, '-' "
                "and '_', and may not start or end with '-'"
            )
        return None
    if label.startswith("-") or label.endswith("-"):
        return f"the domain label {_show(label, 20)} may not start or end with '-'"
    for char in label:
        if char.isascii():
            if not (char.isalnum() or char in "-_"):
                return f"the domain label {_show(label, 20)} contains {char!r}"
        # IDNA2008 permits essentially letters, combining marks and digits; refusing
        # symbols and punctuation (full-width '@' or '.', for example) prevents look-alikes.
        elif unicodedata.category(char)[0] not in "LMN":
            return f"the domain label {_show(label, 20)} contains {_char_name(char)}"
    # The 63-octet DNS limit applies to the A-label that goes on the wire, not to the
    # number of Unicode characters, so measure the punycode form.
    a_label = "xn--" + label.lower().encode("punycode").decode("ascii")
    if len(a_label) > 63:
        return f"the domain label {_show(label, 20)} is longer than 63 characters as an A-label"
    return None


def _literal_problem(domain: str) -> str | None:
    """Why *domain* is not ``[IPv4]`` or ``[IPv6:...]``, or None."""
    if not domain.endswith("]"):
        return "the address literal has no closing ']'"
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            value = inner[5:]
            # ipaddress accepts "fe80::1%eth0" (a scope id); RFC 5321 does not.
            if "%" in value:
                return "the IPv6 address literal may not have a scope id"
            ipaddress.IPv6Address(value)
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return f"{_show(domain, 50)} is not a valid [IPv4] or [IPv6:...] address literal"
    return None


# ---------------------------------------------------------------------------------------
# Typed recipient addresses
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipientAddress:
    """A recipient of any address type: ``SMTP`` or e.g. ``FAX``, ``X400``, ``EX``.

    ``type`` is stored upper-case (the constructor normalises it). For SMTP, ``value`` is the
    validated address text ``local@domain``; for other types it is kept verbatim, case
    included, because gateways may care about it. Every instance is valid: the constructor
    refuses bad types, empty or over-long values and control characters, and for SMTP it runs
    the full :func:`parse_smtp_address` check.
    """

    type: str
    value: str

    def __post_init__(self) -> None:
        if not is_address_type(self.type):
            raise AddressError(
                f"{_show(self.type)} is not a valid address type: use 1-32 letters, digits, "
                "'-' or '_'"
            )
        object.__setattr__(self, "type", self.type.upper())
        if self.type == "SMTP":
            # Normalise "<a@b>" or " a@b " to "a@b" so that equal addresses compare equal.
            object.__setattr__(self, "value", str(parse_smtp_address(self.value)))
            return
        shown = _show(f"{self.type}:{self.value}")
        if not self.value:
            raise AddressError(f"{shown} is not a valid {self.type} address: the value is empty")
        if len(self.value) > MAX_TYPED_VALUE_LENGTH:
            raise AddressError(
                f"{shown} is not a valid {self.type} address: the value is longer than "
                f"{MAX_TYPED_VALUE_LENGTH} characters"
            )
        bad = first_bad_character(self.value)
        if bad is not None:
            raise AddressError(f"{shown} is not a valid {self.type} address: {bad}")

    @classmethod
    def smtp(cls, addr: SmtpAddress) -> RecipientAddress:
        """The SMTP recipient for *addr* (already validated: not parsed again)."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "type", "SMTP")
        object.__setattr__(obj, "value", str(addr))
        return obj

    @property
    def is_smtp(self) -> bool:
        """True for SMTP recipients."""
        return self.type == "SMTP"

    @functools.cached_property
    def smtp_address(self) -> SmtpAddress:
        """The :class:`SmtpAddress` of an SMTP recipient; AddressError for other types."""
        if not self.is_smtp:
            raise AddressError(f"{_show(str(self))} is a {self.type} address, not SMTP")
        local, _, domain = self.value.rpartition("@")
        return SmtpAddress(local, domain)

    @functools.cached_property
    def key(self) -> str:
        """Case-insensitive lookup key ``TYPE:value`` (SMTP uses :attr:`SmtpAddress.key`)."""
        if self.is_smtp:
            return f"SMTP:{self.smtp_address.key}"
        return f"{self.type}:{self.value.casefold()}"

    def __str__(self) -> str:
        return self.value if self.is_smtp else f"{self.type}:{self.value}"


@functools.lru_cache(maxsize=65536)
def parse_recipient_address(text: str) -> RecipientAddress:
    """Parse ``TYPE:value`` or a bare SMTP address (whitespace and ``<...>`` stripped).

    Results are cached (they are immutable): mail to the same addresses is common.

    The text is typed when it contains ':' and everything before the first ':' is a valid
    type (1-32 letters, digits, '-' or '_'); ``SMTP:`` values must be SMTP addresses. Text
    without such a prefix must be an SMTP address (so ``"a:b"@c.test`` and
    ``user@[IPv6:::1]`` are SMTP). Values of other types must be non-empty, at most 1024
    characters and free of control characters; they are kept verbatim.
    """
    what = "recipient address"
    if len(text) > _MAX_RAW_INPUT:
        raise AddressError(f"{_show(text)} is not a valid {what}: it is too long")
    bad = first_bad_character(text)
    if bad is not None:
        raise AddressError(f"{_show(text)} is not a valid {what}: {bad}")
    body = _strip_brackets(text, what, strict_end=False)
    if not body:
        raise AddressError(f"{_show(text)} is not a valid {what}: it is empty")
    prefix, colon, value = body.partition(":")
    if colon and is_address_type(prefix):
        return RecipientAddress(prefix, value)
    return RecipientAddress.smtp(parse_smtp_address(body))


# ---------------------------------------------------------------------------------------
# IMCEA encapsulation (MS-OXCMAIL; reference §1.7)
# ---------------------------------------------------------------------------------------


def imcea_encode(address: RecipientAddress, domain: str) -> SmtpAddress:
    """Encapsulate *address* as ``IMCEA<TYPE>-<encoded>@domain``.

    In ``<encoded>``, ASCII letters, digits, '=' and '-' are kept; '/' becomes '_'; every
    other character becomes '+' and two upper-case hex digits per UTF-8 byte (space is
    ``+20``, '+' is ``+2B``). Raises :class:`AddressError` when the type contains '-' or '_'
    (the decoder could not find where the type ends), when *domain* is not a valid domain,
    or when the local part would exceed Exchange's 315-character limit. Any type, SMTP and
    X500 included, is encoded; refusing them is the resolver's job.
    """
    if _IMCEA_TYPE_RE.fullmatch(address.type) is None:
        raise AddressError(
            f"{_show(str(address))} cannot be IMCEA-encapsulated: the type must be letters "
            "and digits only"
        )
    problem = _domain_problem(domain)
    if problem is not None:
        raise AddressError(f"{_show(domain)} is not a valid IMCEA domain: {problem}")
    parts: list[str] = []
    for char in address.value:
        if char in _IMCEA_KEEP:
            parts.append(char)
        elif char == "/":
            parts.append("_")
        else:
            parts.extend(f"+{byte:02X}" for byte in char.encode("utf-8"))
    local = f"IMCEA{address.type}-{''.join(parts)}"
    if len(local) > MAX_LOCAL_LENGTH:
        raise AddressError(
            f"{_show(str(address))} cannot be IMCEA-encapsulated: the encoded local part is "
            f"{len(local)} characters, more than Exchange's limit of 315"
        )
    return SmtpAddress(local, domain)


def imcea_decode(addr: SmtpAddress) -> RecipientAddress | None:
    """Decode an IMCEA-encapsulated address, or return None if *addr* is not one.

    *addr* is IMCEA when its local part is ``IMCEA`` (any case), a type of 1-32 ASCII letters
    and digits, '-', and a non-empty rest. The rest is decoded ('_' to '/', ``+XX`` to a byte,
    hex in any case, other characters taken literally) and read as UTF-8; the type is
    upper-cased. Raises :class:`AddressError` for a '+' not followed by two hex digits,
    invalid UTF-8, or a decoded value that is not a valid address of its type (a control
    character smuggled as ``+0D+0A``, for example).

    The domain is not checked and SMTP/X500 are not refused: the caller decodes only for the
    default accepted domain and consults :data:`REFUSED_IMCEA_TYPES`.
    """
    local = addr.local
    # isascii(): str.upper() maps the dotless i (U+0131) to "I"; that is not an IMCEA prefix.
    if not local[:5].isascii() or local[:5].upper() != "IMCEA":
        return None
    type_, dash, rest = local[5:].partition("-")
    if not dash or not rest or _IMCEA_TYPE_RE.fullmatch(type_) is None:
        return None
    decoded = bytearray()
    index = 0
    while index < len(rest):
        char = rest[index]
        if char == "+":
            pair = rest[index + 1 : index + 3]
            if len(pair) != 2 or not (pair[0] in _HEX and pair[1] in _HEX):
                raise AddressError(
                    f"{_show(str(addr))} is not a valid IMCEA address: '+' at position "
                    f"{index} of the encoded part is not followed by two hex digits"
                )
            decoded.append(int(pair, 16))
            index += 3
            continue
        decoded.extend(b"/" if char == "_" else char.encode("utf-8", "surrogatepass"))
        index += 1
    try:
        value = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise AddressError(
            f"{_show(str(addr))} is not a valid IMCEA address: the decoded bytes are not UTF-8"
        ) from None
    return RecipientAddress(type_.upper(), value)


# ---------------------------------------------------------------------------------------
# RFC 3461 xtext (ORCPT and ENVID values)
# ---------------------------------------------------------------------------------------

_XTEXT_UNSAFE = re.compile(r"[^!-*,-<>-~]")


def xtext(value: str) -> str:
    """RFC 3461 xtext: '+', '=' and characters outside '!'..'~' become +XX (per UTF-8 byte)."""
    return _XTEXT_UNSAFE.sub(lambda m: "".join(f"+{b:02X}" for b in m.group().encode("utf-8")),
                             value)
