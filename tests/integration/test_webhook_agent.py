"""The built-in webhook delivery agent (PRODUCT §4.7): items are POSTed to a real local HTTP
server (http.server in a thread on 127.0.0.1) that records every request, and its answers
become per-recipient results. Settings go through the registry's checks as for a
connector (secrets read from a given environment), then WebhookAgent.check."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import pytest

from mailgate.deliver.agents.api import Item, ItemRecipient, NextHop, RecipientResult
from mailgate.deliver.agents.registry import (
    AgentError,
    AgentInfo,
    check_settings,
    resolve_settings,
)
from mailgate.deliver.agents.webhook import (
    MessageUnreadable,
    WebhookAgent,
    WebhookConnection,
    retry_after,
)
from tests.agents import deliver_once, outcomes

INFO = AgentInfo("webhook", "test", "mailgate (mailgate.deliver.agents.webhook:WebhookAgent)",
                 WebhookAgent, WebhookAgent.settings)
MESSAGE = (b"From: alice@contoso.test\r\nTo: bob@fabrikam.test\r\nSubject: for the hook\r\n"
           b"Message-ID: <m1@contoso.test>\r\n\r\nline one\r\n\x00binary \xff\xfe\r\n"
           b".\r\nlast line\r\n")
TOKEN = "Bearer s3cr3t-t0ken-value"
KEY = "hmac-key-very-secret"
ENVIRON = {"HOOK_TOKEN": TOKEN, "HOOK_KEY": KEY}

Reply = tuple[int, dict[str, str], bytes]


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    client: tuple[str, int]


@dataclass
class Server:
    url: str
    requests: list[Request] = field(default_factory=list)
    reply: Callable[[Request], Reply] = lambda req: (200, {}, b"")
    delay: float = 0.0
    close_after: bool = False     # close the connection after answering, without saying so


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # keep-alive
    server: Any

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        state: Server = self.server.state
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        req = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                      self.client_address)
        state.requests.append(req)
        if state.delay:
            time.sleep(state.delay)
        status, headers, data = state.reply(req)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if state.close_after:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    state = Server(f"http://127.0.0.1:{httpd.server_address[1]}/hooks/mail?tenant=7")
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


def make_item(*addresses: str, content: bytes = MESSAGE, sender: str = "alice@contoso.test",
              message_id: int = 42) -> Item:
    pieces = [content[i:i + 7] for i in range(0, len(content), 7)]   # many tiny chunks
    return Item(message_id, "<m1@contoso.test>", sender,
                tuple(ItemRecipient(a, "SUCCESS,FAILURE" if i == 0 else None,
                                    f"rfc822;{a}" if i == 0 else None)
                      for i, a in enumerate(addresses)),
                "env-1", len(content), 1.8e9, lambda: iter(pieces))


def settings_for(**given: str) -> dict[str, Any]:
    """Connector settings as stored (registry check plus the agent's own) and resolved."""
    stored = check_settings(INFO, {k.replace("_", "-"): v for k, v in given.items()})
    WebhookAgent.check(stored)
    return resolve_settings(INFO, stored, ENVIRON)


async def connect(**given: str) -> WebhookConnection:
    return await WebhookAgent().open_connection(NextHop("Hook", "HOOK", settings_for(**given)))


async def deliver(item: Item, **given: str) -> list[RecipientResult]:
    return await deliver_once(await connect(**given), item)


async def test_json_body_carries_the_envelope_and_the_exact_message(server: Server) -> None:
    """The default format POSTs one JSON object to the URL's path and query: the envelope
    fields, `received` in ISO 8601 UTC, and `message` the base64 of the item's exact bytes;
    a 200 delivers every recipient, and a session reuses one kept-alive connection."""
    item = make_item("bob@fabrikam.test", "carol@fabrikam.test")
    conn = await connect(url=server.url)
    try:
        results = await conn.deliver(item)
        again = await conn.deliver(make_item("dave@fabrikam.test"))
    finally:
        await conn.close()
    port = server.url.split(":")[2].split("/")[0]
    assert outcomes(results) == [("bob@fabrikam.test", "delivered", "2.0.0"),
                                 ("carol@fabrikam.test", "delivered", "2.0.0")]
    assert results[0].status == f"250 2.0.0 127.0.0.1:{port} answered 200 OK"
    assert outcomes(again) == [("dave@fabrikam.test", "delivered", "2.0.0")]
    first, second = server.requests
    assert first.path == "/hooks/mail?tenant=7"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["user-agent"].startswith("mailgate/")
    assert "authorization" not in first.headers and "x-mailgate-signature" not in first.headers
    body = json.loads(first.body)
    assert base64.b64decode(body.pop("message"), validate=True) == MESSAGE
    assert body == {
        "sender": "alice@contoso.test",
        "recipients": [{"address": "bob@fabrikam.test", "notify": "SUCCESS,FAILURE",
                        "orcpt": "rfc822;bob@fabrikam.test"},
                       {"address": "carol@fabrikam.test", "notify": None, "orcpt": None}],
        "envid": "env-1", "size": len(MESSAGE), "received": "2027-01-15T08:00:00Z",
        "message_id": 42, "internet_message_id": "<m1@contoso.test>"}
    assert first.client == second.client          # keep-alive: the same connection


async def test_multipart_has_an_envelope_part_and_a_message_rfc822_part(
        server: Server) -> None:
    """format=multipart sends multipart/form-data: a JSON `envelope` part and a `message`
    part of type message/rfc822 holding the raw bytes unchanged."""
    [result] = await deliver(make_item("bob@fabrikam.test"), url=server.url,
                             format="multipart")
    assert result.outcome == "delivered"
    [req] = server.requests
    ctype, _, boundary = req.headers["content-type"].partition("; boundary=")
    assert ctype == "multipart/form-data" and boundary
    assert req.body.endswith(f"\r\n--{boundary}--\r\n".encode())
    parts = req.body.split(f"--{boundary}".encode())
    assert parts[0] == b"" and parts[-1] == b"--\r\n" and len(parts) == 4
    heads = []
    contents = []
    for part in parts[1:3]:
        head, _, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        heads.append(head.decode())
        contents.append(content.removesuffix(b"\r\n"))
    assert 'form-data; name="envelope"' in heads[0] and "application/json" in heads[0]
    assert json.loads(contents[0])["recipients"][0]["address"] == "bob@fabrikam.test"
    assert 'name="message"' in heads[1] and "Content-Type: message/rfc822" in heads[1]
    assert contents[1] == MESSAGE


@pytest.mark.parametrize("fmt", ["json", "multipart"])
async def test_hmac_signature_and_authorization_header(server: Server, fmt: str) -> None:
    """With hmac-key, X-Mailgate-Signature is sha256=HMAC-SHA256 of the exact body (it
    verifies with hmac.compare_digest); auth-header-env puts the variable's value in the
    Authorization header."""
    [result] = await deliver(make_item("bob@fabrikam.test"), url=server.url, format=fmt,
                             auth_header_env="HOOK_TOKEN", hmac_key_env="HOOK_KEY")
    assert result.outcome == "delivered"
    [req] = server.requests
    assert req.headers["authorization"] == TOKEN
    expected = "sha256=" + hmac.new(KEY.encode(), req.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(req.headers["x-mailgate-signature"], expected)


async def test_per_recipient_results_in_a_2xx_answer(server: Server) -> None:
    """A 2xx answer with {"results": [...]} gives each recipient its own outcome and
    status; a recipient it does not mention follows the HTTP status (delivered)."""
    answer = {"results": [
        {"address": "bob@fabrikam.test", "outcome": "delivered", "text": "stored as 17"},
        {"address": "NOBODY@fabrikam.test", "outcome": "failed", "status": "5.1.1",
         "text": "no such\nuser"},
        {"address": "carol@fabrikam.test", "outcome": "deferred", "status": "4.2.2",
         "text": "mailbox full"},
        {"address": "stranger@elsewhere.test", "outcome": "failed"},
        {"address": "dave@fabrikam.test", "outcome": "bogus"}]}
    server.reply = lambda req: (200, {"Content-Type": "application/json"},
                                json.dumps(answer).encode())
    results = await deliver(make_item("bob@fabrikam.test", "nobody@fabrikam.test",
                                      "carol@fabrikam.test", "dave@fabrikam.test"),
                            url=server.url)
    assert outcomes(results) == [("bob@fabrikam.test", "delivered", "2.0.0"),
                                 ("nobody@fabrikam.test", "failed", "5.1.1"),
                                 ("carol@fabrikam.test", "deferred", "4.2.2"),
                                 ("dave@fabrikam.test", "delivered", "2.0.0")]
    assert results[0].status == "250 2.0.0 stored as 17"
    assert results[1].status == "550 5.1.1 no such user"


async def test_503_with_retry_after_is_deferred_until_then(server: Server) -> None:
    """A 503 defers every recipient 4.3.0 with the status line and a one-line excerpt of
    the answer; Retry-After: 120 becomes retry_at, about now + 120 s."""
    server.reply = lambda req: (503, {"Retry-After": "120"}, b"busy\r\n\tcome back later")
    before = time.time()
    results = await deliver(make_item("bob@fabrikam.test", "carol@fabrikam.test"),
                            url=server.url)
    assert outcomes(results) == [("bob@fabrikam.test", "deferred", "4.3.0"),
                                 ("carol@fabrikam.test", "deferred", "4.3.0")]
    assert results[0].status.endswith("answered 503 Service Unavailable: busy come back later")
    assert results[0].retry_at is not None
    assert before + 119 <= results[0].retry_at <= time.time() + 121


def test_retry_after_as_an_http_date() -> None:
    """Retry-After may be an HTTP date; a date in the past or garbage gives no retry_at."""
    now = 1_800_000_000.0
    assert retry_after("Fri, 15 Jan 2027 08:02:00 GMT", now) == now + 120
    assert retry_after("Fri, 15 Jan 2027 07:00:00 GMT", now) is None
    assert retry_after("soon", now) is None
    assert retry_after("30", now) == now + 30


@pytest.mark.parametrize("status", [429, 408, 500, 502])
async def test_throttling_and_server_errors_are_deferred(server: Server, status: int) -> None:
    """429, 408 and 5xx are temporary: deferred 4.3.0, no retry_at without Retry-After."""
    server.reply = lambda req: (status, {}, b"")
    [result] = await deliver(make_item("bob@fabrikam.test"), url=server.url)
    assert (result.outcome, result.status.split()[1], result.retry_at) == (
        "deferred", "4.3.0", None)
    assert f"answered {status} " in result.status


async def test_other_4xx_fail_and_redirects_are_not_followed(server: Server) -> None:
    """A 404 fails every recipient 5.0.0 with the status line and excerpt; a 3xx fails too,
    saying that redirects are not followed and where it pointed."""
    server.reply = lambda req: (404, {}, b"no such hook")
    [result] = await deliver(make_item("bob@fabrikam.test"), url=server.url)
    assert result.outcome == "failed"
    assert result.status.startswith("550 5.0.0 127.0.0.1:")
    assert result.status.endswith("answered 404 Not Found: no such hook")
    server.reply = lambda req: (301, {"Location": "https://new.example/hook"}, b"")
    [result] = await deliver(make_item("bob@fabrikam.test"), url=server.url)
    assert result.outcome == "failed" and result.status.startswith("550 5.0.0 ")
    assert result.status.endswith("answered 301 Moved Permanently; redirects are not "
                                  "followed (Location: https://new.example/hook)")


async def test_a_server_slower_than_the_timeout_is_deferred(server: Server) -> None:
    """No answer within `timeout` seconds defers the item 4.4.2, soon after the timeout
    rather than when the server would have answered."""
    server.delay = 5
    started = time.monotonic()
    [result] = await deliver(make_item("bob@fabrikam.test"), url=server.url, timeout="1")
    assert time.monotonic() - started < 3
    assert result.outcome == "deferred"
    assert result.status.startswith("451 4.4.2 127.0.0.1:")
    assert result.status.endswith("did not answer within 1 s")


async def test_a_closed_port_is_deferred_as_connection_refused() -> None:
    """Nothing listening: deferred 4.4.1 'cannot connect ... Connection refused' (open
    succeeds: connecting is deliver's business)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    [result] = await deliver(make_item("bob@fabrikam.test"), url=f"http://127.0.0.1:{port}/")
    assert result.outcome == "deferred"
    assert result.status == (f"451 4.4.1 cannot connect to 127.0.0.1:{port}: "
                             f"Connection refused")


async def test_an_idle_connection_closed_by_the_server_is_reopened(server: Server) -> None:
    """When the server closes a kept-alive connection between items without saying so,
    the next item is sent again once on a new connection and delivered."""
    server.close_after = True
    conn = await connect(url=server.url)
    try:
        first = await conn.deliver(make_item("bob@fabrikam.test"))
        time.sleep(0.2)
        second = await conn.deliver(make_item("carol@fabrikam.test"))
    finally:
        await conn.close()
    assert [r.outcome for r in first + second] == ["delivered", "delivered"]
    assert len(server.requests) == 2
    assert server.requests[0].client != server.requests[1].client


async def test_secrets_never_appear_in_results_or_exceptions(server: Server) -> None:
    """A server that echoes the request headers into its answers (error excerpts and
    per-recipient texts) gets them back redacted; an exception's text is redacted too."""
    def echo(req: Request) -> Reply:
        headers = json.dumps(req.headers)
        if req.headers.get("x-test") == "2xx":
            return 200, {}, json.dumps({"results": [
                {"address": "bob@fabrikam.test", "outcome": "failed", "text": headers},
                {"address": "carol@fabrikam.test", "outcome": "deferred",
                 "text": f"key {KEY}"}]}).encode()
        # The secret first, so that any cut of a long excerpt comes after it.
        return 500, {}, f"auth was {req.headers['authorization']}; {headers}".encode()

    results: list[RecipientResult] = []
    for use in ("500", "2xx"):
        server.reply = (lambda u: lambda req: echo(Request(req.path, {**req.headers,
                                                                       "x-test": u},
                                                           req.body, req.client)))(use)
        results += await deliver(make_item("bob@fabrikam.test", "carol@fabrikam.test"),
                                 url=server.url, auth_header_env="HOOK_TOKEN",
                                 hmac_key_env="HOOK_KEY")
    assert [r.outcome for r in results] == ["deferred", "deferred", "failed", "deferred"]
    assert "[redacted]" in results[0].status and "[redacted]" in results[3].status
    for r in results:
        assert TOKEN not in r.status and "s3cr3t-t0ken-value" not in r.status
        assert KEY not in r.status

    def leaky() -> Iterator[bytes]:
        yield b"Subject: x\r\n\r\n"
        raise OSError(f"disk error near {TOKEN} and {KEY}")

    item = Item(9, None, "a@x", (ItemRecipient("b@x"),), None, 100, 1.8e9, leaky)
    conn = await connect(url=server.url, auth_header_env="HOOK_TOKEN",
                         hmac_key_env="HOOK_KEY")
    with pytest.raises(MessageUnreadable) as raised:
        await conn.deliver(item)
    assert "disk error near" in str(raised.value)
    assert "s3cr3t" not in str(raised.value) and KEY not in str(raised.value)


async def test_a_message_that_cannot_be_read_raises_before_anything_is_sent(
        server: Server) -> None:
    """Unreadable message bytes raise MessageUnreadable from deliver (the contract's item
    deferral); the endpoint receives no request, so never a truncated message."""
    def broken() -> Iterator[bytes]:
        yield b"From: a@x\r\n\r\nfirst part\r\n"
        raise OSError("content of message 42 changed while read")

    item = Item(42, None, "a@x", (ItemRecipient("b@x"),), None, 100, 1.8e9, broken)
    conn = await connect(url=server.url)
    with pytest.raises(MessageUnreadable, match="changed while read"):
        await conn.deliver(item)
    assert server.requests == []


@pytest.mark.parametrize("given, message", [
    ({"url": "https://user:pw@hooks.example/x"}, "must not contain a user name or password"),
    ({"url": "https://hooks.example/x#frag"}, "must not contain a #fragment"),
    ({"url": "https://hooks.example:99999/"}, "not a valid URL"),
    ({"url": "https://hooks.example/", "format": "xml"}, "format must be json or multipart"),
    ({"url": "https://hooks.example/", "timeout": "0"}, "timeout must be 1 or more"),
    ({"url": "https://hooks.example/", "recipient-limit": "0"}, "recipient-limit must be 1"),
    ({"url": "ftp://hooks.example/"}, "http:// or https://"),
])
def test_check_refuses_settings_no_request_could_use(given: dict[str, str],
                                                     message: str) -> None:
    """WebhookAgent.check (for connector creation) refuses credentials or a fragment in
    the URL, a bad port, an unknown format and limits under 1, with one line."""
    with pytest.raises(AgentError, match=message):
        WebhookAgent.check(check_settings(INFO, given))


def test_recipient_limit_and_defaults() -> None:
    """recipient_limit_for reads the connector's recipient-limit (None when absent); a
    host that does not resolve is not an error when settings are checked."""
    assert WebhookAgent.recipient_limit_for(
        settings_for(url="https://no-such-host.invalid/")) is None
    assert WebhookAgent.recipient_limit_for(
        settings_for(url="https://no-such-host.invalid/", recipient_limit="10")) == 10
