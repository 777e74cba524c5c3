"""The built-in `lmtp` delivery agent: each message goes to an LMTP server (RFC 2033), such
as Dovecot's, which answers for every recipient after the data (PRODUCT §4.7).

Contract
--------
Settings (checked by `LmtpAgent.check(settings)` when a connector is created or changed,
and again by `open_connection`); exactly one of `host` and `socket` is required:

- `host`: `name:port`, `1.2.3.4:port` or `[ipv6]:port`; the port defaults to 24. An IPv6
  address must be written in brackets.
- `socket`: the absolute path of a UNIX socket (e.g. `/run/dovecot/lmtp`).
- `lhlo` (optional): the name sent in LHLO, a host name or an `[address literal]`;
  default this host's name (`mailgate.settings.host_name`).
- `timeout` (int seconds, default 300): the longest wait for each reply and for each
  write of the message data; and also the most one whole message may take (its commands,
  data and replies) and opening a connection may take (connect, greeting, LHLO), so that
  the node's own limit for an item (`timeout` plus a grace) never cuts the agent short.
- `recipient-limit` (int, optional): recipients per transaction;
  `LmtpAgent.recipient_limit_for(settings)` gives it to the scheduler.

Session: `open_connection` connects, reads the 220 greeting and sends LHLO; any failure
there raises `LmtpUnavailable` (the queue goes to Retry with its text). One connection
carries every item of the session: RSET before each item after the first, then
`MAIL FROM:<sender>` (with `SIZE=` if the server advertises SIZE, and `ENVID=` if it
advertises DSN), one `RCPT TO:<address>` per recipient (with the recipient's `NOTIFY=` and
`ORCPT=` if it advertises DSN), `DATA`, the message, and one reply per recipient the server
accepted at RCPT (LMTP's per-recipient result). `close` sends QUIT. Commands are sent one at
a time (no pipelining).

The message is streamed from `item.chunks()`, one chunk in memory at a time. On the wire
every line ends in CRLF: a bare LF or a bare CR in the stored message becomes CRLF (the
message is not otherwise changed); a line that begins with `.` gets another `.` (dot
stuffing, also across chunk boundaries); a message that does not end with a line break
gets one; the data ends with `.` CRLF.

Outcome per recipient, from the server's reply to the command that decided it (MAIL FROM
for every recipient if it is refused, else RCPT TO, else DATA, else the reply after the
data):

- 2xx: delivered; 4xx: deferred; 5xx: failed. The status keeps the server's reply code and
  its enhanced status code (when the reply has one of the same class; else X.0.0), and the
  text names the server and quotes its reply, as one line of printable ASCII, e.g.
  `550 5.1.1 127.0.0.1:24 said: <bob@example.test> User doesn't exist (in reply to RCPT
  TO)`;
- a recipient refused at RCPT is not sent the data; if no recipient is accepted, DATA is
  not sent at all;
- connection lost, or a reply or write that does not come within `timeout` (or within
  what is left of it for the message): every recipient without a result yet is deferred
  4.4.2; a reply that is not valid SMTP, 4.5.0. The connection is then dropped and the
  next item of the session connects again; if that fails, that item and the rest of the
  session are deferred 4.4.1 with the reason. A connection the server closed while idle
  (the RSET finds it closed) is opened again for the item;
- a recipient or sender that cannot be written in an LMTP command (no `@`, spaces,
  control characters, `<` or `>`, non-ASCII) fails 5.1.3 (sender: 5.1.7 for every
  recipient) without being sent.

`deliver` raises only when the message cannot be read; the connection is dropped first,
without the final `.`, so the server never takes a truncated message as whole. That is the
contract's item deferral.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Literal, Mapping

from mailgate.core.status import leading_enhanced
from mailgate.core.text import one_line
from mailgate.deliver.agents.api import Item, NextHop, RecipientResult, Setting
from mailgate.deliver.agents.registry import AgentError, int_setting
from mailgate.deliver.wire import WireData
from mailgate.settings import host_name

DEFAULT_PORT = 24
DEFAULT_TIMEOUT = 300
LINE_LIMIT = 8192           # bytes in one reply line
REPLY_LINES = 200           # lines in one (multi-line) reply
EXCERPT = 300               # characters of a server's reply kept in a status text
QUIT_WAIT = 10.0            # seconds to wait for the reply to QUIT

CONNECT_STATUS = "4.4.1"
LOST_STATUS = "4.4.2"
PROTOCOL_STATUS = "4.5.0"

_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])(?:([ -])(.*))?$", re.DOTALL)
_HOST_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_LHLO_NAME = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?"
                        r"|\[[\x21-\x5a\x5e-\x7e]+\])$")
_ADDRESS = re.compile(r"^[\x21-\x3b\x3d\x3f-\x7e]+@[\x21-\x3b\x3d\x3f-\x7e]+$")
_NOTIFY = re.compile(r"^[A-Za-z]+(?:,[A-Za-z]+)*$")
_ORCPT = re.compile(r"^[A-Za-z0-9-]+;[\x21-\x2a\x2c-\x3c\x3e-\x7e]+$")
_OUTCOMES: dict[int, Literal["delivered", "deferred", "failed"]] = {
    2: "delivered", 4: "deferred", 5: "failed"}


class LmtpUnavailable(Exception):
    """The session cannot be opened (cannot connect, refused greeting or LHLO)."""


class MessageUnreadable(Exception):
    """The message could not be read while it was sent."""


class _Lost(Exception):
    """The connection can no longer be used: lost, timed out, or a bad reply."""

    def __init__(self, reason: str, enhanced: str = LOST_STATUS,
                 closed: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.enhanced = enhanced
        self.closed = closed      # the server closed (or reset) the connection


# -- settings -----------------------------------------------------------------------------

def _parse_host(value: str) -> tuple[str, int]:
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise AgentError(f"setting host: missing ']' in '{value}'")
        host, rest = text[1:end], text[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AgentError(f"setting host: '{host}' in brackets is not an IPv6 "
                             f"address") from None
        if rest and not rest.startswith(":"):
            raise AgentError(f"setting host must be host:port or [ipv6]:port, not '{value}'")
        port = rest[1:] if rest else None
    else:
        if text.count(":") > 1:
            raise AgentError(f"setting host: write an IPv6 address in brackets, as "
                             f"[{text}] or [{text}]:{DEFAULT_PORT}")
        host, sep, rest = text.partition(":")
        port = rest if sep else None
        if not _HOST_NAME.match(host):
            raise AgentError(f"setting host: '{host}' is not a host name or address")
    if port is None:
        return host, DEFAULT_PORT
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise AgentError(f"setting host: the port must be 1 to 65535, not '{port}'")
    return host, int(port)


def _default_lhlo() -> str:
    name = host_name("localhost")
    return name if _LHLO_NAME.match(name) else "localhost"


@dataclass(frozen=True)
class LmtpConfig:
    """A connector's settings, checked and parsed."""

    host: str | None
    port: int
    socket: str | None
    lhlo: str
    timeout: int
    recipient_limit: int | None

    @property
    def endpoint(self) -> str:
        """The server as named in texts: `host:port`, `[ipv6]:port` or `unix:/path`."""
        if self.socket is not None:
            return f"unix:{self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, settings: Mapping[str, Any]) -> LmtpConfig:
        host_value, path = settings.get("host"), settings.get("socket")
        if (host_value is None) == (path is None):
            raise AgentError("the lmtp agent needs exactly one of the settings host "
                             "(host:port) and socket (a UNIX socket's path)")
        host: str | None = None
        port = DEFAULT_PORT
        if host_value is not None:
            if not isinstance(host_value, str) or not host_value.strip():
                raise AgentError("setting host is empty")
            host, port = _parse_host(host_value)
        if path is not None and (not isinstance(path, str) or not os.path.isabs(path)):
            raise AgentError(f"setting socket must be an absolute path, not '{path}'")
        lhlo = settings.get("lhlo")
        if lhlo is None:
            lhlo = _default_lhlo()
        elif not isinstance(lhlo, str) or not _LHLO_NAME.match(lhlo):
            raise AgentError(f"setting lhlo must be a host name or an [address literal], "
                             f"not '{lhlo}'")
        timeout = int_setting(settings, "timeout", DEFAULT_TIMEOUT)
        assert timeout is not None
        return cls(host, port, path, lhlo, timeout,
                   int_setting(settings, "recipient-limit", None))


