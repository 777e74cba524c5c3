"""The SMTP client of Send connectors: one connection at a time, reused for several
messages, with a result per recipient. Built on aiosmtplib's connection and commands.

Contract
--------
`SmtpClient(targets, policy)` connects lazily, on the first `send`, to the first target
(MX host or smart host address, in order) that answers: TCP connect, a 220 greeting, EHLO
(HELO if EHLO is refused), then per `policy.tls`:

- `none`: no STARTTLS;
- `opportunistic`: STARTTLS when the host offers it; if the handshake fails, the same
  host once more without TLS (as Postfix's `may` level);
- `required`: STARTTLS must be offered and succeed, or the host counts as failed.

TLS is 1.2 or later; `policy.tls_auth_level` says what is checked of the certificate
(tls_client: nothing, a trusted chain, or also its name), and a certificate that fails the
check makes the host count as failed (4.7.5). Then, with `policy.auth` BasicAuth or
BasicAuthRequireTLS (only over TLS), AUTH PLAIN (else LOGIN) with the user and password,
once. A host that fails any of these steps is
recorded with its reason and the next target is tried; when none is left, `send` raises
`NoConnection` with every target and reason (the queue goes to Retry with that text).

`send(message)` runs one transaction (RSET first when the connection was used before;
a failed RSET reconnects) and returns a `RecipientResult` per recipient id:

- MAIL FROM:<sender> with `SIZE=` (SIZE offered), `BODY=8BITMIME` (8BITMIME offered),
  `SMTPUTF8` (needed: a non-ASCII sender or recipient address) and, when the host offers
  DSN, `RET=` and `ENVID=` (xtext); RCPT TO:<address> per recipient with `NOTIFY=` and
  `ORCPT=` only when the host offers DSN. `Sent.dsn` says whether it did: otherwise the
  caller owes NOTIFY=SUCCESS recipients an `Action: relayed` DSN.
- A message that needs SMTPUTF8 to a host that does not offer it fails for every
  recipient with 550 5.6.7, before MAIL (never downgraded, RFC 6531); one larger than the
  host's SIZE fails with 552 5.3.4.
- Replies decide per recipient: 2xx delivered, 4xx deferred, 5xx failed; MAIL FROM's reply
  counts for every recipient, RCPT's for its recipient, DATA's and the final reply's for
  every recipient accepted at RCPT. DATA is not sent when no recipient was accepted.
  Statuses keep the reply code and its enhanced status code (X.0.0 when the reply has none
  of its class) and quote the host: `550 5.1.1 mx.fabrikam.test[192.0.2.1]:25 said: no
  such user (in reply to RCPT TO)`, one line of printable ASCII.
- The connection lost, a 421, or no reply within `policy.timeout` (ConnectionInactivity-
  Timeout; also the longest wait to write): every recipient without a result is deferred
  (4.4.2) and the connection is dropped; the next `send` connects again.
- An address that cannot be written in a command (a control character) fails 5.1.3.

The message data is streamed (`OutMessage.chunks`, one chunk in memory at a time, with
the transport's flow control): aiosmtplib's own `data()` needs the whole message as one
bytes object and copies it twice more, so the DATA phase is written here on aiosmtplib's
connection (its protocol's write, drain and reply reader; aiosmtplib is pinned to 5.x for
this). `WireData` puts it on the wire: every CR or LF not part of a CRLF becomes CRLF, a
line starting with "." gets another "." (also across chunk boundaries), a message that
does not end with CRLF gets one, then ".\r\n". So no bare CR, no bare LF and no lone "."
line leaves mailgate except the terminator (SMTP smuggling, reliability T18).

`close()` sends QUIT (briefly) and closes.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import aiosmtplib
from aiosmtplib import SMTPResponse

from mailgate.core.address import xtext
from mailgate.core.status import Status, leading_enhanced
from mailgate.core.text import one_line
from mailgate.deliver.agents.api import RecipientResult
from mailgate.deliver.mx import Target
from mailgate.deliver.tls_client import certificate_matches, certificate_names, client_context
from mailgate.deliver.wire import WireData
from mailgate.smtp_connectors import DOMAIN_VALIDATION, ENCRYPTION_ONLY

CONNECT_TIMEOUT = 30.0
QUIT_TIMEOUT = 5.0
MAX_REASON = 300
_PRINTABLE = re.compile(r"[!-~]+")


@dataclass(frozen=True)
class ClientPolicy:
    ehlo_name: str
    tls: str = "opportunistic"            # none | opportunistic | required
    tls_auth_level: str = ENCRYPTION_ONLY  # with required: see tls_client
    tls_domain: str | None = None         # DomainValidation: else the target's host name
    tls_ca_file: str | None = None
    auth: str = "None"                    # None | BasicAuth | BasicAuthRequireTLS
    user: str | None = None
    password: str | None = None
    timeout: float = 600.0                # each reply, each write
    connect_timeout: float = CONNECT_TIMEOUT


@dataclass(frozen=True)
class OutRecipient:
    id: int
    address: str
    notify: str | None = None
    orcpt: str | None = None


@dataclass(frozen=True)
class OutMessage:
    sender: str                           # '' is the null reverse-path
    recipients: tuple[OutRecipient, ...]
    size: int
    chunks: Callable[[], AsyncIterator[bytes]]
    ret: str | None = None
    envid: str | None = None

    @property
    def needs_smtputf8(self) -> bool:
        return not all(a.isascii() for a in [self.sender, *(r.address for r in self.recipients)])


@dataclass
class Sent:
    results: dict[int, RecipientResult]
    target: Target
    dsn: bool                             # the DSN parameters went to the next hop


class NoConnection(Exception):
    """No target could be used; `last_error` is the queue's LastError."""

    def __init__(self, last_error: str) -> None:
        super().__init__(last_error)
        self.last_error = last_error


