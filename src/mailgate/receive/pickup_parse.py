"""Parse and rewrite the header of a Pickup directory file (Exchange 2013 semantics).

This module is pure: it never touches the file system beyond reading from a file object
it is given, never scans a directory and never talks to the queue. The Pickup scanner
(written elsewhere) calls, per claimed file:

1. :func:`read_header_block` to read the header section, bounded by
   ``PickupDirectoryMaxHeaderSize``;
2. :func:`parse_pickup` to check the header against the Pickup rules, derive the
   envelope (originator and recipients) and build the rewritten header;
3. :func:`normalise_line_endings` to stream the body (from ``body_offset``) as CRLF.

Every problem with the file is reported as :class:`PickupError`. ``parse_pickup`` raises
nothing else for any input bytes; the scanner turns the error into a ``.bad`` file (with
``reason`` as the one-line ``.bad.reason``) or, when ``ndr`` is set, into an NDR to
``sender``.

Reference: ``reference/exchange-transport.md`` §2.2-2.4, §2.7; ``spec/PRODUCT.md`` §4.5;
``reference/reliability.md`` §2.4 (header injection), §2.6 (parser DoS), §2.12.

Address parser choice (rule 5 of the design brief). Measured on CPython 3.11.7:

* ``email.utils.getaddresses`` has no ``strict`` mode on 3.11.7 (CVE-2023-27043 was
  fixed in later releases). It turns ``alice@example.org)<bob@example.org>`` into the
  *two* recipients alice and bob, ``a@b@c`` into ``@c``, and it raises
  ``RecursionError`` on 1 000 nested comments.
* ``email._header_value_parser.get_address_list`` reads the first example as alice
  only (silently dropping bob; it records a defect), raises ``IndexError`` on ``a@``,
  ``RecursionError`` on 1 000 nested comments, and needs 1.3 s for 8 000 short
  addresses (79 KB), so a full 64 KB ``To:`` does not fit the ~1 s budget.

Neither is both correct and bounded, so this module has its own small RFC 5322
address-list parser (:func:`_parse_address_list`). It is driven by a handful of regular
expressions that use possessive quantifiers (new in 3.11), so it never backtracks and
never recurses: time is linear in the input, comments may nest at most
:data:`_MAX_COMMENT_DEPTH` levels, and a field holds at most
:data:`_MAX_ADDRESS_ELEMENTS` list elements. Anything that is not a valid address list
(including the CVE-2023-27043 shapes above) is refused, never guessed at.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from email import policy as _email_policy
from typing import BinaryIO

from mailgate.core.status import S550_TOO_MANY_RECIPIENTS

__all__ = [
    "PickupError",
    "PickupMessage",
    "normalise_line_endings",
    "parse_pickup",
    "read_header_block",
]


class PickupError(Exception):
    """The file cannot be submitted.

    ``reason`` is one line for the ``.bad.reason`` file (which header, which limit, which
    line); control characters are escaped so it can never span lines. ``ndr`` is set (to
    an NDR status text such as ``'550 5.5.3 too many recipients (101,
    PickupDirectoryMaxRecipientsPerMessage is 100)'``) only when Exchange answers the
    problem with an NDR to a *valid* sender rather than badmail; then ``sender`` holds
    that sender. With ``ndr`` None the file is badmail.
    """

    reason: str
    ndr: str | None
    sender: str | None
    # With `ndr`: what the NDR must describe (the recipients it failed for, and the
    # original message's Subject and Message-ID when it has them).
    recipients: list[str]
    subject: str | None
    message_id: str | None

    def __init__(self, reason: str, *, ndr: str | None = None, sender: str | None = None,
                 recipients: list[str] | None = None, subject: str | None = None,
                 message_id: str | None = None):
        # The reason is written as a single line beside the .bad file: escape anything
        # that could break it (a value copied from the file may hold any character).
        self.reason = _one_line(reason)
        self.ndr = _one_line(ndr) if ndr is not None else None
        self.sender = sender
        self.recipients = recipients or []
        self.subject = subject
        self.message_id = message_id
        super().__init__(self.reason)


# ---------------------------------------------------------------------------------------
# Reading the header block
# ---------------------------------------------------------------------------------------

_READ_CHUNK = 64 * 1024
# The empty line that ends the header: a line feed followed by an (optionally CR-ended)
# empty line. Whether the endings are consistent is parse_pickup's business.
_BLANK_LINE = re.compile(rb"\n\r?\n")


def read_header_block(f: BinaryIO, max_header_size: int) -> tuple[bytes, int]:
    """Read the header section of a Pickup file and find where its body starts.

    Returns ``(head, body_offset)``. ``head`` is every header line, each with its own
    line ending, up to but not including the empty line; ``body_offset`` is the offset
    just after the empty line. Offsets count from the position of ``f`` on entry
    (normally 0). If the file starts with an empty line, ``head`` is ``b""``. If end of
    file comes before an empty line, the whole file is the header and ``body_offset``
    is its length.

    At most ``max_header_size + 3`` bytes are read (enough to see the empty line that
    follows a header of exactly the limit); the rest of the file is never read. A header
    longer than ``max_header_size`` bytes (counted without the empty line) raises
    :class:`PickupError` ``"header is larger than PickupDirectoryMaxHeaderSize (N bytes)"``,
    which is badmail.
    """
    if max_header_size < 0:
        raise ValueError("max_header_size must not be negative")
    # A header of max_header_size bytes is followed by at most "\r\n" of empty line; one
    # more byte lets the search tell "ends exactly at the limit" from "too long".
    read_limit = max_header_size + 3
    def too_large() -> PickupError:
        return PickupError(
            f"header is larger than PickupDirectoryMaxHeaderSize ({max_header_size} bytes)"
        )
    buf = bytearray()
    search_from = 0
    eof = False
    while True:
        if not eof and len(buf) < read_limit:
            chunk = f.read(min(_READ_CHUNK, read_limit - len(buf)))
            if chunk:
                buf += chunk
            else:
                eof = True
        # An empty first line means an empty header.
        if buf[:1] == b"\n":
            return b"", 1
        if buf[:2] == b"\r\n":
            return b"", 2
        m = _BLANK_LINE.search(buf, search_from)
        if m is not None:
            head_len = m.start() + 1  # keep the last header line's own line feed
            if head_len > max_header_size:
                raise too_large()
            return bytes(buf[:head_len]), m.end()
        if eof:
            if len(buf) > max_header_size:
                raise too_large()
            return bytes(buf), len(buf)
        if len(buf) >= read_limit:
            # No empty line within the limit: any later one would give a longer header.
            raise too_large()
        # The separator is at most 3 bytes: re-scan the last 2 with the next chunk.
        search_from = max(0, len(buf) - 2)


# ---------------------------------------------------------------------------------------
# Body line endings
# ---------------------------------------------------------------------------------------


def normalise_line_endings(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Stream the body with canonical CRLF line endings.

    CRLF stays; a lone LF or a lone CR becomes CRLF. A CR at the end of one chunk
    followed by an LF at the start of the next is one line break, so the result does not
    depend on how the body was split into chunks. Only one chunk is held at a time; empty
    output pieces are not yielded. A missing line ending at the very end is not added.
    """
    cr_pending = False  # the previous chunk ended in CR, already emitted as CRLF
    for chunk in chunks:
        if not chunk:
            continue
        if cr_pending and chunk[:1] == b"\n":
            chunk = chunk[1:]  # the LF half of a CRLF split across chunks
        cr_pending = chunk[-1:] == b"\r"
        # Three C-speed passes beat a regex: fold every ending to LF, then LF to CRLF.
        out = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if out:
            yield out