# -- replies ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    """One (possibly multi-line) reply."""

    code: int
    lines: tuple[str, ...]       # the text of each line, printable ASCII

    @property
    def kind(self) -> int:
        return self.code // 100

    @property
    def enhanced(self) -> str:
        """The reply's enhanced status code, or X.0.0 when it has none of its class."""
        own = leading_enhanced(self.lines[0], self.kind)[0] if self.lines else None
        return own or f"{self.kind}.0.0"

    @property
    def text(self) -> str:
        """All lines as one, without the enhanced codes."""
        parts = [leading_enhanced(line, self.kind)[1] for line in self.lines]
        text = " ".join(p for p in parts if p).strip()
        return text[:EXCERPT] + " ..." if len(text) > EXCERPT else text

    def __str__(self) -> str:
        return f"{self.code} {' '.join(self.lines)}".strip()


def _line(text: str) -> str:
    return one_line(text.encode("utf-8", "replace"))


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"host name not found ({exc.strerror})"
    if exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)      # not asyncio's "Connect call failed (...)"
    return exc.strerror or str(exc) or type(exc).__name__


def _result(address: str, reply: Reply, where: str, command: str) -> RecipientResult:
    """The outcome a reply gives a recipient (a 3xx reply is a protocol error here)."""
    outcome = _OUTCOMES.get(reply.kind)
    if outcome is None:
        raise _Lost(f"{where} answered {command} with {reply}", PROTOCOL_STATUS)
    text = f"{where} said: {reply.text or reply.code}"
    if outcome != "delivered":
        text += f" (in reply to {command})"
    return RecipientResult(address, outcome, f"{reply.code} {reply.enhanced} {text}")