class _HostFailed(Exception):
    def __init__(self, reason: str, enhanced: str = "4.4.1") -> None:
        super().__init__(reason)
        self.reason = reason
        self.enhanced = enhanced


class _Lost(Exception):
    """The connection broke during a transaction."""


class _ContentError(Exception):
    """The message could not be read from the store."""


@dataclass
class _Connection:
    smtp: aiosmtplib.SMTP
    target: Target
    tls: bool
    used: bool = False


def _reason(exc: BaseException) -> str:
    """A short one-line reason for a connection-level exception."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):   # its errno is OpenSSL's, not the system's
            return f"TLS error: {cause.reason or cause.strerror or type(cause).__name__}"
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        cause = cause.__cause__
    if isinstance(exc, (asyncio.TimeoutError, aiosmtplib.SMTPTimeoutError)):
        return "timed out"
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {one_line(exc.message.encode())}"[:MAX_REASON]
    text = one_line(str(exc).encode())[:MAX_REASON]
    return text or type(exc).__name__


def reply_status(code: int, message: str, where: str, command: str | None) -> Status:
    """A reply as a Status that quotes the host (and the command, unless it succeeded)."""
    klass = str(code)[0] if 200 <= code < 600 else "4"
    if klass == "3":           # an intermediate reply where a final one was due
        klass = "4"
    own, message = leading_enhanced(message, int(klass))
    enhanced = own or f"{klass}.0.0"
    text = one_line(message.encode("utf-8", "surrogateescape"))[:MAX_REASON] or str(code)
    text = f"{where} said: {text}"
    if command and klass != "2":
        text += f" (in reply to {command})"
    shown = code if str(code)[0] == klass else int(klass + "51")
    return Status(shown, enhanced, text)


def _result(address: str, st: Status) -> RecipientResult:
    outcome = {"2": "delivered", "5": "failed"}.get(st.enhanced[0], "deferred")
    return RecipientResult(address, outcome, str(st))  # type: ignore[arg-type]


class SmtpClient:
    def __init__(self, targets: list[Target], policy: ClientPolicy) -> None:
        self.targets = list(targets)
        self.policy = policy
        self._conn: _Connection | None = None

    # -- connections ---------------------------------------------------------------------

    async def _connection(self) -> _Connection:
        if self._conn is not None and self._conn.used:
            try:
                reply = await self._command(self._conn, b"RSET")
                if reply.code != 250:
                    raise _Lost(f"RSET answered {reply.code}")
                self._conn.used = False
            except (_Lost, aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                self._drop()
        if self._conn is not None and not self._conn.smtp.is_connected:
            self._drop()
        if self._conn is None:
            self._conn = await self._connect()
        return self._conn

    async def _connect(self) -> _Connection:
        failures: list[str] = []
        enhanced = "4.4.1"
        for target in self.targets:
            try:
                return await self._open(target, self.policy.tls != "none")
            except _HostFailed as exc:
                failures.append(f"{target}: {exc.reason}")
                enhanced = exc.enhanced
        shown = "; ".join(failures)
        if len(shown) > 900:
            shown = shown[:900] + " ..."
        raise NoConnection(f"451 {enhanced} cannot deliver to any next hop: {shown}")

    async def _open(self, target: Target, try_tls: bool) -> _Connection:
        p = self.policy
        smtp = aiosmtplib.SMTP(hostname=target.address, port=target.port,
                               local_hostname=p.ehlo_name, timeout=p.timeout, start_tls=False,
                               validate_certs=False)
        try:
            try:
                await smtp.connect(timeout=p.connect_timeout)
            except aiosmtplib.SMTPConnectResponseError as exc:
                raise _HostFailed(f"greeted with {_reason(exc)}") from None
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
                raise _HostFailed(_reason(exc)) from None
            await self._hello(smtp)
            tls = False
            if try_tls and smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(tls_context=self._tls(), timeout=p.timeout)
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError,
                        asyncio.TimeoutError) as exc:
                    if p.tls == "required":
                        raise _HostFailed(f"STARTTLS failed: {_reason(exc)}", "4.7.5") from None
                    smtp.close()
                    return await self._open(target, False)
                self._check_name(smtp, target)
                await self._hello(smtp)
                tls = True
            elif p.tls == "required":
                raise _HostFailed("TLS is required, but the host does not offer STARTTLS",
                                  "4.7.4")
            if p.auth != "None":
                await self._login(smtp, tls)
            return _Connection(smtp, target, tls)
        except BaseException:
            smtp.close()
            raise

    def _tls(self) -> ssl.SSLContext:
        p = self.policy
        try:
            return client_context(p.tls_auth_level, p.tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise _HostFailed(f"the trusted CA file {p.tls_ca_file} cannot be used: "
                              f"{_reason(exc)}", "4.7.5") from None

    def _check_name(self, smtp: aiosmtplib.SMTP, target: Target) -> None:
        """DomainValidation: the certificate must name TlsDomain, else the host."""
        p = self.policy
        if p.tls_auth_level != DOMAIN_VALIDATION:
            return
        expected = p.tls_domain or target.host
        cert = smtp.get_transport_info("peercert")
        if not certificate_matches(cert, expected):
            names = ", ".join(certificate_names(cert)[:5]) or "no names"
            raise _HostFailed(f"the certificate ({names}) does not match {expected} "
                              f"(DomainValidation)", "4.7.5")

    async def _hello(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError as exc:
            if not smtp.is_connected:
                raise _HostFailed(f"EHLO answered {_reason(exc)}") from None
            try:
                await smtp.helo()
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc2:
                raise _HostFailed(f"EHLO and HELO refused: {_reason(exc2)}") from None
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            raise _HostFailed(f"EHLO failed: {_reason(exc)}") from None
        except ValueError:
            raise _HostFailed(f"the EHLO name {self.policy.ehlo_name!r} cannot be sent "
                              f"(set the connector's --fqdn)", "4.3.5") from None

    async def _login(self, smtp: aiosmtplib.SMTP, tls: bool) -> None:
        p = self.policy
        if p.auth == "BasicAuthRequireTLS" and not tls:
            raise _HostFailed("the connector authenticates only over TLS "
                              "(BasicAuthRequireTLS) and the host offered none", "4.7.0")
        methods = smtp.server_auth_methods
        if "plain" in methods:
            login = smtp.auth_plain
        elif "login" in methods:
            login = smtp.auth_login
        else:
            raise _HostFailed("the host does not offer AUTH PLAIN or LOGIN", "4.7.0")
        try:
            await login(p.user or "", p.password or "", timeout=p.timeout)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise _HostFailed(f"authentication as {p.user} failed: {_reason(exc)}",
                              "4.7.0") from None
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            raise _HostFailed(f"AUTH failed: {_reason(exc)}", "4.7.0") from None

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.smtp.close()
            self._conn = None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if conn.smtp.is_connected:
                await conn.smtp.quit(timeout=QUIT_TIMEOUT)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
            pass
        finally:
            conn.smtp.close()

    # -- one message ---------------------------------------------------------------------

    async def _command(self, conn: _Connection, *args: bytes) -> SMTPResponse:
        try:
            reply = await conn.smtp.execute_command(*args, timeout=self.policy.timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError,
                ConnectionError, asyncio.TimeoutError) as exc:
            raise _Lost(_reason(exc)) from None
        if reply.code == 421 or not conn.smtp.is_connected:
            # The caller drops the connection on _Lost (send, and the RSET in _connection).
            raise _Lost(f"{reply.code} {one_line(reply.message.encode())}"[:MAX_REASON])
        return reply

    async def _data(self, conn: _Connection,
                    chunks: Callable[[], AsyncIterator[bytes]]) -> SMTPResponse:
        """The message after a 354, streamed; the reply to the final '.'."""
        protocol = conn.smtp.protocol
        if protocol is None:
            raise _Lost("connection lost")
        wire = WireData()
        timeout = self.policy.timeout
        try:
            source = chunks()
            while True:
                try:
                    chunk = await source.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - never send a truncated message
                    self._drop()
                    raise _ContentError(_reason(exc)) from exc
                data = wire.feed(chunk)
                if data:
                    protocol.write(data)
                    await asyncio.wait_for(protocol._drain_helper(), timeout)
            # The final reply may come before read_response() is awaited; the protocol
            # keeps it only while a reply is expected.
            protocol._response_pending = True
            protocol.write(wire.end())
            reply = await protocol.read_response(timeout=timeout)
        except _ContentError:
            raise
        except (aiosmtplib.SMTPException, ConnectionError, OSError,
                asyncio.TimeoutError) as exc:
            raise _Lost(_reason(exc)) from None
        if reply.code == 421:
            self._drop()
        return reply

    async def send(self, msg: OutMessage) -> Sent:
        conn = await self._connection()
        where = str(conn.target)
        results: dict[int, RecipientResult] = {}
        smtp = conn.smtp
        utf8 = msg.needs_smtputf8

        def every(st: Status, only: list[OutRecipient] | None = None) -> None:
            for r in only if only is not None else msg.recipients:
                results.setdefault(r.id, _result(r.address, st))

        if utf8 and not smtp.supports_extension("smtputf8"):
            every(Status(550, "5.6.7", f"{where} does not support SMTPUTF8 and the message "
                                       f"has a non-ASCII address; it is not downgraded "
                                       f"(RFC 6531)"))
            return Sent(results, conn.target, False)
        limit = smtp.esmtp_extensions.get("size", "")
        if limit.isdigit() and int(limit) > 0 and msg.size > int(limit):
            every(Status(552, "5.3.4", f"the message ({msg.size} bytes) is larger than "
                                       f"{where} accepts ({limit} bytes)"))
            return Sent(results, conn.target, False)
        dsn = smtp.supports_extension("dsn")
        options = []
        if smtp.supports_extension("size"):
            options.append(f"SIZE={msg.size}")
        if smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if utf8:
            options.append("SMTPUTF8")
        if dsn and msg.ret:
            options.append(f"RET={msg.ret}")
        if dsn and msg.envid:
            options.append(f"ENVID={xtext(msg.envid)}")
        encoding = "utf-8" if utf8 else "ascii"
        phase = "MAIL FROM"
        conn.used = True
        try:
            try:
                reply = await self._command(conn, b"MAIL", f"FROM:<{msg.sender}>".encode(
                    encoding), *(o.encode("ascii") for o in options))
            except ValueError:
                every(Status(550, "5.1.7", f"the sender <{one_line(msg.sender.encode())}> "
                                           f"cannot be written in an SMTP command"))
                return Sent(results, conn.target, dsn)
            if reply.code // 100 != 2:
                every(reply_status(reply.code, reply.message, where, "MAIL FROM"))
                return Sent(results, conn.target, dsn)
            accepted: list[OutRecipient] = []
            phase = "RCPT TO"
            for r in msg.recipients:
                params = []
                if dsn and r.notify:
                    params.append(f"NOTIFY={r.notify}".encode("ascii"))
                if dsn and r.orcpt and _PRINTABLE.fullmatch(r.orcpt):
                    params.append(f"ORCPT={r.orcpt}".encode("ascii"))
                try:
                    reply = await self._command(conn, b"RCPT", f"TO:<{r.address}>".encode(
                        encoding), *params)
                except ValueError:
                    every(Status(550, "5.1.3", "the address cannot be written in an SMTP "
                                               "command"), [r])
                    continue
                if reply.code // 100 == 2:
                    accepted.append(r)
                else:
                    every(reply_status(reply.code, reply.message, where, "RCPT TO"), [r])
            if not accepted:
                return Sent(results, conn.target, dsn)
            phase = "DATA"
            reply = await self._command(conn, b"DATA")
            if reply.code != 354:
                every(reply_status(reply.code, reply.message, where, "DATA"), accepted)
                return Sent(results, conn.target, dsn)
            phase = "the message"
            reply = await self._data(conn, msg.chunks)
            every(reply_status(reply.code, reply.message, where, "end of DATA"), accepted)
            return Sent(results, conn.target, dsn)
        except _Lost as exc:
            self._drop()
            every(Status(451, "4.4.2", f"lost the connection with {where} while sending "
                                       f"{phase}: {exc}"))
            return Sent(results, conn.target, dsn)
        except _ContentError as exc:
            every(Status(451, "4.3.0", f"the message could not be read from the store: "
                                       f"{exc}"))
            return Sent(results, conn.target, dsn)

