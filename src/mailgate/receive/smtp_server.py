"""The SMTP server side of a Receive connector: aiosmtpd's protocol engine with mailgate's
envelope rules, limits and durability (PRODUCT §5, issue #4).

aiosmtpd reads commands, runs STARTTLS and the AUTH exchanges and keeps the session state;
this subclass replaces MAIL, RCPT and DATA (RFC 3461 DSN parameters, the null sender,
recipient checks against the organization, streaming DATA with smuggling protection) and
adds the connector's policy:

- the connector for a client is chosen when it connects (`SmtpPolicy.connector_for`); none
  → 554 5.7.1 and the connection is closed; over MaxInboundConnection(PerSource) → 421.
- command lines must end in CRLF with no other CR or LF (500 5.5.2); every error reply
  counts toward MaxProtocolErrors, after which the connection is closed (421).
- AnonymousUsers may send to accepted domains only (550 5.7.54 for others); an
  authenticated ExchangeUsers session or an ExchangeServers connector may relay anywhere.
  A recipient the categorizer refuses (no such mailbox) is refused at RCPT with its status.
- AUTH PLAIN/LOGIN check mailbox passwords; failures are answered after TarpitInterval and
  after MaxLogonFailures the connection is closed. Secrets are never logged (aiosmtpd's own
  logger is kept at WARNING, where it logs no command lines).
- 250 after DATA only once the message is committed to the store (group commit);
  a storage failure answers 451 4.3.0 (452 4.3.1 when the disk is full), never 5xx and
  never an exception's text.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import inspect
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Callable, cast

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, _AuthMechAttr, syntax

from mailgate import tracking
from mailgate.admin.passwords import verify_password
from mailgate.core import status
from mailgate.core.status import Status
from mailgate.faults import crash_point
from mailgate.receive.replay import message_info
from mailgate.receive.replay_parse import esmtp_envid, esmtp_notify, esmtp_orcpt
from mailgate.receive.smtp_data import READ_SIZE, MessageLines, ReceivedData, read_data
from mailgate.receive.smtp_syntax import enhanced, keyword, path, printable, reply_text
from mailgate.receive.submit import Inbound, InboundRecipient
from mailgate.smtp_connectors import ReceiveConnector
from mailgate.store import StoreError

if TYPE_CHECKING:
    from mailgate.receive.smtp_listener import SmtpService

log = logging.getLogger(__name__)
# aiosmtpd logs every command line at INFO, AUTH blobs included: never let that through.
logging.getLogger("mail.log").setLevel(logging.WARNING)

MIN_DATA_RATE = 1024     # bytes per second a DATA upload must keep up (Postfix-like)
BARE_EOL = "XMAILGATEBAREEOL"


class _StrictLineReader(asyncio.StreamReader):
    """Command lines must end in CRLF with no other CR or LF: anything else becomes the
    pseudo command BARE_EOL, answered 500 5.5.2 (reliability T19)."""

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        line = await super().readuntil(separator)
        if separator == b"\n" and (not line.endswith(b"\r\n") or b"\r" in line[:-2]
                                   or b"\x00" in line):
            return BARE_EOL.encode() + b"\r\n"
        return line


@dataclass
class _Transaction:
    sender: str | None = None          # '' is <>
    ret: str | None = None
    envid: str | None = None
    smtputf8: bool = False
    body: str | None = None
    recipients: list[InboundRecipient] = field(default_factory=list)
    chunks: MessageLines | None = None     # the message so far, sent with BDAT
    chunk_error: Status | None = None      # a BDAT sequence that failed: answered to LAST

    def abandon(self) -> None:
        if self.chunks is not None:
            self.chunks.abandon()
            self.chunks = None


class _NoHandler:
    """aiosmtpd's handler slot: mailgate's hooks are methods of the session itself. An
    empty dir() spares aiosmtpd listing None's attributes for every connection."""

    def __dir__(self) -> list[str]:
        return []