def _xtext(value: str) -> str:
    return "".join(chr(b) if 0x21 <= b <= 0x7e and b not in (0x2b, 0x3d) else f"+{b:02X}"
                   for b in value.encode("utf-8"))


# -- the connection -----------------------------------------------------------------------

@dataclass
class _Stream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    capabilities: dict[str, str] = field(default_factory=dict)
    used: bool = False           # has carried a transaction: RSET before the next


class LmtpConnection:
    """A session of an lmtp connector: one LMTP connection for all its items, opened
    again after it was lost."""

    def __init__(self, config: LmtpConfig) -> None:
        self.config = config
        self.where = _line(config.endpoint)
        self._stream: _Stream | None = None
        self._unavailable: str | None = None   # reconnecting failed: defer the rest
        self._deadline: float | None = None    # loop time by which the current item or
                                               # connect must be done
        self._cut = False                      # the last wait was shortened by it
        self._scope = "message"                # what the deadline is for

    # Opening and closing.

    async def connect(self) -> None:
        """Connect, read the greeting, send LHLO (LmtpUnavailable if any of it fails),
        all within `timeout` (and within the current item's, when reconnecting)."""
        own = self._deadline is None
        if own:
            self._deadline = asyncio.get_running_loop().time() + self.config.timeout
            self._scope = "connection"
        try:
            await self._connect()
        finally:
            if own:
                self._deadline = None

    async def _connect(self) -> None:
        c = self.config
        try:
            async with asyncio.timeout(self._wait()):
                if c.socket is not None:
                    reader, writer = await asyncio.open_unix_connection(c.socket,
                                                                        limit=LINE_LIMIT)
                else:
                    assert c.host is not None
                    reader, writer = await asyncio.open_connection(c.host, c.port,
                                                                   limit=LINE_LIMIT)
        except TimeoutError:
            raise LmtpUnavailable(f"cannot connect to {self.where}: no connection within "
                                  f"{self._wait_text()}") from None
        except OSError as exc:
            raise LmtpUnavailable(_line(
                f"cannot connect to {self.where}: {_os_reason(exc)}")) from None
        self._stream = stream = _Stream(reader, writer)
        try:
            greeting = await self._reply()
            if greeting.code != 220:
                raise LmtpUnavailable(f"{self.where} refused the session: {greeting}")
            lhlo = await self._command(f"LHLO {c.lhlo}")
            if lhlo.kind != 2:
                raise LmtpUnavailable(f"{self.where} refused LHLO: {lhlo}")
        except _Lost as exc:
            self._drop()
            raise LmtpUnavailable(exc.reason) from None
        except BaseException:
            self._drop()
            raise
        for line in lhlo.lines[1:]:
            keyword, _, params = line.partition(" ")
            stream.capabilities[keyword.upper()] = params.strip()

    async def close(self) -> None:
        stream = self._stream
        if stream is None:
            return
        with contextlib.suppress(_Lost, OSError):
            async with asyncio.timeout(min(QUIT_WAIT, self.config.timeout)):
                await self._command("QUIT")
        self._drop()

    def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.writer.transport.abort()

    # Delivering.

    async def deliver(self, item: Item) -> list[RecipientResult]:
        results: dict[int, RecipientResult] = {}
        sendable: list[int] = []
        sender_ok = item.sender == "" or _ADDRESS.match(item.sender)
        for i, r in enumerate(item.recipients):
            if not sender_ok:
                results[i] = RecipientResult(
                    r.address, "failed", "550 5.1.7 the sender cannot be written in an LMTP "
                    "command (an ASCII address with an @, no spaces, < or >)")
            elif not _ADDRESS.match(r.address):
                results[i] = RecipientResult(
                    r.address, "failed", "550 5.1.3 the address cannot be written in an "
                    "LMTP command (an ASCII address with an @, no spaces, < or >)")
            else:
                sendable.append(i)
        if sendable:
            await self._deliver(item, sendable, results)
        return [results[i] for i in range(len(item.recipients))]

    async def _deliver(self, item: Item, sendable: list[int],
                       results: dict[int, RecipientResult]) -> None:
        def defer_rest(enhanced: str, reason: str) -> None:
            for i in sendable:
                if i not in results:
                    results[i] = RecipientResult(item.recipients[i].address, "deferred",
                                                 f"451 {enhanced} {reason}")

        self._deadline = asyncio.get_running_loop().time() + self.config.timeout
        self._scope = "message"
        try:
            await self._ready()
            if self._stream is None:
                assert self._unavailable is not None
                defer_rest(CONNECT_STATUS, self._unavailable)
                return
            await self._transaction(item, sendable, results)
        except _Lost as exc:
            self._drop()
            defer_rest(exc.enhanced, exc.reason)
        except BaseException:
            # Cancelled (the node's item timeout) or the message is unreadable: the
            # transaction is in an unknown state, so the connection is not used again.
            self._drop()
            raise
        finally:
            self._deadline = None

    async def _ready(self) -> None:
        """A connection ready for a transaction (RSET if it carried one), or none and
        `_unavailable` says why. A used connection the server closed while it was idle is
        opened again once."""
        if self._unavailable is not None:
            return
        if self._stream is not None and self._stream.used:
            try:
                reply = await self._command("RSET")
            except _Lost as exc:
                if not exc.closed:
                    raise
                self._drop()
            else:
                if reply.kind != 2:
                    raise _Lost(f"{self.where} refused RSET: {reply}", PROTOCOL_STATUS)
        if self._stream is None:
            try:
                await self.connect()
            except LmtpUnavailable as exc:
                self._unavailable = str(exc)

    async def _transaction(self, item: Item, sendable: list[int],
                           results: dict[int, RecipientResult]) -> None:
        assert self._stream is not None
        stream = self._stream
        caps = stream.capabilities
        stream.used = True
        mail = f"MAIL FROM:<{item.sender}>"
        if "SIZE" in caps:
            mail += f" SIZE={item.size}"
        if "DSN" in caps and item.envid:
            mail += f" ENVID={_xtext(item.envid)}"
        reply = await self._command(mail)
        if reply.kind != 2:
            for i in sendable:
                results[i] = _result(item.recipients[i].address, reply, self.where,
                                     "MAIL FROM")
            return
        accepted: list[int] = []
        for i in sendable:
            r = item.recipients[i]
            rcpt = f"RCPT TO:<{r.address}>"
            if "DSN" in caps:
                if r.notify and _NOTIFY.match(r.notify):
                    rcpt += f" NOTIFY={r.notify.upper()}"
                if r.orcpt and _ORCPT.match(r.orcpt):
                    rcpt += f" ORCPT={r.orcpt}"
            reply = await self._command(rcpt)
            if reply.kind == 2:
                accepted.append(i)
            else:
                results[i] = _result(r.address, reply, self.where, "RCPT TO")
        if not accepted:
            return
        reply = await self._command("DATA")
        if reply.code != 354:
            if reply.kind == 2:
                raise _Lost(f"{self.where} answered DATA with {reply}", PROTOCOL_STATUS)
            for i in accepted:
                results[i] = _result(item.recipients[i].address, reply, self.where, "DATA")
            return
        await self._send_data(item)
        for i in accepted:
            reply = await self._reply()
            results[i] = _result(item.recipients[i].address, reply, self.where,
                                 "end of data")

    async def _send_data(self, item: Item) -> None:
        encoder = WireData()
        chunks: Iterator[bytes] = iter(item.chunks())
        try:
            while True:
                try:
                    # Reading a chunk may touch the disk: never on the event loop.
                    chunk = await asyncio.to_thread(next, chunks, None)
                except Exception as exc:  # noqa: BLE001 - any reading problem
                    raise MessageUnreadable(
                        f"message {item.message_id} could not be read: "
                        f"{type(exc).__name__}: {exc}") from exc
                if chunk is None:
                    break
                await self._write(encoder.feed(chunk))
            await self._write(encoder.end())
        finally:
            close = getattr(chunks, "close", None)
            if callable(close):
                # ValueError: the generator is still running in a worker thread (we were
                # cancelled mid-read); it is dropped when that read returns.
                with contextlib.suppress(ValueError):
                    close()

    # The wire.

    async def _write(self, data: bytes) -> None:
        assert self._stream is not None
        if not data:
            return
        try:
            async with asyncio.timeout(self._wait()):
                self._stream.writer.write(data)
                await self._stream.writer.drain()
        except TimeoutError:
            raise _Lost(f"{self.where} did not take data within {self._wait_text()}") \
                from None
        except OSError as exc:
            raise _Lost(self._lost(exc), closed=True) from None

    async def _command(self, line: str) -> Reply:
        await self._write(line.encode("ascii") + b"\r\n")
        return await self._reply()

    async def _reply(self) -> Reply:
        assert self._stream is not None
        reader = self._stream.reader
        code: bytes | None = None
        lines: list[str] = []
        try:
            async with asyncio.timeout(self._wait()):
                while True:
                    raw = await reader.readuntil(b"\n")
                    m = _REPLY_LINE.match(raw.rstrip(b"\r\n"))
                    if m is None or (code is not None and m.group(1) != code):
                        raise _Lost(f"{self.where} sent a line that is not a valid reply: "
                                    f"{one_line(raw)[:EXCERPT]}", PROTOCOL_STATUS)
                    code = m.group(1)
                    lines.append(one_line(m.group(3) or b""))
                    if m.group(2) != b"-":
                        return Reply(int(code), tuple(lines))
                    if len(lines) >= REPLY_LINES:
                        raise _Lost(f"{self.where} sent a reply of more than {REPLY_LINES} "
                                    f"lines", PROTOCOL_STATUS)
        except TimeoutError:
            raise _Lost(f"{self.where} did not answer within {self._wait_text()}") \
                from None
        except asyncio.IncompleteReadError:
            raise _Lost(f"{self.where} closed the connection", closed=True) from None
        except asyncio.LimitOverrunError:
            raise _Lost(f"{self.where} sent a reply line of more than {LINE_LIMIT} bytes",
                        PROTOCOL_STATUS) from None
        except OSError as exc:
            raise _Lost(self._lost(exc), closed=True) from None

    def _wait(self) -> float:
        """How long the next step may wait: `timeout`, but not past the deadline of the
        current item or connect (so that the node's own limit for an item, `timeout` plus
        a grace, never cuts the agent short)."""
        timeout = float(self.config.timeout)
        self._cut = False
        if self._deadline is None:
            return timeout
        remaining = self._deadline - asyncio.get_running_loop().time()
        self._cut = remaining < timeout - 1.0
        return max(0.0, min(timeout, remaining))

    def _wait_text(self) -> str:
        """How long was waited, for a reason text (after a wait from `_wait` ran out)."""
        if self._cut:
            return f"the {self.config.timeout} s allowed for the whole {self._scope}"
        return f"{self.config.timeout} s"

    def _lost(self, exc: OSError) -> str:
        return _line(f"connection to {self.where} lost: {_os_reason(exc)}")


