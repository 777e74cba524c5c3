"""SMTP command syntax for the Receive connectors' server: MAIL/RCPT paths and their ESMTP
parameters (RFC 5321, 1869, 3461), reply texts made safe, and RFC 2034 enhanced codes for
replies that lack one. Pure functions: the server (smtp_server) decides what to answer.
"""

from __future__ import annotations

from mailgate.core.address import AddressError, parse_smtp_address

MAX_PATH = 256           # octets of a reverse- or forward-path, brackets included


# RFC 2034: with ENHANCEDSTATUSCODES every reply but the greeting and EHLO/HELO's carries
# an enhanced code; aiosmtpd's own replies (RSET, NOOP, QUIT, syntax errors) get one here.
_DEFAULT_ENHANCED = {"221": "2.0.0", "250": "2.0.0", "252": "2.0.0", "354": "", "421": "4.3.2",
                     "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1",
                     "504": "5.5.4", "530": "5.7.0", "554": "5.3.0", "555": "5.5.4"}


def enhanced(text: str) -> str:
    code, sep, rest = text.partition(" ")
    if not sep or text[3:4] != " " or rest[:1].isdigit() and rest[1:2] == ".":
        return text
    enhanced = _DEFAULT_ENHANCED.get(code)
    if not enhanced:
        return text
    return f"{code} {enhanced} {rest}"


def keyword(arg: str | None, keyword: str) -> str | None:
    if arg is None or arg[:len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword):].strip(" ")


def path(text: str, allow_null: bool) -> tuple[str, dict[str, str]]:
    """The address of a MAIL/RCPT path (a source route is dropped, RFC 5321 4.1.2) and its
    ESMTP parameters (keys upper-cased, each once)."""
    if not text.startswith("<"):
        raise ValueError("the address must be in angle brackets")
    end = text.find(">")
    if end < 0:
        raise ValueError("the address has no closing '>'")
    inner, rest = text[1:end], text[end + 1:]
    if rest and not rest.startswith(" "):
        raise ValueError("parameters must follow the address after a space")
    if len(inner.encode("utf-8")) + 2 > MAX_PATH:
        raise ValueError(f"the path is longer than {MAX_PATH} octets (RFC 5321 4.5.3.1.3)")
    if inner.startswith("@") and ":" in inner:
        inner = inner.split(":", 1)[1]
    if inner == "":
        if not allow_null:
            raise ValueError("the null address is not a recipient")
        address = ""
    else:
        try:
            address = str(parse_smtp_address(inner))
        except AddressError as exc:
            raise ValueError(str(exc)) from None
    params: dict[str, str] = {}
    for token in rest.split():
        key, eq, value = token.partition("=")
        key = key.upper()
        if not key.isalnum() or (eq and not value) or key in params:
            raise ValueError(f"malformed parameter {token[:40]}")
        params[key] = value
    return address, params


def printable(text: str) -> str:
    return "".join(ch if 32 < ord(ch) < 127 else "?" for ch in text)


def reply_text(text: str) -> str:
    """Text for a reply: printable ASCII (anything else `?`), at most 300 characters."""
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)[:300]

