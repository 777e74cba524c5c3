"""The built-in `webhook` delivery agent: each item is POSTed to an HTTP(S) endpoint, and the
HTTP status (or a JSON answer) becomes per-recipient results (PRODUCT §4.7).

Contract
--------
Settings (checked by `WebhookAgent.check(settings)` when a connector is created or changed,
and again by `open_connection`):

- `url` (required): `http://` or `https://`, with host, optional port, path and query. No
  user:password part (use `auth-header`) and no `#fragment`.
- `auth-header` (secret, `auth-header-env=VARIABLE`): the value of an `Authorization` header
  sent with every request, e.g. `Bearer 0123abcd`.
- `hmac-key` (secret, `hmac-key-env=VARIABLE`): when set, every request carries
  `X-Mailgate-Signature: sha256=<hex>`, the HMAC-SHA256 of the exact request body.
- `format`: `json` (default) or `multipart`.
- `timeout` (int seconds, default 30): for one request, from connecting to the end of the
  response.
- `verify` (bool, default true): verify the server's TLS certificate and host name.
- `recipient-limit` (int, optional): recipients per request;
  `WebhookAgent.recipient_limit_for(settings)` gives it to the scheduler.

Request body
------------
`json`: one object `{"sender", "recipients": [{"address", "notify", "orcpt"}], "envid",
"size", "received" (ISO 8601 UTC), "message_id" (the queue's number),
"internet_message_id", "message"}`, `message` being the base64 of the raw message (CRLF).
`multipart`: `multipart/form-data` with a part `envelope` (the same object without
`message`, application/json) and a part `message` (message/rfc822, the raw bytes).

The body is streamed from `item.chunks()` (one chunk in memory at a time). It is generated
twice: once for its length (and signature), once to send it; if the message changed in
between, the last bytes of the body are withheld, the connection is dropped and `deliver`
raises (the contract's item deferral), so the endpoint never sees a mismatched body as whole.

Outcome, for every recipient of the item:

- 2xx: delivered. A JSON object answer `{"results": [{"address", "outcome", "status",
  "text"}]}` may give per-recipient outcomes (`delivered` / `deferred` / `failed`, status
  `4.x.x` / `5.x.x`); recipients it does not mention are delivered;
- 408, 429, 5xx: deferred 4.3.0 with the status line and an excerpt of the answer;
  `Retry-After` (seconds or an HTTP date) becomes the deferral's `retry_at`;
- 3xx: failed 5.0.0 (redirects are not followed);
- other 4xx: failed 5.0.0 with the status line and an excerpt;
- cannot connect (refused, unreachable, name not found, TLS refused): deferred 4.4.1;
- connection lost or no answer within `timeout`: deferred 4.4.2.

Texts name the endpoint as `host:port` only (a query string may carry a token), are one
line of printable ASCII, and never contain a secret: both secret values are replaced by
`[redacted]` in every result text and exception. The connection is kept alive between the
items of a session; a request that fails at once on a reused connection (the server closed
it while idle) is sent again once on a new one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import hmac
import http.client
import json
import re
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, Iterator, Literal, Mapping, cast

from mailgate import __version__
from mailgate.deliver.agents.api import (
    Item,
    NextHop,
    RecipientResult,
    Setting,
    deferred,
    delivered,
    failed,
)
from mailgate.core.text import one_line
from mailgate.deliver.agents.registry import AgentError, int_setting

DEFAULT_TIMEOUT = 30
FORMATS = ("json", "multipart")
EXCERPT = 200               # characters of an answer kept in a status text
ANSWER_LIMIT = 1024 * 1024  # bytes of an answer read (a longer one closes the connection)
ABORT_WAIT = 5.0            # after aborting a request, how long to wait for its thread
USER_AGENT = f"mailgate/{__version__}"

CONNECT_STATUS = "4.4.1"
LOST_STATUS = "4.4.2"
SERVER_STATUS = "4.3.0"
REFUSED_STATUS = "5.0.0"
RETRIED_HTTP = (408, 429)

_ENHANCED = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}$")
_HEADER_VALUE = re.compile(r"^[\x20-\x7e\t]*$")
REDACTED = "[redacted]"


# -- settings -----------------------------------------------------------------------------

def _bool_setting(settings: Mapping[str, Any], name: str, default: bool) -> bool:
    value = settings.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise AgentError(f"setting {name} must be true or false, not '{value}'")


def _secret(settings: Mapping[str, Any], name: str) -> str | None:
    value = settings.get(name)
    if value is None:
        return None
    # Never shown: the value comes from the node's environment and is a credential.
    if not isinstance(value, str) or not value.strip():
        raise AgentError(f"setting {name} (from its environment variable) is empty")
    if not _HEADER_VALUE.match(value):
        raise AgentError(f"setting {name} (from its environment variable) contains control "
                         f"or non-ASCII characters")
    return value


@dataclass(frozen=True)
class WebhookConfig:
    """A connector's settings, checked and parsed."""

    scheme: Literal["http", "https"]
    host: str
    port: int
    target: str                     # path and query, as sent in the request line
    format: Literal["json", "multipart"]
    timeout: int
    verify: bool
    recipient_limit: int | None
    auth_header: str | None = None
    hmac_key: str | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint as named in texts: host and port, never the path or query."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, settings: Mapping[str, Any]) -> WebhookConfig:
        url = settings.get("url")
        if not isinstance(url, str) or not url.strip():
            raise AgentError("the webhook agent needs the setting url")
        try:
            parts = urllib.parse.urlsplit(url.strip())
            port = parts.port
            host = parts.hostname
        except ValueError as exc:
            raise AgentError(f"setting url is not a valid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise AgentError("setting url must be an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise AgentError("setting url must not contain a user name or password (give "
                             "credentials with auth-header-env=VARIABLE)")
        if parts.fragment or url.strip().endswith("#"):
            raise AgentError("setting url must not contain a #fragment")
        if not host:
            raise AgentError("setting url has no host name")
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) > 126 for ch in url.strip()):
            raise AgentError("setting url must not contain spaces, control or non-ASCII "
                             "characters (percent-encode them)")
        fmt = settings.get("format") or "json"
        if fmt not in FORMATS:
            raise AgentError(f"setting format must be json or multipart, not '{fmt}'")
        timeout = int_setting(settings, "timeout", DEFAULT_TIMEOUT)
        assert timeout is not None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(cast(Literal["http", "https"], scheme),
                   host, port or (443 if scheme == "https" else 80),
                   target, cast(Literal["json", "multipart"], fmt), timeout, _bool_setting(settings, "verify", True),
                   int_setting(settings, "recipient-limit", None),
                   _secret(settings, "auth-header"), _secret(settings, "hmac-key"))

    def redact(self, text: str) -> str:
        """`text` with every secret value (and the credential of auth-header) replaced."""
        values = [v for v in (self.auth_header, self.hmac_key) if v]
        if self.auth_header and " " in self.auth_header.strip():
            credential = self.auth_header.strip().split(None, 1)[1].strip()
            if len(credential) >= 4:
                values.append(credential)
        for value in sorted(values, key=len, reverse=True):
            text = text.replace(value, REDACTED)
        return text