# -- the agent ----------------------------------------------------------------------------

class LmtpAgent:
    """Delivery to an LMTP server (protocol `lmtp`)."""

    settings: ClassVar[tuple[Setting, ...]] = (
        Setting("host", "string",
                help=f"LMTP server as host:port or [ipv6]:port (port {DEFAULT_PORT} if left "
                     f"out); or give socket."),
        Setting("socket", "path", help="Absolute path of the LMTP server's UNIX socket."),
        Setting("lhlo", "string", help="Name sent in LHLO (default: this host's name)."),
        Setting("timeout", "int", default=str(DEFAULT_TIMEOUT),
                help="Seconds to wait for a connection, each reply and each data write."),
        Setting("recipient-limit", "int", help="Recipients per transaction."),
    )
    # Per connector: see recipient_limit_for().
    recipient_limit: ClassVar[int | None] = None

    @classmethod
    def check(cls, settings: Mapping[str, Any]) -> None:
        """Refuse settings no session could be opened with (AgentError, one line): neither
        or both of host and socket, a bad host or port, a relative socket path, a bad LHLO
        name, a timeout or recipient-limit under 1. Nothing is looked up or connected."""
        LmtpConfig.parse(settings)

    @classmethod
    def recipient_limit_for(cls, settings: Mapping[str, Any]) -> int | None:
        return LmtpConfig.parse(settings).recipient_limit

    async def open_connection(self, next_hop: NextHop) -> LmtpConnection:
        conn = LmtpConnection(LmtpConfig.parse(next_hop.settings))
        await conn.connect()
        return conn