# ---------------------------------------------------------------------------------------
# The parsed message
# ---------------------------------------------------------------------------------------


@dataclass
class PickupMessage:
    """What :func:`parse_pickup` derives from a valid Pickup header."""

    sender: str  # envelope originator (SMTP address, no <>)
    recipients: list[str]  # from To, Cc, Bcc in that order, de-duplicated case-insensitively
    header: bytes  # rewritten header, every line CRLF-terminated, then the empty line b"\r\n"
    body_offset: int  # where the body starts in the original file (copied by the caller)
    line_ending: bytes  # b"\r\n" or b"\n": the file's header line ending
    message_id: str  # the Message-ID value (existing, or the one we generated), with <>
    subject: str  # decoded (RFC 2047), whitespace-collapsed, at most 255 chars, for tracking
    bcc_only: bool  # To and Cc gave no address, Bcc gave at least one


# ---------------------------------------------------------------------------------------
# Limits that keep parsing bounded (reliability.md §2.6)
# ---------------------------------------------------------------------------------------

# Comments may nest this deep; deeper nesting is refused (CPython's own parsers hit
# RecursionError near 1 000 levels). Real mail nests one or two levels.
_MAX_COMMENT_DEPTH = 16
# List elements (addresses, groups, fields) over all of To, Cc and Bcc. The recipient
# limit is at most 10 000 (PickupDirectoryMaxRecipientsPerMessage's range), so reaching
# 50 000 elements (five times the highest limit) is far beyond any real Pickup file;
# stopping there, with a too-many-recipients NDR, bounds the work (about 0.5 s for
# 5 MB of addresses) even when the addresses are duplicates of a few.
_MAX_ADDRESS_ELEMENTS = 50_000
# The raw text of one addr-spec (before canonicalisation). Far above any usable address
# (RFC 5321 paths are at most 256 octets); it bounds the per-address work.
_MAX_ADDR_SPEC_CHARS = 4096
# Domains in an obsolete source route (<@a,@b:user@c>); the route is ignored anyway.
_MAX_ROUTE_HOPS = 32
# Date values longer than this cannot be a date; don't hand them to the date parser.
_MAX_DATE_CHARS = 256
# Only so many Date fields are tried; RFC 5322 allows exactly one.
_MAX_DATE_FIELDS_TRIED = 100
# Raw Subject characters decoded for tracking (the result is cut to 255 characters).
_MAX_SUBJECT_SOURCE = 4096
_MAX_SUBJECT = 255
# How much of an offending value a reason quotes.
_REASON_VALUE_CHARS = 100


# ---------------------------------------------------------------------------------------
# Address-list parser (RFC 5322 §3.4 with the obs- forms of §4.4)
# ---------------------------------------------------------------------------------------

# atext, plus any non-ASCII character (RFC 6532; lone surrogates stand for undecodable
# 8-bit bytes and are refused later, in addr-specs only).
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"