# -- the request body ---------------------------------------------------------------------

def envelope(item: Item) -> dict[str, Any]:
    """The item's envelope as sent (the JSON body without `message`)."""
    received = datetime.fromtimestamp(item.received, timezone.utc)
    return {
        "sender": item.sender,
        "recipients": [{"address": r.address, "notify": r.notify, "orcpt": r.orcpt}
                       for r in item.recipients],
        "envid": item.envid,
        "size": item.size,
        "received": received.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "message_id": item.message_id,
        "internet_message_id": item.internet_message_id,
    }


def _base64(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Base64 of the concatenated chunks, streamed (groups of 3 bytes never split)."""
    rest = b""
    for chunk in chunks:
        data = rest + chunk
        cut = len(data) - len(data) % 3
        rest = data[cut:]
        if cut:
            yield base64.b64encode(data[:cut])
    if rest:
        yield base64.b64encode(rest)


class _Body:
    """One request body: its content type and a generator of its pieces (the last piece
    is always the closing bytes, which the sender may withhold)."""

    def __init__(self, item: Item, fmt: str) -> None:
        self.item = item
        self.fmt = fmt
        env = envelope(item)
        if fmt == "json":
            self.content_type = "application/json"
            self.head = (json.dumps(env)[:-1] + ', "message": "').encode()
            self.tail = b'"}'
        else:
            boundary = "mailgate-" + secrets.token_hex(16)
            self.content_type = f"multipart/form-data; boundary={boundary}"
            self.head = (f"--{boundary}\r\n"
                         'Content-Disposition: form-data; name="envelope"\r\n'
                         "Content-Type: application/json\r\n\r\n").encode() + \
                json.dumps(env).encode() + \
                (f"\r\n--{boundary}\r\n"
                 'Content-Disposition: form-data; name="message"; filename="message.eml"\r\n'
                 "Content-Type: message/rfc822\r\n\r\n").encode()
            self.tail = f"\r\n--{boundary}--\r\n".encode()

    def pieces(self) -> Iterator[bytes]:
        chunks: Iterator[bytes] = iter(self.item.chunks())
        try:
            yield self.head
            yield from (_base64(_reading(chunks)) if self.fmt == "json"
                        else _reading(chunks))
            yield self.tail
        finally:
            close = getattr(chunks, "close", None)
            if callable(close):
                with contextlib.suppress(ValueError):
                    close()


class _Digest:
    def __init__(self, key: str | None) -> None:
        self._h: Any = (hmac.new(key.encode(), digestmod=hashlib.sha256) if key
                        else hashlib.sha256())
        self.length = 0

    def update(self, data: bytes) -> None:
        self._h.update(data)
        self.length += len(data)

    def hexdigest(self) -> str:
        return str(self._h.hexdigest())


class MessageUnreadable(Exception):
    """The message bytes could not be read (the contract's item deferral: `deliver`
    raises it). Not an OSError, so it is never taken for a network problem."""


class ContentChanged(MessageUnreadable):
    """The message bytes differed between measuring the body and sending it."""


def _reading(chunks: Iterator[bytes]) -> Iterator[bytes]:
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except Exception as exc:
            raise MessageUnreadable(f"cannot read the message: {type(exc).__name__}: "
                                    f"{exc}") from exc
        yield chunk


# -- one exchange (in a worker thread) ----------------------------------------------------

@dataclass(frozen=True)
class _Answer:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes


@dataclass(frozen=True)
class _Outcome:
    outcome: Literal["delivered", "deferred", "failed"]
    enhanced: str
    text: str
    retry_at: float | None = None

    def result(self, address: str) -> RecipientResult:
        if self.outcome == "delivered":
            return delivered(address, self.text)
        if self.outcome == "deferred":
            return deferred(address, self.text, self.retry_at, self.enhanced)
        return failed(address, self.enhanced, self.text)


class _Aborted(Exception):
    """The exchange was given up (timeout or cancellation) while the thread ran."""


class _CannotConnect(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class WebhookConnection:
    """A session of a webhook connector: one POST per item over a kept-alive connection."""

    def __init__(self, config: WebhookConfig, context: ssl.SSLContext | None) -> None:
        self.config = config
        self.context = context
        self._http: http.client.HTTPConnection | None = None
        self._used = False          # the current connection has carried a request
        self._lock = threading.Lock()
        self._aborted = False

    # The event loop side.

    async def deliver(self, item: Item) -> list[RecipientResult]:
        if not item.recipients:
            return []
        try:
            outcome, per_recipient = await self._post(item)
        except MessageUnreadable as exc:
            raise type(exc)(self.config.redact(str(exc))) from None
        except Exception as exc:
            # Not expected; its text may come from anywhere, so it is redacted.
            raise RuntimeError(self.config.redact(f"{type(exc).__name__}: {exc}")) from None
        return [per_recipient.get(r.address) or outcome.result(r.address)
                for r in item.recipients]

    async def close(self) -> None:
        self._drop()

    async def _post(self, item: Item) -> tuple[_Outcome, dict[str, RecipientResult]]:
        self._aborted = False
        body = _Body(item, self.config.format)
        work = asyncio.ensure_future(asyncio.to_thread(self._exchange, body))
        try:
            try:
                async with asyncio.timeout(self.config.timeout):
                    answer = await asyncio.shield(work)
            except TimeoutError:
                return _Outcome("deferred", LOST_STATUS,
                                f"{self.config.endpoint} did not answer within "
                                f"{self.config.timeout} s"), {}
            except (OSError, http.client.HTTPException, _Aborted, _CannotConnect) as exc:
                return self._connection_problem(exc), {}
        finally:
            if not work.done():
                # Timed out or cancelled: break the connection under the worker thread so
                # it returns, and never let it send the rest of the message afterwards.
                self._aborted = True
                self._shutdown()
                await asyncio.wait({work}, timeout=ABORT_WAIT)
            if work.done() and not work.cancelled():
                work.exception()   # retrieved: an aborted exchange's error is expected
        return self._interpret(answer, item)

    # The worker thread side.

    def _exchange(self, body: _Body) -> _Answer:
        digest = _Digest(self.config.hmac_key)
        for piece in body.pieces():   # first pass: length and signature
            digest.update(piece)
        headers = {"Content-Type": body.content_type,
                   "Content-Length": str(digest.length),
                   "Accept": "application/json", "User-Agent": USER_AGENT}
        if self.config.auth_header:
            headers["Authorization"] = self.config.auth_header
        if self.config.hmac_key:
            headers["X-Mailgate-Signature"] = f"sha256={digest.hexdigest()}"
        for attempt in (1, 2):
            conn, reused = self._connection()
            if conn.sock is None:
                try:
                    conn.connect()
                except OSError as exc:
                    self._drop()
                    raise _CannotConnect(exc) from None
            try:
                conn.request("POST", self.config.target,
                             body=self._checked(body, digest), headers=headers)
                response = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as exc:
                self._drop()
                if reused and attempt == 1 and not self._aborted:
                    continue      # the server closed the idle connection: once more
                raise exc
            except BaseException:
                self._drop()
                raise
            return self._read(response)
        raise AssertionError("unreachable")

    def _checked(self, body: _Body, expected: _Digest) -> Iterator[bytes]:
        """The body again, withholding its last piece unless it is what was measured."""
        digest = _Digest(self.config.hmac_key)
        pending: bytes | None = None
        for piece in body.pieces():
            if self._aborted:
                raise _Aborted("aborted")
            if pending is not None:
                yield pending
            digest.update(piece)
            if digest.length > expected.length:
                break
            pending = piece
        if digest.length != expected.length or digest.hexdigest() != expected.hexdigest():
            raise ContentChanged(f"content of message {body.item.message_id} changed while "
                                 f"it was sent")
        if pending is not None:
            yield pending

    def _read(self, response: http.client.HTTPResponse) -> _Answer:
        try:
            data = response.read(ANSWER_LIMIT + 1)
            complete = len(data) <= ANSWER_LIMIT and response.isclosed()
            if not complete or response.will_close:
                self._drop()
            else:
                self._used = True
            return _Answer(response.status, response.reason, response.headers,
                           data[:ANSWER_LIMIT])
        except BaseException:
            self._drop()
            raise

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._aborted:
                raise _Aborted("aborted")
            if self._http is not None:
                return self._http, self._used
            c = self.config
            if c.scheme == "https":
                self._http = http.client.HTTPSConnection(c.host, c.port, timeout=c.timeout,
                                                         context=self.context)
            else:
                self._http = http.client.HTTPConnection(c.host, c.port, timeout=c.timeout)
            self._used = False
            return self._http, False

    def _drop(self) -> None:
        with self._lock:
            conn, self._http, self._used = self._http, None, False
        if conn is not None:
            conn.close()

    def _shutdown(self) -> None:
        with self._lock:
            sock = self._http.sock if self._http is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # Outcomes.

    def _connection_problem(self, exc: BaseException) -> _Outcome:
        where = self.config.endpoint
        if isinstance(exc, _CannotConnect):
            cause = exc.cause
            if isinstance(cause, socket.gaierror):
                reason = f"host name not found ({cause.strerror})"
            elif isinstance(cause, ssl.SSLCertVerificationError):
                reason = f"TLS certificate refused: {cause.verify_message}"
            elif isinstance(cause, ssl.SSLError):
                reason = f"TLS failed: {cause.reason or cause}"
            elif isinstance(cause, TimeoutError):
                reason = f"no answer within {self.config.timeout} s"
            elif isinstance(cause, OSError) and cause.strerror:
                reason = cause.strerror
            else:
                reason = f"{type(cause).__name__}: {cause}"
            return _Outcome("deferred", CONNECT_STATUS,
                            self._line(f"cannot connect to {where}: {reason}"))
        if isinstance(exc, (TimeoutError, _Aborted)):
            return _Outcome("deferred", LOST_STATUS, f"{where} did not answer within "
                                                     f"{self.config.timeout} s")
        if isinstance(exc, http.client.RemoteDisconnected):
            reason = "closed the connection without an answer"
        elif isinstance(exc, OSError) and exc.strerror:
            reason = f"connection lost: {exc.strerror}"
        else:
            reason = f"sent a bad answer: {type(exc).__name__}: {exc}"
        return _Outcome("deferred", LOST_STATUS, self._line(f"{where} {reason}"))

    def _line(self, text: str) -> str:
        """One printable line with the secrets redacted: before (the whole text, so a cut
        never leaves part of a secret) and after collapsing whitespace."""
        redact = self.config.redact
        return redact(one_line(redact(text).encode("utf-8", "replace")))

    def _status_line(self, answer: _Answer) -> str:
        excerpt = self._line(answer.body.decode("utf-8", "replace"))
        if len(excerpt) > EXCERPT:
            excerpt = excerpt[:EXCERPT] + " ..."
        text = self._line(f"{self.config.endpoint} answered {answer.status} "
                          f"{answer.reason}".rstrip())
        return f"{text}: {excerpt}" if excerpt else text

    def _interpret(self, answer: _Answer, item: Item
                   ) -> tuple[_Outcome, dict[str, RecipientResult]]:
        status = answer.status
        if 200 <= status < 300:
            line = self._line(f"{self.config.endpoint} answered {status} {answer.reason}"
                              .rstrip())
            return _Outcome("delivered", "2.0.0", line), self._per_recipient(answer, item)
        if 300 <= status < 400:
            location = answer.headers.get("Location")
            text = f"{self.config.endpoint} answered {status} {answer.reason}; redirects " \
                   f"are not followed" + (f" (Location: {location})" if location else "")
            return _Outcome("failed", REFUSED_STATUS, self._line(text)[:2 * EXCERPT]), {}
        if status in RETRIED_HTTP or status >= 500 or status < 200:
            return _Outcome("deferred", SERVER_STATUS, self._status_line(answer),
                            retry_after(answer.headers.get("Retry-After"))), {}
        return _Outcome("failed", REFUSED_STATUS, self._status_line(answer)), {}

    def _per_recipient(self, answer: _Answer, item: Item) -> dict[str, RecipientResult]:
        try:
            data = json.loads(answer.body)
        except ValueError:
            return {}
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            return {}
        addresses = {r.address: r.address for r in item.recipients}
        folded = {r.address.casefold(): r.address for r in item.recipients}
        out: dict[str, RecipientResult] = {}
        for entry in data["results"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("address"), str):
                continue
            address = addresses.get(entry["address"]) or folded.get(
                entry["address"].casefold())
            outcome = entry.get("outcome")
            if address is None or outcome not in ("delivered", "deferred", "failed"):
                continue
            raw_text = entry.get("text")
            text = self._line(str(raw_text))[:EXCERPT] if raw_text else ""   # cut after
            code = entry.get("status")
            code = code if isinstance(code, str) and _ENHANCED.match(code) else ""
            where = self.config.endpoint
            if outcome == "delivered":
                out[address] = delivered(address, text or f"{where} accepted it")
            elif outcome == "deferred":
                out[address] = deferred(address, text or f"{where} deferred it",
                                        retry_after(answer.headers.get("Retry-After")),
                                        code if code.startswith("4.") else "4.0.0")
            else:
                out[address] = failed(address, code if code.startswith("5.") else "5.0.0",
                                      text or f"{where} refused it")
        return out


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` (delay seconds or an HTTP date) as epoch seconds, or None."""
    if not value:
        return None
    now = time.time() if now is None else now
    value = value.strip()
    if value.isdigit():
        return now + int(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    at = when.timestamp()
    return at if at > now else None


# -- the agent ----------------------------------------------------------------------------

class WebhookAgent:
    """Delivery by HTTP POST to an endpoint (protocol `webhook`)."""

    settings: ClassVar[tuple[Setting, ...]] = (
        Setting("url", "url", required=True, help="Endpoint the messages are POSTed to."),
        Setting("auth-header", secret=True,
                help="Value of the Authorization header (auth-header-env=VARIABLE)."),
        Setting("hmac-key", secret=True,
                help="Key for X-Mailgate-Signature: sha256=HMAC of the body "
                     "(hmac-key-env=VARIABLE)."),
        Setting("format", "string", default="json", help="json or multipart."),
        Setting("timeout", "int", default=str(DEFAULT_TIMEOUT),
                help="Seconds one request may take (then deferred)."),
        Setting("verify", "bool", default="true",
                help="Verify the server's TLS certificate and host name."),
        Setting("recipient-limit", "int", help="Recipients per request."),
    )
    # Per connector: see recipient_limit_for().
    recipient_limit: ClassVar[int | None] = None

    @classmethod
    def check(cls, settings: Mapping[str, Any]) -> None:
        """Refuse settings no request could be made with (AgentError, one line): a URL with
        credentials, a fragment or no host, an unknown format, a timeout or
        recipient-limit under 1. Whether the host resolves is not checked."""
        WebhookConfig.parse(settings)

    @classmethod
    def recipient_limit_for(cls, settings: Mapping[str, Any]) -> int | None:
        return WebhookConfig.parse(settings).recipient_limit

    async def open_connection(self, next_hop: NextHop) -> WebhookConnection:
        config = WebhookConfig.parse(next_hop.settings)
        context: ssl.SSLContext | None = None
        if config.scheme == "https":
            context = ssl.create_default_context()
            if not config.verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        # No DNS look-up or connection here: the first deliver connects, and a failure
        # there is a deferral of that item.
        return WebhookConnection(config, context)
