"""Parse the envelope of a Replay directory file and rewrite its header (Exchange 2013).

Pure: works on the header block (``head``, as :func:`~mailgate.receive.pickup_parse.
read_header_block` returns it: every header line, no empty line, offsets from the start of
the file); never touches the file system, the queue or the clock.

Contract of :func:`parse_replay` (reference ``exchange-transport.md`` §2.5, §2.7; PRODUCT §4.5):

* The Replay X-headers come first. ``X-Sender`` exactly once (one SMTP address or ``<>``;
  parameters ``BODY RET ENVID AUTH``); ``X-Receiver`` at least once (one address each, SMTP or
  ``TYPE:value``; parameters ``NOTIFY ORCPT``); optional ``X-CreatedBy`` (never blank),
  ``X-HeloDomain``, ``X-Source``, ``X-SourceIPAddress``, ``X-ExtendedMessageProps``, each at
  most once, and ``X-EndOfInjectedXHeaders``. Order among them is free (Exchange's own example
  puts X-Receiver first); names, parameter names and keyword values are case-insensitive.
* Where the envelope ends: with ``X-EndOfInjectedXHeaders`` (mailgate's Drop files carry it),
  just after it; any other X- field before it is part of the injected block and ignored.
  Anything after it is the message, even a field named X-Sender (webmail such as Roundcube
  writes one). Without the marker, the envelope is the leading run of Replay X-headers, and an
  X-Sender, X-Receiver or marker after the first other field is refused: Exchange requires all
  X-headers first, and a late one could not be told apart from the message's own header.
* Every problem raises :class:`ReplayError` (a :class:`PickupError`: ``reason`` is one line for
  the ``.bad.reason`` file). It is badmail, except that an invalid X-Receiver *address* with a
  valid, non-null sender sets ``ndr``/``sender``/``recipients`` (§2.7: "valid format but
  invalid recipients" is badmail only when no NDR is possible). No other exception escapes.
* Not checked here (the directory service's job): the ``.eml`` name, claiming, ``.bad`` and NDR
  files, header-size and recipient-count limits, tracking, and trust (a per-directory setting,
  never the X-CreatedBy string, PRODUCT §4.5).

:func:`rewrite_replay_header` applies the §2.6 modifications to the header that is submitted.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from mailgate.core.address import AddressError, parse_recipient_address, parse_smtp_address
from mailgate.core.status import Status

# The Pickup parser's header-syntax check and Message-ID/Date repair are reused, not copied,
# so Pickup and Replay files are held to the same header rules (reference §2.6: "repaired as
# for Pickup").
from mailgate.receive.pickup_parse import (
    _DATE_RE, _EMPTY_MESSAGE_ID_RE, _MAX_DATE_FIELDS_TRIED, _MESSAGE_ID_RE, PickupError,
    _check_received, _check_structure, _date_parses, _field_re, _format_date,
    _generate_message_id, _show, _unfold,
)

__all__ = ["ReplayEnvelope", "ReplayError", "ReplayReceiver", "parse_replay",
           "rewrite_replay_header"]

# Envelope fields are short (an X-Receiver with the longest address, ORCPT and NOTIFY is about
# 1.2 KB); the limit bounds the work on hostile lines. X-ExtendedMessageProps is an opaque
# blob of undocumented size, so it gets more room.
MAX_FIELD_BYTES = 8192
MAX_PROPS_BYTES = 65536
# Values Exchange assumes when the optional field is absent (reference §2.5).
DEFAULT_CREATED_BY = "Unspecified"
DEFAULT_SOURCE = "Replay"
DEFAULT_SOURCE_IP = "0.0.0.0"

_NAMES = {n.lower(): n for n in (
    "X-Sender", "X-Receiver", "X-CreatedBy", "X-EndOfInjectedXHeaders", "X-ExtendedMessageProps",
    "X-HeloDomain", "X-Source", "X-SourceIPAddress")}
_SENDER, _RECEIVER, _END = "x-sender", "x-receiver", "x-endofinjectedxheaders"
_FIELD = re.compile(rb"([^:\n]*+):([^\n]*+\n(?:[ \t][^\n]*+\n)*+)")
_LATE = re.compile(rb"(?im)^(x-sender|x-receiver|x-endofinjectedxheaders):")
# RFC 5321 esmtp-keyword ["=" esmtp-value]: the value is printable ASCII without '=', so a
# Unicode look-alike ("ſuccess".upper() == "SUCCESS") never reaches the keyword checks.
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([!-<>-~]*))?")
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})+")  # RFC 3461 §4 (hex in any case)
_HEXCHAR = re.compile(rb"\+([0-9A-Fa-f]{2})")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
# Controls (TAB aside) and Unicode line breaks: a value may end up in a log line or a DSN field.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_BLANKS = re.compile(r"[ \t]+")
_NOTIFY = ("SUCCESS", "FAILURE", "DELAY")
_S550_INVALID_RECIPIENT = Status(550, "5.1.3", "invalid recipient address")
_BCC_RE = _field_re(rb"bcc")
_ORG_FOREST_RE = _field_re(rb"x-ms-exchange-(?:organization|forest)-[^:\n]*+")


class ReplayError(PickupError):
    """The Replay file cannot be submitted; same contract as :class:`PickupError`."""


@dataclass
class ReplayReceiver:
    address: str  # SMTP "local@domain" or "TYPE:value" (type upper-cased), as address.py prints it
    notify: str | None = None  # "NEVER", or SUCCESS/FAILURE/DELAY comma-separated, upper-case
    orcpt: str | None = None  # "addr-type;xtext" as given (Exchange's bare form gets "rfc822;")


@dataclass
class ReplayEnvelope:
    sender: str  # SMTP address, "" for the null sender <>
    receivers: list[ReplayReceiver]  # in file order, duplicates (same address key) dropped
    header_offset: int  # where the message proper starts in ``head`` (and in the file)
    body: str | None = None  # 7BIT, 8BITMIME or BINARYMIME
    ret: str | None = None  # FULL or HDRS
    envid: str | None = None  # decoded from xtext
    auth: str | None = None  # the AUTH= value as given (xtext)
    created_by: str | None = None
    helo_domain: str | None = None
    source: str | None = None
    source_ip: str | None = None  # normalised IP address text
    extended_props: str | None = None
    injected_size: int | None = None  # the X-EndOfInjectedXHeaders value, not enforced
    ignored: list[str] = field(default_factory=list)  # unknown X- fields before the marker

    @property
    def effective_created_by(self) -> str:
        return self.created_by or DEFAULT_CREATED_BY

    @property
    def message_source_name(self) -> str:
        return self.source or DEFAULT_SOURCE

    @property
    def effective_source_ip(self) -> str:
        return self.source_ip or DEFAULT_SOURCE_IP


def parse_replay(head: bytes) -> ReplayEnvelope:
    """Read the envelope of a Replay file from its header block (see the module docstring)."""
    try:
        return _parse(head)
    except PickupError as exc:
        raise exc if isinstance(exc, ReplayError) else ReplayError(exc.reason) from None
    except MemoryError:
        raise  # not a property of the file: let the caller retry later
    except Exception as exc:  # defence in depth: input must never crash the Replay loop
        raise ReplayError(f"internal error while parsing the Replay header: "
                          f"{type(exc).__name__}: {exc}") from exc


def _parse(head: bytes) -> ReplayEnvelope:
    # NUL, bare CR, mixed line endings and non-field lines anywhere in the header: refusing
    # them (not repairing) is what stops "X-Receiver: <a@b>\rX-Receiver: <c@d>" injection.
    ending, text = _check_structure(head)
    run: list[tuple[str, str, bytes, int, int]] = []  # lower name, name, raw value, line, end
    pos, line, marked = 0, 1, False
    while (m := _FIELD.match(text, pos)) is not None:
        name = m.group(1).decode("ascii")
        if not name.lower().startswith("x-"):
            break
        run.append((name.lower(), name, m.group(2), line, m.end()))
        pos, line = m.end(), line + m.group().count(b"\n")
        if name.lower() == _END:
            marked = True
            break
    if not marked:
        n = 0
        while n < len(run) and run[n][0] in _NAMES:
            n += 1
        run = run[:n]
    lf_end = run[-1][4] if run else 0
    if not marked and (late := _LATE.search(text, lf_end)) is not None:
        first = _FIELD.match(text, lf_end)
        first_name = first.group(1).decode("ascii") if first else "?"
        raise ReplayError(
            f"{_NAMES[late.group(1).decode().lower()]} at line {_line(text, late.start())} comes "
            f"after the header field {first_name} at line {_line(text, lf_end)}: the Replay "
            f"X-headers must come before all other header fields")

    singles: dict[str, tuple[str, str]] = {}  # lower name -> (value, where)
    raw_receivers: list[tuple[str, str]] = []
    ignored: list[str] = []
    for lower, name, raw, ln, _ in run:
        where = f"{_NAMES.get(lower, name)} at line {ln}"
        if lower not in _NAMES:
            ignored.append(name)
            continue
        limit = MAX_PROPS_BYTES if lower == "x-extendedmessageprops" else MAX_FIELD_BYTES
        if len(raw) > limit:
            raise ReplayError(f"{where} is {len(raw)} bytes long, more than the limit of {limit}")
        value = _value(raw, where)
        if lower == _RECEIVER:
            raw_receivers.append((value, where))
        elif lower in singles:
            raise ReplayError(f"{where} repeats {singles[lower][1]}; it may appear only once")
        else:
            singles[lower] = (value, where)
    if _SENDER not in singles:
        raise ReplayError("no X-Sender field: a Replay file must start with the X-Sender and "
                          "X-Receiver fields")
    if not raw_receivers:
        raise ReplayError("no X-Receiver field: a Replay file needs at least one")

    # Offsets so far count LF-normalised lines; a CRLF file has one more byte per line.
    offset = lf_end + (text.count(b"\n", 0, lf_end) if ending == b"\r\n" else 0)
    sender, params = _sender(*singles[_SENDER])
    env = ReplayEnvelope(sender, [], min(len(head), offset), body=params.get("BODY"),
                         ret=params.get("RET"), envid=params.get("ENVID"),
                         auth=params.get("AUTH"), ignored=ignored)
    _optional(env, singles)

    bad: list[tuple[str, str]] = []  # (address text, reason)
    seen: set[str] = set()
    for value, where in raw_receivers:
        text_addr, rest = _split_address(value, where)
        params = _params(rest, where, ("NOTIFY", "ORCPT"))
        notify = _notify(params["NOTIFY"], where) if "NOTIFY" in params else None
        orcpt = _orcpt(params["ORCPT"], where) if "ORCPT" in params else None
        try:
            addr = parse_recipient_address(text_addr)
        except AddressError as exc:
            bad.append((text_addr, f"{where}: {exc}"))
            continue
        if addr.key not in seen:  # the same recipient twice would be delivered twice
            seen.add(addr.key)
            env.receivers.append(ReplayReceiver(str(addr), notify, orcpt))
    if bad:
        more = f" (and {len(bad) - 1} more invalid X-Receiver)" if len(bad) > 1 else ""
        if env.sender:
            raise ReplayError(bad[0][1] + more, ndr=str(_S550_INVALID_RECIPIENT),
                              sender=env.sender, recipients=[a for a, _ in bad])
        raise ReplayError(bad[0][1] + more + "; no NDR is possible to the null sender")
    return env


def _line(text: bytes, offset: int) -> int:
    return text.count(b"\n", 0, offset) + 1


def _value(raw: bytes, where: str) -> str:
    """The unfolded value: UTF-8, no control characters, surrounding blanks removed."""
    try:
        value = _unfold(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ReplayError(f"{where}: the value is not valid UTF-8") from None
    if (m := _CONTROL.search(value)) is not None:
        raise ReplayError(f"{where}: control character U+{ord(m.group()):04X} in the value")
    return value.strip(" \t")


def _split_address(value: str, where: str) -> tuple[str, str]:
    """Split ``<address> params`` (or ``address params``) into the address and the rest.

    A bracketed address ends at the first '>' outside a quoted string that is followed by a
    blank or the end: a typed value may contain blanks (``<X400:c=US;a= ;p=...>``) and AUTH's
    value may contain '>' (``auth=<someAuth>``)."""
    if not value:
        raise ReplayError(f"{where} has no address")
    if not value.startswith("<"):
        addr, *rest = _BLANKS.split(value, maxsplit=1)
        return addr, rest[0] if rest else ""
    quoted = escaped = False
    for i in range(1, len(value)):
        ch = value[i]
        if escaped:
            escaped = False
        elif quoted:
            quoted, escaped = ch != '"', ch == "\\"
        elif ch == '"':
            quoted = True
        elif ch == ">" and (i + 1 == len(value) or value[i + 1] in " \t"):
            return value[1:i], value[i + 1:]
    raise ReplayError(f"{where}: the address {_show(value)} has no closing '>'")


def _params(rest: str, where: str, known: tuple[str, ...]) -> dict[str, str]:
    """ESMTP-style ``KEY=value`` parameters: keys case-insensitive, each once, with a value."""
    out: dict[str, str] = {}
    rest = rest.strip(" \t")
    for token in _BLANKS.split(rest) if rest else ():
        m = _PARAM.fullmatch(token)
        if m is None:
            raise ReplayError(f"{where}: malformed parameter {_show(token)}")
        key = m.group(1).upper()
        if key not in known:
            raise ReplayError(f"{where}: unknown parameter {_show(m.group(1))} "
                              f"(accepted: {', '.join(known)})")
        if key in out:
            raise ReplayError(f"{where}: parameter {key} is given twice")
        if not m.group(2):
            raise ReplayError(f"{where}: parameter {key} has no value")
        out[key] = m.group(2)
    return out


def _xtext_decode(value: str, what: str, where: str) -> bytes:
    """RFC 3461 xtext to bytes; refuses bad syntax and decoded control characters (the value
    is written decoded into DSN fields, where a CR or LF would inject a header)."""
    if not _XTEXT.fullmatch(value):
        raise ReplayError(f"{where}: {what} {_show(value)} is not valid xtext (RFC 3461: '+' "
                          "must be followed by two hex digits; '=', blanks and controls encoded)")
    decoded = _HEXCHAR.sub(lambda m: bytes.fromhex(m.group(1).decode()), value.encode("ascii"))
    if (m := re.search(rb"[\x00-\x1f\x7f]", decoded)) is not None:
        raise ReplayError(f"{where}: {what} decodes to the control character "
                          f"U+{m.group()[0]:04X}")
    return decoded


def _sender(value: str, where: str) -> tuple[str, dict[str, str]]:
    """The X-Sender address ("" for <>) and its parameters, normalised."""
    text_addr, rest = _split_address(value, where)
    if text_addr == "" and value.startswith("<"):
        sender = ""
    else:
        try:
            sender = str(parse_smtp_address(text_addr))
        except AddressError as exc:
            raise ReplayError(f"{where}: {exc}") from None
    params = _params(rest, where, ("BODY", "RET", "ENVID", "AUTH"))
    for key, allowed in (("BODY", ("7BIT", "8BITMIME", "BINARYMIME")), ("RET", ("FULL", "HDRS"))):
        if key in params:
            if params[key].upper() not in allowed:
                raise ReplayError(f"{where}: {key}={_show(params[key])} is not one of "
                                  f"{', '.join(allowed)}")
            params[key] = params[key].upper()
    if "ENVID" in params:
        try:
            envid = _xtext_decode(params["ENVID"], "ENVID", where).decode("utf-8")
        except UnicodeDecodeError:
            raise ReplayError(f"{where}: ENVID does not decode to UTF-8 text") from None
        if (m := _CONTROL.search(envid)) is not None:
            raise ReplayError(f"{where}: ENVID decodes to the control character "
                              f"U+{ord(m.group()):04X}")
        params["ENVID"] = envid
    if "AUTH" in params:
        _xtext_decode(params["AUTH"], "AUTH", where)  # checked, kept as given (RFC 4954)
    return sender, params


def _notify(value: str, where: str) -> str:
    """RFC 3461 NOTIFY: NEVER alone, or any of SUCCESS, FAILURE, DELAY (reference §2.5 accepts
    SUCCESS too). Upper-cased, repeats dropped, order kept."""
    items = value.upper().split(",")
    if items == ["NEVER"]:
        return "NEVER"
    if "NEVER" in items:
        raise ReplayError(f"{where}: NOTIFY=NEVER cannot be combined with other values")
    for item in items:
        if item not in _NOTIFY:
            raise ReplayError(f"{where}: NOTIFY value {_show(item)} is not one of NEVER, "
                              f"SUCCESS, FAILURE, DELAY")
    return ",".join(dict.fromkeys(items))


def _orcpt(value: str, where: str) -> str:
    """RFC 3461 ``addr-type;xtext``. Exchange's documented example writes a bare address
    (``ORcpt=mary@contoso.com``); that form is read as rfc822."""
    addr_type, semi, addr = value.partition(";")
    if not semi:
        addr_type, addr, value = "rfc822", value, "rfc822;" + value
    if not _ATOM.fullmatch(addr_type):
        raise ReplayError(f"{where}: ORCPT address type {_show(addr_type)} is not an atom")
    _xtext_decode(addr, "ORCPT", where)
    return value


def _optional(env: ReplayEnvelope, singles: dict[str, tuple[str, str]]) -> None:
    """The optional X-headers; a blank one counts as absent except X-CreatedBy (§2.5)."""
    get = {k: v for k, (v, _) in singles.items()}
    if "x-createdby" in singles and not get["x-createdby"]:
        raise ReplayError(f"{singles['x-createdby'][1]} is blank (it may be absent, not empty)")
    env.created_by = get.get("x-createdby")
    env.helo_domain = get.get("x-helodomain") or None
    env.source = get.get("x-source") or None
    env.extended_props = get.get("x-extendedmessageprops") or None
    if ip := get.get("x-sourceipaddress"):
        try:
            env.source_ip = str(ipaddress.ip_address(ip))
        except ValueError:
            raise ReplayError(f"{singles['x-sourceipaddress'][1]}: {_show(ip)} is not an IPv4 "
                              "or IPv6 address") from None
    if _END in singles:
        size, where = singles[_END]
        if not re.fullmatch(r"[0-9]{1,12}", size):
            raise ReplayError(f"{where}: {_show(size)} is not a size in bytes")
        # Recorded, not enforced: Exchange documents the value only loosely ("size in bytes of
        # all the X-Headers present") and a CRLF-to-LF conversion of a valid file changes it.
        env.injected_size = int(size)


def rewrite_replay_header(head: bytes, envelope: ReplayEnvelope, *, received: bytes,
                          trusted: bool, now: datetime.datetime,
                          make_message_id: Callable[[], str]) -> bytes:
    """The header to submit for a parsed Replay file (reference §2.6).

    ``head`` and ``envelope`` are what :func:`parse_replay` read and returned; ``received``
    is the caller's ``Received: from <server> by Replay with ...`` field (CRLF-terminated),
    which becomes the first line. Removed: the envelope block (``head[:header_offset]``: it is
    the envelope, not the message), ``Bcc:``, and ``X-MS-Exchange-Organization-*`` /
    ``X-MS-Exchange-Forest-*`` unless ``trusted`` (the directory's setting; Exchange's
    ``X-CreatedBy: MSExchange15`` string grants nothing, PRODUCT §4.5). Kept: routing
    headers (``Received:``, ``Resent-*:``), unlike Pickup. Repaired as for Pickup: a missing
    or empty Message-ID is added from ``make_message_id()``; malformed and extra Date fields
    are dropped and ``Date: now`` added if none is valid. Kept fields keep their bytes and
    folding; line endings become CRLF; the result ends with the empty line.
    """
    _check_received(received)
    try:
        _, kept = _check_structure(head[envelope.header_offset:])
    except PickupError as exc:
        raise ReplayError(exc.reason) from None
    kept = _EMPTY_MESSAGE_ID_RE.sub(b"", _BCC_RE.sub(b"", kept))
    if not trusted:
        kept = _ORG_FOREST_RE.sub(b"", kept)
    added: list[bytes] = []
    if _MESSAGE_ID_RE.search(kept) is None:
        added.append(b"Message-ID: " + _generate_message_id(make_message_id).encode("utf-8"))
    good = None
    for i, m in enumerate(_DATE_RE.finditer(kept)):
        if i >= _MAX_DATE_FIELDS_TRIED:
            break
        if _date_parses(_unfold(m.group(1))):
            good = m
            break
    if good is None:
        kept = _DATE_RE.sub(b"", kept)
        added.append(b"Date: " + _format_date(now))
    else:  # keep the first good Date where it is; RFC 5322 allows one
        kept = (_DATE_RE.sub(b"", kept[:good.start()]) + good.group()
                + _DATE_RE.sub(b"", kept[good.end():]))
    return b"".join([received, kept.replace(b"\n", b"\r\n"),
                     *(line + b"\r\n" for line in added), b"\r\n"])


def esmtp_notify(value: str) -> str:
    """An RFC 3461 NOTIFY value, normalised (ValueError with the reason if invalid)."""
    try:
        return _notify(value, "NOTIFY")
    except ReplayError as exc:
        raise ValueError(str(exc)) from None


def esmtp_orcpt(value: str) -> str:
    """An RFC 3461 ORCPT value, checked (ValueError with the reason if invalid)."""
    try:
        return _orcpt(value, "ORCPT")
    except ReplayError as exc:
        raise ValueError(str(exc)) from None


def esmtp_envid(value: str) -> str:
    """An RFC 3461 ENVID (xtext), decoded (ValueError with the reason if invalid)."""
    try:
        envid = _xtext_decode(value, "ENVID", "ENVID").decode("utf-8")
    except (ReplayError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc) if isinstance(exc, ReplayError)
                         else "ENVID does not decode to UTF-8 text") from None
    return envid