def _comment_pattern(depth: int) -> str:
    """A comment nested at most ``depth`` levels, as a non-backtracking pattern.

    Built by nesting (no recursion in the regex engine, which has none): level 0 holds
    ctext and quoted-pairs, level k may also hold a level k-1 comment.
    """
    pattern = r"\((?:[^()\\]++|\\[\s\S])*+\)"
    for _ in range(depth - 1):
        pattern = r"\((?:[^()\\]++|\\[\s\S]|" + pattern + r")*+\)"
    return pattern


_COMMENT = _comment_pattern(_MAX_COMMENT_DEPTH)
_QUOTED = r'"(?:[^"\\]++|\\[\s\S])*+"'
_DLITERAL = r"\[(?:[^\[\]\\]++|\\[\s\S])*+\]"
_CFWS_RE = re.compile(r"(?:[ \t]++|" + _COMMENT + r")*+")
# A run of words: everything that can stand between the specials < > @ , ; :
# (atoms, dots, quoted strings, domain literals, white space, comments).
_WORDS_RE = re.compile(
    r"(?:[" + _ATEXT + r".]++|" + _QUOTED + "|" + _DLITERAL + r"|[ \t]++|" + _COMMENT + r")++"
)
# The pieces of a run of words, used only for addr-specs (bounded length).
_ITEM_RE = re.compile(
    r"(?P<atom>[" + _ATEXT + r"]++)"
    r'|"(?P<qs>(?:[^"\\]++|\\[\s\S])*+)"'
    r"|(?P<dot>\.)"
    r"|(?P<dlit>" + _DLITERAL + r")"
    r"|(?P<cfws>(?:[ \t]++|" + _COMMENT + r")++)"
)
# A phrase (display name or group name): words without domain literals. RFC 5322 does
# not allow '[' there, and reading "a[, b@c] :d@e" as a group named "a[, b@c]" would
# hide an address that other parsers see.
_PHRASE_RE = re.compile(r"(?:[" + _ATEXT + r".]++|" + _QUOTED + r"|[ \t]++|" + _COMMENT + r")++")
_SEPARATOR_RE = re.compile(r",(?:[ \t]++|" + _COMMENT + r"|,)*+")
_QUOTED_PAIR_RE = re.compile(r"\\([\s\S])")
_DOT_ATOM_RE = re.compile(r"[" + _ATEXT + r"]+(?:\.[" + _ATEXT + r"]+)*")


class _AddressError(Exception):
    """An address list is not valid; ``args[0]`` says why (internal to this module)."""


class _TooManyElements(Exception):
    """The address fields hold more than ``_MAX_ADDRESS_ELEMENTS`` elements."""


def _skip(pattern: re.Pattern[str], s: str, pos: int) -> int:
    """The position after ``pattern`` matched at ``pos`` (``pos`` if it does not)."""
    m = pattern.match(s, pos)
    return m.end() if m else pos


def _describe_stop(s: str, pos: int) -> str:
    """Explain why the lexer cannot go on at ``pos``."""
    if pos >= len(s):
        return "unexpected end of the value"
    ch = s[pos]
    if ch == '"':
        return f"unterminated quoted string at offset {pos}"
    if ch == "(":
        return (
            f"unbalanced comment, or comments nested more than {_MAX_COMMENT_DEPTH} "
            f"levels, at offset {pos}"
        )
    if ch == "[":
        return f"unterminated domain literal at offset {pos}"
    if ch in ")]<>@:;":
        return f"unexpected {ch!r} at offset {pos}"
    return f"unexpected character U+{ord(ch):04X} at offset {pos}"


def _unquote(text: str) -> str:
    return _QUOTED_PAIR_RE.sub(r"\1", text)