_NO_HANDLER = _NoHandler()


class _Commands(Mapping[str, Any]):
    """aiosmtpd's command table (`_smtp_methods`) for one session: SMTP verb → bound
    smtp_* method, bound when looked up rather than all of them for every connection."""

    __slots__ = ("_session",)

    def __init__(self, session: MailgateSMTP) -> None:
        self._session = session

    def __getitem__(self, verb: str) -> Any:
        if verb not in self._session._names():
            raise KeyError(verb)
        return getattr(self._session, "smtp_" + verb)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._session._names()))

    def __len__(self) -> int:
        return len(self._session._names())


class MailgateSMTP(SMTP):
    """One SMTP connection."""

    # RFC 5321 4.5.3.1.4: 512 octets per command line, CRLF included (aiosmtpd counts the
    # line without it).
    command_size_limit = 510
    # The stream's buffer limit (aiosmtpd's default is a line's 1001 octets). asyncio pauses
    # reading at twice the limit, so with 1001 every message over 2 KB cost a pause and a
    # resume (two epoll changes); command lines are still held to command_size_limit, and a
    # longer line is still dropped as it arrives.
    line_length_limit = 8192

    _command_names: frozenset[str] | None = None
    _mechanisms: list[tuple[str, str]] | None = None   # (AUTH mechanism, method name)

    def __dir__(self) -> list[str]:
        # aiosmtpd builds its tables of smtp_* and auth_* methods from dir() for every
        # connection, binding each method: a tenth of the event loop's time under load.
        # It is given nothing to list; the session supplies the tables itself (commands
        # bound when looked up, AUTH mechanisms only where a connector offers AUTH).
        return []

    @classmethod
    def _names(cls) -> frozenset[str]:
        if cls._command_names is None:
            cls._command_names = frozenset(n[5:] for n in dir(cls)
                                           if n.startswith("smtp_"))
        return cls._command_names

    def _auth_table(self) -> dict[str, _AuthMechAttr]:
        """aiosmtpd's AUTH table: mechanism name (as aiosmtpd derives it) → bound method."""
        cls = type(self)
        if cls._mechanisms is None:
            cls._mechanisms = [
                (getattr(f, "__auth_mechanism_name__",
                         n.replace("auth_", "").replace("__", "-")), n)
                for n, f in inspect.getmembers(cls) if n.startswith("auth_")]
        return {mech: _AuthMechAttr(getattr(self, n), True) for mech, n in cls._mechanisms}

    def __init__(self, service: SmtpService) -> None:
        self.service = service
        self._armed_at: float | None = None   # when the session's timer fires next
        self._idle_deadline = 0.0
        self._session_deadline = math.inf     # ConnectionTimeout, from _configure
        super().__init__(
            handler=_NO_HANDLER, data_size_limit=None, enable_SMTPUTF8=True, decode_data=False,
            hostname=service.hostname, ident="mailgate ESMTP service ready",
            tls_context=None,
            auth_require_tls=True, timeout=300, loop=asyncio.get_event_loop())
        # aiosmtpd declares a dict; it only calls get() and items() on it.
        self._smtp_methods = cast("dict[str, Any]", _Commands(self))
        # Per session (aiosmtpd's is one dict shared by all): RFC 3461 lengthens MAIL and
        # RCPT lines by their DSN parameters.
        self.command_size_limits = collections.defaultdict(
            lambda: self.command_size_limit, {"MAIL": 1024, "RCPT": 1024})
        self.connector: ReceiveConnector | None = None
        self.tx = _Transaction()
        self.errors = 0
        self.logon_failures = 0
        self.remote_ip = ""
        self._source_key = ""
        self._counted = False
        self._auth_user: str | None = None
        self._skip_greeting = False
        self._offered: Any = None
        self._plain_replies = False   # EHLO/HELO replies carry no enhanced codes (RFC 2034)
        self._refused = False         # refused in place of the greeting, and closed

    # -- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.connector is None and self._original_transport is None
        super().connection_made(transport)
        if not first:
            self._new_transaction()   # STARTTLS: everything starts over (RFC 3207 4.2)
            return
        self.service.sessions.add(self)
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.remote_ip = str(peer[0])
        self.connector = self.service.connector_for(str(local[0]), int(local[1]),
                                                    self.remote_ip)
        c = self.connector
        refusal = None
        if c is None:
            refusal = status.S554_NO_CONNECTOR
        elif not self.service.admit(c, self.remote_ip):
            refusal = status.S421_TOO_MANY_CONNECTIONS
        else:
            self._counted = True
            self._configure(c)
            # The greeting goes out now rather than from the session's task, which starts
            # only at the event loop's next turn: under load that turn is a measurable part
            # of the time a client waits for a connection to be usable.
            self._skip_greeting = True
            cast(asyncio.WriteTransport, transport).write(self._greeting().encode() + b"\r\n")
        if refusal is not None:
            # The greeting is replaced by the refusal (RFC 5321 3.1), and the connection is
            # closed at once: under a flood, refused connections must not hold descriptors.
            self._refused = True
            cast(asyncio.WriteTransport, transport).write(
                f"{refusal.code} {self.service.hostname} {refusal.enhanced} "
                f"{refusal.text}\r\n".encode())
            transport.close()

    def _configure(self, c: ReceiveConnector) -> None:
        self.hostname = c.fqdn or self.service.hostname
        self.data_size_limit = c.max_message_size
        self._timeout_duration = c.connection_inactivity_timeout
        self._session_deadline = self.loop.time() + c.connection_timeout
        self._reset_timeout()
        self.require_starttls = c.require_tls
        self.tls_context = self.service.tls_context(c) if "Tls" in c.auth_mechanism else None
        basic = {"BasicAuth", "BasicAuthRequireTLS"} & set(c.auth_mechanism)
        if basic and "ExchangeUsers" in c.permission_groups:
            self._auth_methods = self._auth_table()
        self._auth_require_tls = "BasicAuth" not in c.auth_mechanism

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels and schedules a timer for every command line; here one timer per
        # session, for both its inactivity deadline and its ConnectionTimeout, is re-armed
        # only when it fires before the (moved) deadline. The timers were a measurable
        # share of the event loop's time under load.
        self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        self._arm()

    def _arm(self) -> None:
        due = min(self._idle_deadline, self._session_deadline)
        if self._armed_at is None or self._armed_at > due:
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._timeout_handle = self.loop.call_at(due, self._idle_check)
            self._armed_at = due

    def _idle_check(self) -> None:
        self._armed_at = None
        now = self.loop.time()
        if now >= self._session_deadline:
            self._session_timeout()
        elif now >= self._idle_deadline:
            self._timeout_cb()
        else:
            self._arm()

    def _session_timeout(self) -> None:
        if self.transport is not None:
            self._writer.write(f"{status.S421_TIMEOUT}\r\n".encode())
            self.transport.close()

    def _cb_client_connected(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        # aiosmtpd creates its StreamReader itself; only the line check is added to it.
        reader.__class__ = _StrictLineReader
        super()._cb_client_connected(reader, writer)

    def shut_down(self) -> None:
        """The node stops: 421 and close (an unfinished transaction is not accepted)."""
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(f"{status.S421_SHUTDOWN}\r\n".encode())
            self.transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        self.service.sessions.discard(self)
        self.tx.abandon()
        if self._counted and self.connector is not None:
            self._counted = False
            self.service.release(self.connector, self.remote_ip)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self._refused:
            return
        await super()._handle_client()

    def _greeting(self) -> str:
        if self.connector is not None and self.connector.banner:
            return f"220 {self.connector.banner}"
        return f"220 {self.hostname} {self.__ident__}"

    async def push(self, status_line: Any) -> None:
        text = status_line.decode() if isinstance(status_line, bytes) else str(status_line)
        if self._skip_greeting:
            # The session task's first reply is aiosmtpd's greeting: connection_made sent
            # mailgate's already.
            self._skip_greeting = False
            return
        if not self._plain_replies:
            text = enhanced(text)
        await super().push(text)
        if text[:3] in ("500", "501", "502", "503", "504"):   # protocol errors
            self.errors += 1
            c = self.connector
            if c is not None and self.errors > c.max_protocol_errors and self.transport:
                await super().push(f"421 4.7.0 {self.hostname} Too many errors on this "
                                   f"connection, closing transmission channel")
                self.transport.close()

    async def handle_exception(self, error: Exception) -> str:
        """A failure in mailgate's own code during a command: 451 4.3.0, never a 5xx and
        never the exception's text (reliability T10)."""
        log.error("SMTP session with %s failed", self.remote_ip, exc_info=error)
        st = status.S451_STORE_ERROR
        return f"{st.code} {st.enhanced} {st.text}"

    def _new_transaction(self) -> None:
        self.tx.abandon()
        self.tx = _Transaction()

    async def _reply(self, st: Status, text: str | None = None) -> None:
        await self.push(f"{st.code} {st.enhanced} {text or st.text}")

    # -- commands ------------------------------------------------------------------------

    async def smtp_XMAILGATEBAREEOL(self, arg: str) -> None:  # noqa: N802 - aiosmtpd naming
        await self._reply(status.S500_BARE_EOL)

    @syntax('STARTTLS', when='tls_context')
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            await self._reply(status.S503_SEQUENCE, "TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    @syntax('EHLO hostname')
    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self._reply(status.S501_SYNTAX, "Syntax: EHLO hostname")
            return
        self._set_rset_state()
        self._new_transaction()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [self.hostname, "PIPELINING", f"SIZE {self.data_size_limit or 0}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN", "CHUNKING"]
        if self.tls_context is not None and self._tls_protocol is None:
            lines.append("STARTTLS")
        if self._auth_methods and (self._tls_protocol is not None
                                   or not self._auth_require_tls):
            lines.append("AUTH " + " ".join(sorted(self._auth_methods)))
        self._plain_replies = True
        try:
            # One write for the whole reply: each write is a system call and a packet.
            await self.push("".join(f"250-{line}\r\n" for line in lines[:-1])
                            + f"250 {lines[-1]}")
        finally:
            self._plain_replies = False

    @syntax('HELO hostname')
    async def smtp_HELO(self, hostname: str) -> None:
        self._new_transaction()
        self._plain_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    @syntax('RSET')
    async def smtp_RSET(self, arg: str) -> None:
        self._new_transaction()
        await super().smtp_RSET(arg)

    @syntax('AUTH <mechanism>')
    async def smtp_AUTH(self, arg: str) -> None:
        c = self.connector
        if self.logon_failures and c is not None and c.tarpit_interval:
            await asyncio.sleep(c.tarpit_interval)
        await super().smtp_AUTH(arg)
        if (c is not None and c.max_logon_failures
                and self.logon_failures >= c.max_logon_failures and self.transport is not None):
            await self._reply(status.S421_LOGON_FAILURES)
            self.transport.close()

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        # aiosmtpd asks synchronously; the password check (a deliberately slow KDF) must not
        # hold the event loop, so the credentials are kept here and checked in a thread by
        # auth_PLAIN / auth_LOGIN below.
        self._offered = auth_data
        return AuthResult(success=False, handled=False)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:  # noqa: N802
        self._offered = None
        return await self._logon(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:  # noqa: N802
        self._offered = None
        return await self._logon(await super().auth_LOGIN(_, args))

    async def _logon(self, result: AuthResult) -> AuthResult:
        offered, self._offered = self._offered, None
        if not isinstance(offered, LoginPassword):
            return result              # the exchange itself failed (bad base64, cancelled)
        user = offered.login.decode("utf-8", "replace")
        password = offered.password.decode("utf-8", "replace")
        mailbox = self.service.mailbox_for_login(user)
        ok = (mailbox is not None and mailbox.password_hash is not None
              and await asyncio.to_thread(verify_password, password, mailbox.password_hash))
        if not ok or mailbox is None:
            self.logon_failures += 1
            log.info("SMTP AUTH failed for %r from %s", printable(user[:64]), self.remote_ip)
            return AuthResult(success=False, handled=False)
        self._auth_user = mailbox.primary_smtp_address
        return AuthResult(success=True, auth_data=mailbox.primary_smtp_address)

    def _may_send(self) -> Status | None:
        c = self.connector
        assert c is not None and self.session is not None
        groups = set(c.permission_groups)
        if self.session.authenticated or groups & {"AnonymousUsers", "Partners",
                                                   "ExchangeServers"}:
            return None
        return Status(530, "5.7.1", "Client was not authenticated")

    @syntax('MAIL FROM: <address>', extended=' [SP <mail-parameters>]')
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None
        if (refused := self._may_send()) is not None:
            await self._reply(refused)
            return
        if self.tx.sender is not None:
            await self._reply(status.S503_SEQUENCE, "Sender already specified")
            return
        rest = keyword(arg, "FROM:")
        if rest is None:
            await self._reply(status.S501_SYNTAX, "Syntax: MAIL FROM:<address> [parameters]")
            return
        try:
            address, params = path(rest, allow_null=True)
            tx = _Transaction(sender=address)
            for key, value in params.items():
                if key == "SIZE":
                    if not value.isdigit():
                        raise ValueError("SIZE needs a number")
                    c = self.connector
                    if c is not None and int(value) > c.max_message_size:
                        await self._reply(status.S552_SIZE)
                        return
                elif key == "BODY":
                    if value.upper() not in ("7BIT", "8BITMIME"):
                        raise ValueError("BODY must be 7BIT or 8BITMIME")
                    tx.body = value.upper()
                elif key == "SMTPUTF8" and value == "":
                    tx.smtputf8 = True
                elif key == "RET" and value.upper() in ("FULL", "HDRS"):
                    tx.ret = value.upper()
                elif key == "ENVID":
                    tx.envid = esmtp_envid(value)
                elif key == "AUTH":
                    pass  # RFC 4954: accepted, not trusted
                else:
                    await self._reply(status.S555_PARAMS, f"Parameter {key} not recognized")
                    return
        except ValueError as exc:
            await self._reply(status.S501_SYNTAX, reply_text(str(exc)))
            return
        if not tx.smtputf8 and not address.isascii():
            await self._reply(status.S550_NON_ASCII_SENDER)
            return
        if self.service.disk.low(int(params.get("SIZE") or 0)):
            await self._reply(status.S452_STORE_FULL)
            return
        self.tx = tx
        await self._reply(Status(250, "2.1.0", "Sender OK"))

    @syntax('RCPT TO: <address>', extended=' [SP <mail-parameters>]')
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if self.tx.sender is None:
            await self._reply(status.S503_SEQUENCE, "Need MAIL command")
            return
        c = self.connector
        assert c is not None and self.session is not None
        rest = keyword(arg, "TO:")
        if rest is None:
            await self._reply(status.S501_SYNTAX, "Syntax: RCPT TO:<address> [parameters]")
            return
        try:
            address, params = path(rest, allow_null=False)
            notify = orcpt = None
            for key, value in params.items():
                if key == "NOTIFY":
                    notify = esmtp_notify(value)
                elif key == "ORCPT":
                    orcpt = esmtp_orcpt(value)
                else:
                    await self._reply(status.S555_PARAMS, f"Parameter {key} not recognized")
                    return
        except ValueError as exc:
            await self._reply(status.S501_SYNTAX, reply_text(str(exc)))
            return
        if not self.tx.smtputf8 and not address.isascii():
            await self._reply(status.S553_NON_ASCII_RECIPIENT)
            return
        if len(self.tx.recipients) >= c.max_recipients_per_message:
            await self._reply(status.S452_TOO_MANY_RCPTS)
            return
        accepted = self.service.accept_recipient(
            c, address, relay=bool(self.session.authenticated)
            or "ExchangeServers" in c.permission_groups, orcpt=orcpt, notify=notify)
        if isinstance(accepted, Status):
            await self._reply(accepted)
            return
        self.tx.recipients.append(accepted)
        await self._reply(Status(250, "2.1.5", "Recipient OK"))

    @syntax('DATA')
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if arg:
            await self._reply(status.S501_SYNTAX, "Syntax: DATA")
            return
        if self.tx.sender is None or not self.tx.recipients:
            await self._reply(status.S503_SEQUENCE, "Need MAIL and RCPT commands")
            return
        if self.tx.chunks is not None or self.tx.chunk_error is not None:
            await self._reply(status.S503_SEQUENCE, "DATA after BDAT")
            return
        c = self.connector
        assert c is not None
        await self.push(f"354 {status.S354_START.text}")
        data = await read_data(self._reader, limit=c.max_message_size,
                               max_header=c.max_header_size, max_hops=c.max_hop_count,
                               spool_dir=self.service.spool_dir,
                               progress=self._data_progress())
        tx, self.tx = self.tx, _Transaction()
        await self._finish(tx, data)

    async def _finish(self, tx: _Transaction, data: ReceivedData) -> None:
        """The answer to a message's end (DATA's dot, BDAT LAST): its refusal, or stored
        and 250 (451/452 when storing failed)."""
        try:
            if data.error is not None:
                await self._reply(data.error)
                return
            reply = await self._submit(tx, data)
        finally:
            data.close()
        await self.push(reply)

    def _data_progress(self) -> Callable[[int], None]:
        """Counts message bytes as they arrive: the deadline moves only with enough data,
        so a slow but steady upload goes on and one that trickles is cut off at
        ConnectionInactivityTimeout."""
        received = 0

        def progress(n: int) -> None:
            nonlocal received
            received += n
            if received >= MIN_DATA_RATE:
                received = 0
                self._reset_timeout()
        return progress

    @syntax('BDAT <size> [LAST]')
    async def smtp_BDAT(self, arg: str) -> None:
        """CHUNKING (RFC 3030): `BDAT <size> [LAST]`. The chunk's bytes are read whatever
        the answer, so they are never taken for commands; the message gets DATA's checks
        (no bare CR or LF, line length, size, header, hops) but no dot transparency."""
        parts = arg.split() if arg else []
        if not (1 <= len(parts) <= 2 and parts[0].isdigit() and len(parts[0]) <= 18
                and (len(parts) == 1 or parts[1].upper() == "LAST")):
            # Without a size the chunk cannot be skipped: what follows is read as commands
            # (MaxProtocolErrors ends a session that goes on sending garbage).
            await self._reply(status.S501_SYNTAX, "Syntax: BDAT <size> [LAST]")
            return
        size, last = int(parts[0]), len(parts) == 2
        tx, c = self.tx, self.connector
        error: Status | None = None
        why: str | None = None
        if self.session is None or not self.session.host_name:
            error, why = status.S503_SEQUENCE, "Send EHLO first"
        elif tx.sender is None or not tx.recipients:
            error, why = status.S503_SEQUENCE, "Need MAIL and RCPT commands"
        elif tx.chunk_error is not None:
            error = tx.chunk_error
        elif tx.chunks is None:
            assert c is not None
            tx.chunks = MessageLines(self.service.spool_dir, limit=c.max_message_size,
                                     max_header=c.max_header_size,
                                     max_hops=c.max_hop_count, dot_stuffed=False)
        progress = self._data_progress()
        left = size
        while left:
            piece = await self._reader.readexactly(min(left, READ_SIZE))
            left -= len(piece)
            progress(len(piece))
            if error is None and tx.chunks is not None:
                tx.chunks.feed(piece)
        if error is None and tx.chunks is not None and tx.chunks.message.error in (
                status.S552_SIZE, status.S452_STORE_FULL, status.S451_STORE_ERROR):
            # Too big, or the spool failed: said now, so the client stops sending; the
            # rest of the sequence gets the same answer.
            error = tx.chunk_error = tx.chunks.message.error
            tx.abandon()
        if error is not None:
            if last and tx.sender is not None:
                self._new_transaction()
            await self._reply(error, why)
            return
        assert tx.chunks is not None
        if not last:
            await self.push(f"250 2.0.0 {size} octets received")
            return
        data = tx.chunks.finish()
        tx.chunks = None
        self.tx = _Transaction()
        await self._finish(tx, data)

    async def _submit(self, tx: _Transaction, data: ReceivedData) -> str:
        c = self.connector
        assert c is not None and tx.sender is not None and self.session is not None
        now = self.service.clock.now()
        received = self._received_line(now, tx.smtputf8)
        message_id, subject = message_info(data.header)
        head = received + data.header

        def content() -> Any:
            yield received
            yield from data.chunks()
        event = tracking.event(
            tracking.RECEIVE, tracking.SMTP, message_id=message_id, subject=subject,
            recipients=[r.address for r in tx.recipients], sender=tx.sender or "<>",
            return_path=tx.sender or "<>", connector_id=c.name,
            source_context=f"{self.remote_ip};{self.session.host_name or ''}",
            server_hostname=self.service.hostname, timestamp=now)
        inbound = Inbound(sender=tx.sender, recipients=tx.recipients, content=content,
                          size=len(received) + data.size, header=head, source="SMTP",
                          source_context=c.name, message_id=message_id, subject=subject,
                          ret=tx.ret, envid=tx.envid, date_received=now,
                          receive_events=[event])
        try:
            org = self.service.organization()
            message = self.service.submitter.prepare(org, inbound, now)
            crash_point("smtp-before-commit")
            await self.service.store.submit([message])
            crash_point("smtp-after-commit")
        except (StoreError, OSError) as exc:
            full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
                    or "disk is full" in str(exc))
            log.error("SMTP message from %s not stored: %s", self.remote_ip, exc)
            st = status.S452_STORE_FULL if full else status.S451_STORE_ERROR
            return f"{st.code} {st.enhanced} {st.text}"
        except Exception:  # noqa: BLE001 - never a 5xx nor an exception text (T10)
            log.exception("SMTP message from %s not stored", self.remote_ip)
            st = status.S451_STORE_ERROR
            return f"{st.code} {st.enhanced} {st.text}"
        self.service.submitted(message)
        st = status.S250_QUEUED
        return f"{st.code} {st.enhanced} {st.text}"

    def _received_line(self, now: float, utf8: bool) -> bytes:
        """The Received field; its WITH protocol as registered: ESMTP, ESMTPS, ESMTPSA ...
        (RFC 3848), UTF8SMTP, UTF8SMTPS ... when the message came with SMTPUTF8 (RFC 6531)."""
        assert self.session is not None
        helo = printable(self.session.host_name or "unknown")[:255]
        proto = "ESMTP" if self.session.extended_smtp else "SMTP"
        if utf8:
            proto = "UTF8SMTP"
        if self._tls_protocol is not None:
            proto += "S"
        if self.session.authenticated:
            proto += "A"
        return (f"Received: from {helo} ([{self.remote_ip}]) by {self.hostname} with "
                f"{proto}; {formatdate(now)}\r\n").encode("ascii", "replace")