def _addr_spec(local_raw: str, domain_raw: str) -> str:
    """Build the canonical SMTP form of ``local_raw@domain_raw`` or raise _AddressError.

    ``local_raw`` and ``domain_raw`` are runs of words as the lexer found them, possibly
    with the obsolete white space/comments around dots (``john . doe``). The local part
    is unquoted when its text is a dot-atom, else quoted (RFC 5321 §4.1.2), so the
    envelope never carries a form that needs the header's obs- syntax.
    """
    if len(local_raw) + len(domain_raw) > _MAX_ADDR_SPEC_CHARS:
        raise _AddressError(f"address longer than {_MAX_ADDR_SPEC_CHARS} characters")
    # Fast path: the usual plain "local@domain" (optional white space around it) needs
    # none of the obs- handling below.
    local_plain = local_raw.strip(" \t")
    domain_plain = domain_raw.strip(" \t")
    if _DOT_ATOM_RE.fullmatch(local_plain) and _DOT_ATOM_RE.fullmatch(domain_plain):
        address = f"{local_plain}@{domain_plain}"
        problem = _smtp_address_problem(address)
        if problem is not None:
            raise _AddressError(f"{address!r} is not a valid SMTP address ({problem})")
        return address

    def items(raw: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        covered = 0
        for m in _ITEM_RE.finditer(raw):
            kind = m.lastgroup
            if kind is None or m.start() != covered:
                raise _AddressError("unexpected text in the address")  # cannot happen
            covered = m.end()
            if kind != "cfws":
                out.append((kind, m.group(kind)))
        if covered != len(raw):
            raise _AddressError("unexpected text in the address")  # cannot happen
        return out

    local_words: list[str] = []
    quoted = False
    expect_word = True
    for kind, text in items(local_raw):
        if kind == "dot":
            if expect_word:
                raise _AddressError("misplaced '.' in the local part")
            expect_word = True
        elif kind in ("atom", "qs"):
            if not expect_word:
                raise _AddressError("words in the local part must be separated by '.'")
            if kind == "qs":
                quoted = True
                text = _unquote(text)
            local_words.append(text)
            expect_word = False
        else:
            raise _AddressError("domain literal in the local part")
    if expect_word:
        raise _AddressError("empty local part" if not local_words else "local part ends with '.'")
    local = ".".join(local_words)
    if not local:
        raise _AddressError("empty local part")
    if quoted and not _DOT_ATOM_RE.fullmatch(local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'

    d_items = items(domain_raw)
    if len(d_items) == 1 and d_items[0][0] == "dlit":
        domain = d_items[0][1]
    else:
        labels: list[str] = []
        expect_word = True
        for kind, text in d_items:
            if kind == "dot":
                if expect_word:
                    raise _AddressError("misplaced '.' in the domain")
                expect_word = True
            elif kind == "atom":
                if not expect_word:
                    raise _AddressError("labels of the domain must be separated by '.'")
                labels.append(text)
                expect_word = False
            else:
                raise _AddressError("the domain is not a dot-atom or a domain literal")
        if expect_word:
            raise _AddressError("empty domain" if not labels else "domain ends with '.'")
        domain = ".".join(labels)

    address = f"{local}@{domain}"
    problem = _smtp_address_problem(address)
    if problem is not None:
        raise _AddressError(f"{address!r} is not a valid SMTP address ({problem})")
    return address


def _parse_address_list(s: str, budget: list[int]) -> list[str]:
    """Return the addr-specs of an RFC 5322 address list (``To:``, ``From:``...).

    Groups contribute their members (``undisclosed-recipients:;`` none). Display names
    and comments are skipped, not decoded (they are not needed for the envelope). Empty
    list elements (``a@b,,c@d``, RFC 5322 obs-addr-list) are allowed; a group whose
    ``;`` is missing at the very end of the value is closed there (a common slip that
    cannot hide an address). Anything else that is not valid raises _AddressError.

    ``budget[0]`` is decremented per element (address, group); at zero
    _TooManyElements is raised. Work is linear in ``len(s)``: every regex is
    possessive, and each loop iteration consumes at least one special character.
    """
    out: list[str] = []
    n = len(s)
    pos = _skip(_CFWS_RE, s, 0)
    in_group = False
    while True:
        # Empty elements and the separator(s) before the next element.
        if pos < n and s[pos] == ",":
            pos = _skip(_SEPARATOR_RE, s, pos)
            continue
        if pos >= n:
            break  # end of the list (an open group is closed here, see above)
        if in_group and s[pos] == ";":
            in_group = False
            pos = _skip(_CFWS_RE, s, pos + 1)
            if pos < n and s[pos] != ",":
                raise _AddressError(f"expected ',' after the group: {_describe_stop(s, pos)}")
            continue

        budget[0] -= 1
        if budget[0] < 0:
            raise _TooManyElements()

        m = _WORDS_RE.match(s, pos)
        words = m.group() if m else ""
        start = pos
        pos = m.end() if m else pos
        special = s[pos] if pos < n else ""

        if special in ("<", ":") and words and not _PHRASE_RE.fullmatch(words):
            raise _AddressError(f"domain literal in a display name at offset {start}")
        if special == "<":
            # [display-name] angle-addr; the display name (a phrase) is not needed.
            pos = _skip(_CFWS_RE, s, pos + 1)
            if pos < n and s[pos] == "@":
                pos = _skip_route(s, pos)
            m = _WORDS_RE.match(s, pos)
            local = m.group() if m else ""
            pos = m.end() if m else pos
            if pos >= n or s[pos] != "@":
                if pos < n and s[pos] == ">":
                    raise _AddressError(f"no '@' in the address in <> at offset {start}")
                raise _AddressError(f"expected '@' in <>: {_describe_stop(s, pos)}")
            m = _WORDS_RE.match(s, pos + 1)
            domain = m.group() if m else ""
            pos = m.end() if m else pos + 1
            if pos >= n or s[pos] != ">":
                raise _AddressError("expected '>': " + _describe_stop(s, pos))
            out.append(_addr_spec(local, domain))
            pos = _skip(_CFWS_RE, s, pos + 1)
        elif special == ":":
            if in_group:
                raise _AddressError(f"group inside a group at offset {pos}")
            if not words.strip():
                raise _AddressError(f"group without a name at offset {pos}")
            in_group = True
            pos = _skip(_CFWS_RE, s, pos + 1)
            continue
        elif special == "@":
            if not words.strip():
                raise _AddressError(f"empty local part at offset {start}")
            m = _WORDS_RE.match(s, pos + 1)
            domain = m.group() if m else ""
            pos = m.end() if m else pos + 1
            out.append(_addr_spec(words, domain))
        elif special in ("", ",") or (special == ";" and in_group):
            if words.strip():
                raise _AddressError(
                    f"{_show(words.strip())} at offset {start} is not an address (no '@')"
                )
            continue  # only white space/comments: an empty element
        elif special == ";":
            raise _AddressError(f"';' outside a group at offset {pos}")
        else:
            raise _AddressError(_describe_stop(s, pos))

        # After an element: the end, a separator, or the end of the group.
        if pos < n and s[pos] != "," and not (in_group and s[pos] == ";"):
            raise _AddressError(f"expected ',' after an address: {_describe_stop(s, pos)}")
    return out


def _skip_route(s: str, pos: int) -> int:
    """Skip an obs-route (``@a.example,@b.example:``) in an angle-addr; return the
    position after its ':'. RFC 5321 App. C lets us ignore the route and use only the
    final address, which is what happens."""
    n = len(s)
    for _ in range(_MAX_ROUTE_HOPS):
        # here s[pos] == "@"
        m = _WORDS_RE.match(s, pos + 1)
        if not m or not m.group().strip():
            raise _AddressError(f"empty domain in a source route at offset {pos}")
        pos = m.end()
        if pos < n and s[pos] == ":":
            return _skip(_CFWS_RE, s, pos + 1)
        if pos < n and s[pos] == ",":
            pos = _skip(_SEPARATOR_RE, s, pos)
            if pos < n and s[pos] == "@":
                continue
        raise _AddressError(f"malformed source route at offset {pos}")
    raise _AddressError(f"source route of more than {_MAX_ROUTE_HOPS} domains")


# ---------------------------------------------------------------------------------------
# Private SMTP address check (to be replaced by mailgate.core.address)
# ---------------------------------------------------------------------------------------

_CONTROL_CHAR_RE = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
# RFC 5321 §4.1.3 dcontent: printable ASCII except '[', '\\', ']'.
_ADDRESS_LITERAL_RE = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")
_DOMAIN_LABEL_RE = re.compile(r"[A-Za-z0-9_\-\u0080-\ud7ff\ue000-\U0010ffff]+")
_QUOTED_LOCAL_RE = re.compile(r'"(?:[^"\\]|\\.)*"')


def _smtp_address_problem(address: str) -> str | None:
    """Why ``address`` is not an acceptable SMTP address (``local@domain``), or None.

    Deliberately small (it stands in for ``mailgate.core.address``): both parts
    non-empty; no control character (CR, LF, NUL, other C0, DEL) anywhere; no undecodable
    byte; no space outside a quoted local part; the local part a dot-atom or a
    well-formed quoted string; the domain dot-separated labels of letters, digits, '-',
    '_' or non-ASCII letters, or an address literal in brackets.
    """
    # The '@' that separates the parts: the last one, unless the domain is an address
    # literal (whose text may hold '@').
    at = address.rfind("@[") if address.endswith("]") else address.rfind("@")
    if at <= 0 or at == len(address) - 1:
        return "missing local part or domain"
    local, domain = address[:at], address[at + 1 :]
    if _CONTROL_CHAR_RE.search(address):
        return "control character"
    if _SURROGATE_RE.search(address):
        return "not valid UTF-8"
    if local.startswith('"'):
        if not _QUOTED_LOCAL_RE.fullmatch(local) or local == '""':
            return "malformed quoted local part"
    elif not _DOT_ATOM_RE.fullmatch(local):
        return "malformed local part"
    if domain.startswith("["):
        if not _ADDRESS_LITERAL_RE.fullmatch(domain):
            return "malformed address literal"
    elif not all(_DOMAIN_LABEL_RE.fullmatch(label) for label in domain.split(".")):
        return "malformed domain"
    return None


# ---------------------------------------------------------------------------------------
# Header structure
# ---------------------------------------------------------------------------------------

# A header line that is neither a field (name of printable ASCII except ':' then ':') nor
# a continuation (leading SP/HTAB). Searched on the LF-normalised header.
_BAD_LINE_RE = re.compile(rb"(?m)^(?![\x21-\x39\x3b-\x7e]+:|[ \t])")


def _field_re(names: bytes) -> re.Pattern[bytes]:
    """A pattern for whole fields (with their continuation lines) whose name matches
    ``names`` case-insensitively, on the LF-normalised header; group 1 is the raw value.

    Each kind of field gets its own pattern, so the regex engine (in C) skips every other
    field: a 5 MB header of small fields costs nothing in Python, and fields that are
    only removed are removed by ``sub`` without a Python-level loop.
    """
    return re.compile(rb"(?im)^(?:" + names + rb"):([^\n]*+\n(?:[ \t][^\n]*+\n)*+)")


# Removed by the header firewall (reference §2.4): trace and resent fields, Bcc (its
# addresses become invisible envelope recipients first), and Exchange's organization and
# forest X-headers, which a Pickup file must not be able to forge.
_FIREWALL_RE = _field_re(
    rb"received|resent-[^:\n]*+|bcc|x-ms-exchange-(?:organization|forest)-[^:\n]*+"
)
_FROM_RE = _field_re(rb"from")
_SENDER_RE = _field_re(rb"sender")
_TO_RE = _field_re(rb"to")
_CC_RE = _field_re(rb"cc")
_BCC_RE = _field_re(rb"bcc")
_DATE_RE = _field_re(rb"date")
_SUBJECT_RE = _field_re(rb"subject")
_MESSAGE_ID_RE = _field_re(rb"message-id")
# A Message-ID field with nothing but white space (possibly folded) in it.
_EMPTY_MESSAGE_ID_RE = re.compile(rb"(?im)^message-id:[ \t]*+\n(?:[ \t]++\n)*+(?![ \t])")
_RECEIVED_FIELD_RE = re.compile(rb"Received:[^\r\n]*+\r\n(?:[ \t][^\r\n]*+\r\n)*+", re.I)


def _unfold(raw_value: bytes) -> bytes:
    """RFC 5322 §2.2.3 unfolding: drop the line breaks (continuations start with WSP)."""
    return raw_value.replace(b"\n", b"")


def _line_no(text: bytes, offset: int) -> int:
    return text.count(b"\n", 0, offset) + 1


def _check_structure(head: bytes) -> tuple[bytes, bytes]:
    """Check the header's line syntax; return ``(line_ending, lf_text)``.

    ``lf_text`` is the header with every line ending an LF and a final LF guaranteed.
    Raises PickupError for a NUL byte, mixed line endings, a bare CR, a first line that is
    a continuation, and any line that is neither a field nor a continuation (an empty
    line, a body line, a name with spaces or 8-bit bytes). Refusing, rather than
    normalising, a bare CR or LF is what stops ``Subject: a\\nBcc: x@y\\r\\n`` from
    growing a recipient (reliability.md §2.4, T33).
    """
    first_lf = head.find(b"\n")
    if first_lf > 0 and head[first_lf - 1] == 0x0D:
        ending = b"\r\n"
    elif first_lf >= 0:
        ending = b"\n"
    else:
        ending = b"\r\n"  # a single unterminated line has no ending; CRLF is canonical

    nul = head.find(b"\0")
    if nul >= 0:
        raise PickupError(f"NUL byte in the header at line {_line_no(head, nul)}")

    if ending == b"\r\n":
        crlf = head.count(b"\r\n")
        if crlf != head.count(b"\n") or crlf != head.count(b"\r"):
            _raise_line_ending_error(head, ending)
        text = head.replace(b"\r\n", b"\n")
    else:
        if b"\r" in head:
            _raise_line_ending_error(head, ending)
        text = head
    if text and not text.endswith(b"\n"):
        text += b"\n"  # end of file without a final line ending

    if text[:1] in (b" ", b"\t"):
        raise PickupError("line 1 of the header is a continuation line (starts with white space)")
    m = _BAD_LINE_RE.search(text, 0, max(len(text) - 1, 0))
    if m is not None and text:
        line_no = _line_no(text, m.start())
        line = text[m.start() : text.find(b"\n", m.start())]
        if not line:
            problem = "is empty (a blank line inside the header)"
        elif b":" not in line:
            problem = "is not a header field (no ':'; a body line before the blank line?)"
        else:
            problem = "has an invalid field name"
        raise PickupError(f"header line {line_no} {problem}: {_show_bytes(line)}")
    return ending, text


def _raise_line_ending_error(head: bytes, ending: bytes) -> None:
    """Find the first line that breaks the header's line-ending rule and raise."""
    line_no = 0
    lf_count = head.count(b"\n")
    for line_no, line in enumerate(head.split(b"\n"), start=1):
        has_lf = line_no <= lf_count  # every piece but the last ended in LF
        body, crlf_end = (line[:-1], True) if (has_lf and line.endswith(b"\r")) else (line, False)
        if b"\r" in body:
            raise PickupError(
                f"bare CR inside header line {line_no} (header lines must not contain CR)"
            )
        if has_lf and crlf_end != (ending == b"\r\n"):
            want = "CRLF" if ending == b"\r\n" else "LF"
            got = "CRLF" if crlf_end else "LF"
            raise PickupError(
                f"mixed line endings in the header: line 1 ends with {want}, "
                f"line {line_no} with {got}"
            )
    raise PickupError(f"inconsistent line endings in the header (line {line_no})")


# ---------------------------------------------------------------------------------------
# parse_pickup
# ---------------------------------------------------------------------------------------


def parse_pickup(
    head: bytes,
    *,
    received: bytes,
    max_recipients: int,
    now: datetime.datetime,
    make_message_id: Callable[[], str],
    body_offset: int = 0,
) -> PickupMessage:
    """Check a Pickup header, derive its envelope and build the rewritten header.

    ``head`` is the header section as returned by :func:`read_header_block`.
    ``received`` is our complete ``Received:`` field (CRLF-terminated, may be folded);
    it becomes the first line. ``make_message_id()`` returns a whole Message-ID value
    such as ``<guid@contoso.test>``; it is called only when one is needed. ``now`` is
    the processing time written into a ``Date:`` that is missing or malformed.
    ``body_offset`` (from read_header_block) is copied into the result unchanged.

    Checks, in this order (the first failure wins):

    1. header syntax: one line ending throughout, no NUL, no bare CR, every line a field
       or a continuation, the first line a field;
    2. envelope sender (reference §2.3): one ``Sender:`` address at most; a single
       ``From:`` address is the originator; several ``From:`` addresses need exactly one
       ``Sender:`` address, which is then the originator; only ``Sender:`` -> Sender;
    3. recipients: every address in To, Cc, Bcc (in that order, de-duplicated
       case-insensitively); at least one; at most ``max_recipients``.

    Every failure raises :class:`PickupError`; only too many recipients (with a valid
    sender) carries ``ndr`` and ``sender``, the rest are badmail. No other exception
    escapes for any ``head`` (a bug is turned into badmail with an "internal error"
    reason rather than crashing the Pickup loop). Invalid *arguments* (``received``,
    ``max_recipients``) raise ValueError: those are programming errors, not file errors.

    Rewriting (reference §2.4), byte-level: every kept field keeps its bytes and folding;
    only line endings become CRLF. Removed: ``Received:``, ``Resent-*:``, ``Bcc:``,
    ``X-MS-Exchange-Organization-*:``, ``X-MS-Exchange-Forest-*:``, empty
    ``Message-ID:`` fields, and ``Date:`` fields that do not parse (and any Date after
    the first good one, RFC 5322 allows one). Added after the kept fields:
    ``Message-ID:`` if no non-empty one exists, ``Date:`` if no good one exists,
    ``To: Undisclosed Recipients:;`` if only Bcc gave recipients and there is no To
    field. The header ends with the empty line.
    """
    _check_received(received)
    if max_recipients < 1:
        raise ValueError("max_recipients must be at least 1")
    try:
        msg = _parse(head, received, max_recipients, now, make_message_id)
    except (PickupError, _CallerError):
        raise
    except MemoryError:
        raise  # not a property of the file: let the caller retry later
    except Exception as exc:  # defence in depth: input must never crash the Pickup loop
        raise PickupError(
            f"internal error while parsing the header: {type(exc).__name__}: {exc}"
        ) from exc
    msg.body_offset = body_offset
    return msg


def _check_received(received: bytes) -> None:
    if not isinstance(received, bytes) or not _RECEIVED_FIELD_RE.fullmatch(received):
        raise ValueError("received must be one complete 'Received:' field ending with CRLF")
    if b"\0" in received:
        raise ValueError("received must not contain NUL")


def _parse(
    head: bytes,
    received: bytes,
    max_recipients: int,
    now: datetime.datetime,
    make_message_id: Callable[[], str],
) -> PickupMessage:
    ending, text = _check_structure(head)

    # --- Envelope sender (reference §2.3) ------------------------------------------------
    budget = [_MAX_ADDRESS_ELEMENTS]
    from_addrs = _addresses(_FROM_RE, "From", text, budget)
    sender_addrs = _addresses(_SENDER_RE, "Sender", text, budget)
    if len(sender_addrs) > 1:
        raise PickupError(f"Sender: holds {len(sender_addrs)} addresses; it may hold only one")
    if len(from_addrs) == 1:
        originator = from_addrs[0]  # also when Sender: holds one: Exchange takes From
    elif len(from_addrs) > 1:
        if not sender_addrs:
            raise PickupError(
                f"From: holds {len(from_addrs)} addresses and there is no Sender: "
                "(several From addresses need exactly one Sender address)"
            )
        originator = sender_addrs[0]
    elif sender_addrs:
        originator = sender_addrs[0]
    else:
        raise PickupError("no sender: no address in From: or Sender:")

    # --- Recipients (the sender is valid from here on, so limits are NDRs) -----------------
    budget = [_MAX_ADDRESS_ELEMENTS]
    try:
        to_addrs = _addresses(_TO_RE, "To", text, budget)
        cc_addrs = _addresses(_CC_RE, "Cc", text, budget)
        bcc_addrs = _addresses(_BCC_RE, "Bcc", text, budget)
    except _TooManyElements:
        # Far over any allowed recipient limit; the exact count is not worth the work.
        raise PickupError(
            f"too many recipients: more than {_MAX_ADDRESS_ELEMENTS} addresses in To:, Cc: "
            f"and Bcc: (PickupDirectoryMaxRecipientsPerMessage is {max_recipients})",
            ndr=str(S550_TOO_MANY_RECIPIENTS.with_text(
                f"{S550_TOO_MANY_RECIPIENTS.text} (more than {_MAX_ADDRESS_ELEMENTS}, "
                f"PickupDirectoryMaxRecipientsPerMessage is {max_recipients})")),
            sender=originator,
        ) from None
    recipients: list[str] = []
    seen: set[str] = set()
    for addr in (*to_addrs, *cc_addrs, *bcc_addrs):
        key = addr.casefold()
        if key not in seen:
            seen.add(key)
            recipients.append(addr)
    if not recipients:
        raise PickupError("no recipient in To:, Cc: or Bcc:")
    if len(recipients) > max_recipients:
        sm = _SUBJECT_RE.search(text)
        mm = _MESSAGE_ID_RE.search(text)
        raise PickupError(
            f"too many recipients: {len(recipients)} "
            f"(PickupDirectoryMaxRecipientsPerMessage is {max_recipients})",
            ndr=str(S550_TOO_MANY_RECIPIENTS.with_text(
                f"{S550_TOO_MANY_RECIPIENTS.text} ({len(recipients)}, "
                f"PickupDirectoryMaxRecipientsPerMessage is {max_recipients})")),
            sender=originator,
            recipients=recipients,
            subject=_tracking_subject(_unfold(sm.group(1))) if sm is not None else None,
            message_id=(_unfold(mm.group(1)).strip(b" \t").decode("utf-8", "replace") or None)
            if mm is not None else None,
        )
    bcc_only = not to_addrs and not cc_addrs

    # --- Rewriting (reference §2.4); every step is a C-level regex pass ---------------------
    added: list[bytes] = []
    kept = _FIREWALL_RE.sub(b"", text)

    # An empty Message-ID is replaced, not kept beside ours.
    kept = _EMPTY_MESSAGE_ID_RE.sub(b"", kept)
    m = _MESSAGE_ID_RE.search(kept)
    if m is not None:
        message_id = _unfold(m.group(1)).strip(b" \t").decode("utf-8", "replace")
    else:
        message_id = _generate_message_id(make_message_id)
        added.append(b"Message-ID: " + message_id.encode("utf-8"))

    # Keep the first Date that parses where it is; drop the malformed ones and (RFC 5322
    # allows one Date) any later ones.
    good_date = None
    for i, m in enumerate(_DATE_RE.finditer(kept)):
        if i >= _MAX_DATE_FIELDS_TRIED:
            break
        if _date_parses(_unfold(m.group(1))):
            good_date = m
            break
    if good_date is not None:
        kept = (
            _DATE_RE.sub(b"", kept[: good_date.start()])
            + good_date.group()
            + _DATE_RE.sub(b"", kept[good_date.end() :])
        )
    else:
        kept = _DATE_RE.sub(b"", kept)
        added.append(b"Date: " + _format_date(now))

    if bcc_only and _TO_RE.search(text) is None:
        # An empty group: valid RFC 5322, and what Exchange writes for Bcc-only mail.
        added.append(b"To: Undisclosed Recipients:;")

    m = _SUBJECT_RE.search(text)
    subject = _tracking_subject(_unfold(m.group(1))) if m is not None else ""

    header = b"".join(
        [
            received,
            kept.replace(b"\n", b"\r\n"),
            *(line + b"\r\n" for line in added),
            b"\r\n",
        ]
    )
    return PickupMessage(
        sender=originator,
        recipients=recipients,
        header=header,
        body_offset=0,
        line_ending=ending,
        message_id=message_id,
        subject=subject,
        bcc_only=bcc_only,
    )


def _addresses(
    pattern: re.Pattern[bytes], header: str, text: bytes, budget: list[int]
) -> list[str]:
    """All addresses of the fields ``pattern`` finds, in order; PickupError for an
    invalid one. Several fields of one name are read as one list (several From fields
    count as several addresses)."""
    out: list[str] = []
    try:
        for m in pattern.finditer(text):
            budget[0] -= 1  # each field is an element too (a million empty To: fields)
            if budget[0] < 0:
                raise _TooManyElements()
            # surrogateescape keeps 8-bit bytes visible to the address check, which
            # refuses them in addresses (display names may hold anything).
            value = _unfold(m.group(1)).decode("utf-8", "surrogateescape")
            try:
                out.extend(_parse_address_list(value, budget))
            except _AddressError as exc:
                raise PickupError(
                    f"invalid address in {header}: at header line {_line_no(text, m.start())} "
                    f"({exc.args[0]}): {_show(value.strip())}"
                ) from None
    except _TooManyElements:
        if header in ("From", "Sender"):
            raise PickupError(
                f"{header}: holds more than {_MAX_ADDRESS_ELEMENTS} addresses"
            ) from None
        raise
    return out


class _CallerError(ValueError):
    """The caller's ``make_message_id`` failed or returned an unusable value: a bug in
    the caller, not a property of the file, so it is not turned into badmail."""


def _generate_message_id(make_message_id: Callable[[], str]) -> str:
    try:
        message_id = make_message_id()
    except Exception as exc:
        raise _CallerError(f"make_message_id() failed: {exc!r}") from exc
    if (
        not isinstance(message_id, str)
        or not message_id
        or any(ord(c) < 0x21 or ord(c) == 0x7F for c in message_id)
    ):
        raise _CallerError(
            f"make_message_id() must return a non-empty value without spaces or controls, "
            f"got {message_id!r}"
        )
    return message_id


@functools.lru_cache(maxsize=4)
def _format_date(now: datetime.datetime) -> bytes:
    # Files of one batch share `now`: format it once.
    return email.utils.format_datetime(now).encode("ascii")


def _date_parses(value: bytes) -> bool:
    """True if the Date value is a date (email.utils.parsedate_to_datetime accepts it)."""
    text = value.strip(b" \t")
    if not text or len(text) > _MAX_DATE_CHARS:
        return False
    try:
        return email.utils.parsedate_to_datetime(text.decode("ascii")) is not None
    except Exception:  # ValueError, TypeError, IndexError, OverflowError, Unicode...
        return False


def _tracking_subject(value: bytes) -> str:
    """The Subject for message tracking: decoded, one line, at most 255 characters."""
    # Tracking is display text: decode 8-bit bytes leniently (U+FFFD), never as
    # surrogates that would break a later UTF-8 encode in the log or database.
    raw = value[:_MAX_SUBJECT_SOURCE].decode("utf-8", "replace")
    if raw.isascii() and "=?" not in raw and raw.isprintable():
        # The common case needs no RFC 2047 decoding (and the parser costs ~50 µs).
        return " ".join(raw.split())[:_MAX_SUBJECT]
    try:
        # The email package's unstructured-header parser: decodes RFC 2047 words and
        # tolerates unknown charsets and bad encodings instead of raising.
        text = str(_email_policy.default.header_factory("subject", raw))
    except Exception:
        text = raw
    text = "".join(" " if (ord(c) < 0x20 or ord(c) == 0x7F) else c for c in text)
    return " ".join(text.split())[:_MAX_SUBJECT]


# ---------------------------------------------------------------------------------------
# Reason text
# ---------------------------------------------------------------------------------------

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def _one_line(text: str) -> str:
    """Escape control characters (and undecodable bytes) so the text is one line."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()) & 0xFF:02x}", text)


def _show(value: str, limit: int = _REASON_VALUE_CHARS) -> str:
    """Quote a value for a reason, cut to ``limit`` characters."""
    if len(value) > limit:
        value = value[:limit] + "..."
    return '"' + _one_line(value) + '"'


def _show_bytes(value: bytes) -> str:
    return _show(value[: _REASON_VALUE_CHARS * 4].decode("utf-8", "surrogateescape"))
