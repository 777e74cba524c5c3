"""Send connectors' SMTP delivery (issue #4 scope 4) against real peers on loopback: an
in-process aiosmtpd next hop scripted per recipient, Postfix's smtp-sink, a raw-capturing
server; DNS answers come from a real UDP DNS server (tests/dnsserver.py), given to the
in-process node as its resolver. The wire encoding (WireData), host parsing and the MX
lookup are also checked on their own."""

from __future__ import annotations

import json
import time
import tracemalloc
from email.message import EmailMessage
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.core.hosts import HostError, HostPort, parse_dns_server, parse_smart_host
from mailgate.deliver.mx import (
    DnsResolver,
    DnsTemporary,
    Target,
    Unroutable,
    host_targets,
    mx_targets,
)
from mailgate.deliver.smtp_client import (
    ClientPolicy,
    NoConnection,
    OutMessage,
    OutRecipient,
    SmtpClient,
    reply_status,
)
from mailgate.deliver.wire import WireData
from tests.conftest import MailgateEnv, NodeThread, drop_file, wait_for
from tests.dnsserver import DnsServer
from tests.e2e.test_queue_engine import messages, recipient_blocks, reports
from tests.peers import (
    AiosmtpdPeer,
    RawPeer,
    SmtpSink,
    assert_clean_wire,
    certificate_context,
    free_port,
    normalised,
    self_signed_context,
    unstuff,
)

ALICE = "alice@contoso.test"
ZONE = {"fabrikam.test": [("MX", "10 mx.fabrikam.test.")],
        "mx.fabrikam.test": [("A", "127.0.0.1")]}


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


def resolver(dns: DnsServer) -> DnsResolver:
    return DnsResolver([HostPort("127.0.0.1", dns.port, True)])


def internet(env: MailgateEnv, port: int, *args: str) -> None:
    """A Send connector for everything (`*`) through DNS, next hops on `port`."""
    env.cli("send-connector", "new", "--name", "Internet", "--address-spaces", "*",
            "--port", str(port), *args)


def pickup(env: MailgateEnv, name: str, to: str, subject: str = "hello",
           body: bytes = b"Hello.\n", sender: str = ALICE) -> None:
    drop_file(env.pickup, name, f"From: {sender}\nTo: {to}\nSubject: {subject}\n\n".encode()
              + body)


def replay(env: MailgateEnv, name: str, envelope: str, subject: str) -> None:
    drop_file(env.data / "replay", name,
              envelope.encode() + f"From: {ALICE}\r\nTo: bob@fabrikam.test\r\n"
                                  f"Subject: {subject}\r\n\r\nBody.\r\n".encode())


def events(env: MailgateEnv, *args: str) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]],
                json.loads(env.cli("tracking", "search", *args, "--json").stdout))


# -- the wire: no bare CR or LF, no lone "." line (T18) ---------------------------------

# Every smuggling sequence of reliability.md §2.1, inside a body.
SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r\n.\r\r\n",
             b"\r\r\n.\r\r\n", b"\n..\n", b"\r\n.\r\nMAIL FROM:<smuggled@example.test>\r\n",
             b"\n", b"\r", b"\r\r", b"\n\r", b".", b"..\r\n.", b"\r\n.\r\n"]


def wire(content: bytes, step: int) -> bytes:
    w = WireData()
    out = b"".join(w.feed(content[i:i + step]) for i in range(0, len(content), step))
    return out + w.end()


@pytest.mark.parametrize("sequence", SMUGGLING)
def test_wire_data_normalises_and_stuffs_every_smuggling_sequence(sequence: bytes) -> None:
    """T18 (outbound smuggling, encoding): each §2.1 sequence inside a body, split into
    chunks at every possible place, becomes clean CRLF lines with dots stuffed; the
    receiver gets the body back with only line endings normalised."""
    content = b"Subject: t\r\n\r\nbefore" + sequence + b"after\r\n" + sequence
    for step in range(1, len(content) + 1):
        data = wire(content, step)
        assert_clean_wire(data)
        assert unstuff(data) == normalised(content)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200).map(lambda b: bytes(b"\r\n.x"[c % 4] for c in b)),
       st.integers(min_value=1, max_value=50))
def test_wire_data_property(content: bytes, step: int) -> None:
    """T18 property: any mix of CR, LF, '.' and text, in any chunking."""
    data = wire(content, step)
    assert_clean_wire(data)
    assert unstuff(data) == normalised(content)


def test_reply_status_keeps_codes_and_quotes_the_host() -> None:
    st_ = reply_status(550, "5.1.1 <x@y> no such\nuser", "mx[1.2.3.4]:25", "RCPT TO")
    assert str(st_) == "550 5.1.1 mx[1.2.3.4]:25 said: <x@y> no such user (in reply to RCPT TO)"
    assert reply_status(451, "try later", "h", "DATA").enhanced == "4.0.0"
    assert reply_status(250, "2.0.0 Ok: queued as X", "h", "end of DATA").text == \
        "h said: Ok: queued as X"
    # A wrong-class enhanced code is not trusted; a 3xx where a final reply was due defers.
    assert reply_status(550, "2.0.0 odd", "h", "RCPT TO").enhanced == "5.0.0"
    assert reply_status(354, "go on", "h", "RCPT TO").enhanced.startswith("4.")


def test_smart_hosts_and_dns_servers_parse() -> None:
    assert str(parse_smart_host("Relay.Example.NET")) == "relay.example.net"
    assert str(parse_smart_host("relay.example.net:587")) == "relay.example.net:587"
    assert str(parse_smart_host("10.0.0.1")) == "[10.0.0.1]"
    assert str(parse_smart_host("[10.0.0.1]:2525")) == "[10.0.0.1]:2525"
    assert str(parse_smart_host("[IPv6:2001:db8::1]")) == "[2001:db8::1]"
    for bad in ("", "a b", "relay:0", "relay:70000", "2001:db8::1", "[relay]", "-x.test",
                "[10.0.0.1]x"):
        with pytest.raises(HostError):
            parse_smart_host(bad)
    assert parse_dns_server("127.0.0.1:5353") == HostPort("127.0.0.1", 5353, True)
    assert parse_dns_server("::1") == HostPort("::1", None, True)
    assert parse_dns_server("[::1]:53") == HostPort("::1", 53, True)
    for bad in ("ns.example", "1.2.3", "127.0.0.1:x", "[::1]x"):
        with pytest.raises(HostError):
            parse_dns_server(bad)


# -- MX lookup against a real DNS server --------------------------------------------------

async def test_mx_targets_preference_implicit_mx_null_mx_and_failures() -> None:
    """MX hosts in preference order (a host without address skipped), the domain itself
    when it has no MX (implicit MX), null MX → 5.1.10, NXDOMAIN → 5.4.4, SERVFAIL → a
    temporary failure; smart hosts by their addresses, an IP as is."""
    zone = {"multi.test": [("MX", "20 second.multi.test."), ("MX", "10 first.multi.test."),
                           ("MX", "5 ghost.multi.test.")],
            "first.multi.test": [("A", "192.0.2.1")],
            "second.multi.test": [("A", "192.0.2.2"), ("AAAA", "2001:db8::2")],
            "plain.test": [("A", "192.0.2.9")],
            "nomail.test": [("MX", "0 .")],
            "relay.test": [("A", "192.0.2.7")]}
    with DnsServer(zone, servfail=("broken.test",)) as server:
        r = resolver(server)
        found = await mx_targets(r, "multi.test", 25)
        assert [str(t) for t in found] == ["first.multi.test[192.0.2.1]:25",
                                           "second.multi.test[192.0.2.2]:25",
                                           "second.multi.test[2001:db8::2]:25"]
        assert await mx_targets(r, "plain.test", 2525) == [Target("plain.test", "192.0.2.9",
                                                                  2525)]
        with pytest.raises(Unroutable) as null_mx:
            await mx_targets(r, "nomail.test", 25)
        assert null_mx.value.status.enhanced == "5.1.10"
        with pytest.raises(Unroutable) as nx:
            await mx_targets(r, "missing.test", 25)
        assert nx.value.status.enhanced == "5.4.4" and "missing.test" in str(nx.value)
        with pytest.raises(DnsTemporary, match="broken.test"):
            await mx_targets(r, "broken.test", 25)
        assert await mx_targets(r, "[192.0.2.3]", 25) == [Target("192.0.2.3", "192.0.2.3",
                                                                 25)]
        hosts = await host_targets(r, ["relay.test:587", "[192.0.2.8]"], 25)
        assert [str(t) for t in hosts] == ["relay.test[192.0.2.7]:587", "[192.0.2.8]:25"]
        with pytest.raises(DnsTemporary, match="no smart host"):
            await host_targets(r, ["missing.test"], 25)


async def test_dns_answers_are_kept_for_their_ttl() -> None:
    """The resolver asks once for an MX, an address or a missing domain within the
    answers' TTL (60 s from the test server); a SERVFAIL is asked again."""
    zone = {"fabrikam.test": [("MX", "10 mx.fabrikam.test.")],
            "mx.fabrikam.test": [("A", "192.0.2.1")]}
    with DnsServer(zone, servfail=("broken.test",)) as server:
        r = resolver(server)
        for _ in range(3):
            assert [str(t) for t in await mx_targets(r, "fabrikam.test", 25)] == [
                "mx.fabrikam.test[192.0.2.1]:25"]
            with pytest.raises(Unroutable):
                await mx_targets(r, "missing.test", 25)
            with pytest.raises(DnsTemporary):
                await mx_targets(r, "broken.test", 25)
        asked = server.queries
        assert asked.count(("fabrikam.test", "MX")) == 1
        assert asked.count(("mx.fabrikam.test", "A")) == 1
        assert asked.count(("missing.test", "MX")) == 1
        assert asked.count(("broken.test", "MX")) >= 3


# -- the client on its own ------------------------------------------------------------------

def chunked(content: bytes, step: int) -> Any:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(content), step):
            yield content[i:i + step]
    return chunks


async def test_client_streams_smuggling_content_cleanly_to_a_raw_peer() -> None:
    """T18 (outbound smuggling, on the wire): stored bytes with every §2.1 sequence (as a
    message received by another path might hold them) reach a raw-capturing server with no
    bare CR or LF and no lone "." line except the terminator, in one transaction each."""
    content = (b"Subject: smuggle\r\n\r\n" + b"x".join(SMUGGLING) + b"end")
    with RawPeer() as peer:
        client = SmtpClient([Target("127.0.0.1", "127.0.0.1", peer.port)],
                            ClientPolicy("mailgate.test", tls="none", timeout=10))
        try:
            for step in (1, 7, len(content)):
                sent = await client.send(OutMessage(
                    ALICE, (OutRecipient(1, "bob@fabrikam.test"),), len(content),
                    chunked(content, step)))
                assert sent.results[1].outcome == "delivered", sent.results
        finally:
            await client.close()
    assert len(peer.data) == 3
    for data in peer.data:
        assert_clean_wire(data)
        assert unstuff(data) == normalised(content)
    mails = [c for c in peer.commands if c.upper().startswith(b"MAIL")]
    assert len(mails) == 3 and not any(b"smuggled" in c for c in peer.commands)
    assert sum(c.upper().startswith(b"RSET") for c in peer.commands) == 2   # reused


async def test_a_large_message_is_streamed_not_held_in_memory() -> None:
    """50 MB to smtp-sink in 1 MiB chunks: Python's allocations peak at a few chunks."""
    chunk = (b"0123456789abcdef" * 64 + b"\n") * 1000          # ~1 MiB, LF line ends
    count = 50

    async def chunks() -> AsyncIterator[bytes]:
        yield b"Subject: big\r\n\r\n"
        for _ in range(count):
            yield chunk

    size = len(chunk) * count
    with SmtpSink() as sink:
        client = SmtpClient([Target("127.0.0.1", "127.0.0.1", sink.port)],
                            ClientPolicy("mailgate.test", tls="none", timeout=60))
        tracemalloc.start()
        try:
            started = time.monotonic()
            sent = await client.send(OutMessage(ALICE, (OutRecipient(1, "bob@fabrikam.test"),),
                                                size, chunks))
            elapsed = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            await client.close()
    assert sent.results[1].outcome == "delivered", sent.results
    print(f"\n50 MB sent in {elapsed:.2f} s, Python allocation peak {peak / 2**20:.1f} MiB")
    assert peak < 8 * 2**20


async def test_client_tries_the_next_target_and_reports_every_one() -> None:
    """A refused connection and a server that greets with 554 count as failed hosts; the
    next target is used; when none is left, NoConnection names each with its reason."""
    dead = free_port()
    with AiosmtpdPeer() as peer:
        client = SmtpClient([Target("mx1.test", "127.0.0.1", dead),
                             Target("mx2.test", "127.0.0.1", peer.port)],
                            ClientPolicy("mailgate.test", tls="none", timeout=10))
        try:
            sent = await client.send(OutMessage(ALICE, (OutRecipient(1, "bob@fabrikam.test"),),
                                                10, chunked(b"Subject: x\r\n\r\nx\r\n", 5)))
        finally:
            await client.close()
        assert sent.target.host == "mx2.test" and sent.results[1].outcome == "delivered"
    client = SmtpClient([Target("mx1.test", "127.0.0.1", dead)],
                        ClientPolicy("mailgate.test", tls="none", timeout=10))
    with pytest.raises(NoConnection) as exc:
        await client.send(OutMessage(ALICE, (OutRecipient(1, "bob@fabrikam.test"),), 10,
                                     chunked(b"x", 1)))
    assert exc.value.last_error.startswith("451 4.4.1 ")
    assert f"mx1.test[127.0.0.1]:{dead}: Connection refused" in exc.value.last_error


# -- through the node ---------------------------------------------------------------------

def test_per_recipient_results_deliver_ndr_and_retry(demo_env: MailgateEnv,
                                                     dns: DnsServer) -> None:
    """A message from Pickup to three recipients at fabrikam.test, routed through DNS MX to
    an aiosmtpd next hop that refuses one RCPT with 550 and defers another with 450: one
    is delivered (SEND event, source SMTP, with the remote host), the sender gets one NDR
    for the refused one (its 5.1.1, the next hop as Remote-MTA), the deferred one waits in
    the DnsConnectorDelivery queue in Retry (DEFER event) and only it is tried again."""
    env = demo_env
    with AiosmtpdPeer(rcpt_replies={"no@fabrikam.test": "550 5.1.1 no such user here",
                                    "later@fabrikam.test": "450 4.2.1 mailbox busy"}) as peer:
        internet(env, peer.port)
        node = NodeThread(env, resolver=resolver(dns))
        try:
            pickup(env, "a.eml", "bob@fabrikam.test, no@fabrikam.test, later@fabrikam.test",
                   "three")
            wait_for(lambda: peer.messages, what="the delivery")
            [ndr] = cast(list[EmailMessage], wait_for(lambda: reports(env), what="the NDR"))
            [block] = recipient_blocks(ndr)
            assert block["Final-Recipient"] == "rfc822; no@fabrikam.test"
            assert block["Status"] == "5.1.1" and block["Action"] == "failed"
            assert block["Remote-MTA"] == "dns; mx.fabrikam.test"
            assert "no such user here" in block["Diagnostic-Code"]
            [m] = wait_for(lambda: [x for x in messages(env) if x["Status"] == "Retry"],
                           what="the deferred recipient")  # type: ignore[misc]
            assert {r["Address"]: r["Status"] for r in m["Recipients"]} == {
                "bob@fabrikam.test": "Delivered", "no@fabrikam.test": "Failed",
                "later@fabrikam.test": "Retry"}
            assert "450 4.2.1 mx.fabrikam.test[127.0.0.1]" in m["LastError"]
            [q] = [q for q in json.loads(env.cli("queue", "get", "--json").stdout)
                   if q["DeliveryType"] == "DnsConnectorDelivery"]
            assert q["NextHopDomain"] == "fabrikam.test"
        finally:
            node.stop()
    assert peer.messages[0].rcpt_tos == ["bob@fabrikam.test"]
    assert b"Subject: three" in peer.messages[0].data
    [send] = events(env, "--event-id", "SEND")
    assert send["Source"] == "SMTP" and send["ConnectorId"] == "Internet"
    assert send["Recipients"] == ["bob@fabrikam.test"]
    assert send["ServerHostname"] == "mx.fabrikam.test"
    assert send["SourceContext"] == f"mx.fabrikam.test[127.0.0.1]:{peer.port}"
    assert send["RecipientStatus"][0].startswith("250 2.0.0 ")
    [defer] = events(env, "--event-id", "DEFER", "--source", "SMTP")
    assert defer["Recipients"] == ["later@fabrikam.test"]
    [fail] = events(env, "--event-id", "FAIL", "--source", "SMTP")
    assert fail["Recipients"] == ["no@fabrikam.test"]


def test_smtputf8_message_to_a_peer_without_smtputf8_gets_an_ndr(demo_env: MailgateEnv,
                                                                  dns: DnsServer) -> None:
    """A non-ASCII recipient needs SMTPUTF8: a next hop that does not offer it is not sent
    the message (no MAIL at all); the sender gets an NDR 5.6.7. Once it offers SMTPUTF8,
    the message goes with MAIL FROM ... SMTPUTF8 and the UTF-8 address as is."""
    env = demo_env
    node = NodeThread(env, resolver=resolver(dns))
    try:
        with AiosmtpdPeer(smtputf8=False) as old:
            internet(env, old.port)
            time.sleep(0.6)
            pickup(env, "u.eml", "jösé@fabrikam.test", "utf8")
            [ndr] = cast(list[EmailMessage], wait_for(lambda: reports(env), what="the NDR"))
            [block] = recipient_blocks(ndr)
            assert block["Status"] == "5.6.7"
            assert "SMTPUTF8" in block["Diagnostic-Code"]
            assert old.messages == [] and old.rcpt_attempts == []
        with AiosmtpdPeer(smtputf8=True) as new:
            env.cli("send-connector", "set", "Internet", "--port", str(new.port))
            time.sleep(0.6)
            pickup(env, "u2.eml", "jösé@fabrikam.test", "utf8 again")
            wait_for(lambda: new.messages, what="the delivery")
            assert new.messages[0].rcpt_tos == ["jösé@fabrikam.test"]
            assert "SMTPUTF8" in new.messages[0].mail_line.split()
    finally:
        node.stop()


def test_dsn_parameters_go_to_a_dsn_capable_next_hop(demo_env: MailgateEnv,
                                                     dns: DnsServer) -> None:
    """A Replay file with RET, ENVID, NOTIFY and ORCPT: a next hop that offers DSN gets
    them on MAIL FROM and RCPT TO (ENVID as xtext), and mailgate sends no DSN itself."""
    env = demo_env
    with AiosmtpdPeer(dsn=True) as peer:
        internet(env, peer.port)
        node = NodeThread(env, resolver=resolver(dns))
        try:
            replay(env, "d.eml",
                   f"X-Sender: <{ALICE}> RET=HDRS ENVID=env+2B42\r\n"
                   "X-Receiver: <bob@fabrikam.test> NOTIFY=SUCCESS,FAILURE "
                   "ORCPT=rfc822;bob@fabrikam.test\r\n", "with dsn")
            wait_for(lambda: peer.messages, what="the delivery")
            time.sleep(1.0)
        finally:
            node.stop()
    mail = peer.messages[0].mail_line.split()
    assert "RET=HDRS" in mail and "ENVID=env+2B42" in mail
    rcpt = peer.messages[0].rcpt_lines[0].split()
    assert "NOTIFY=SUCCESS,FAILURE" in rcpt and "ORCPT=rfc822;bob@fabrikam.test" in rcpt
    assert reports(env) == []


def test_relayed_dsn_when_the_next_hop_lacks_dsn(demo_env: MailgateEnv,
                                                  dns: DnsServer) -> None:
    """The same message to a next hop without DSN: no DSN parameters are sent, and the
    sender, who asked for NOTIFY=SUCCESS, gets a DSN with Action: relayed (RFC 3461
    §4.1) naming the next hop."""
    env = demo_env
    with AiosmtpdPeer(dsn=False) as peer:
        internet(env, peer.port)
        node = NodeThread(env, resolver=resolver(dns))
        try:
            replay(env, "r.eml",
                   f"X-Sender: <{ALICE}> RET=HDRS ENVID=env42\r\n"
                   "X-Receiver: <bob@fabrikam.test> NOTIFY=SUCCESS\r\n", "relay me")
            [dsn] = cast(list[EmailMessage], wait_for(lambda: reports(env), what="the DSN"))
        finally:
            node.stop()
    assert "RET=" not in peer.messages[0].mail_line
    assert "NOTIFY=" not in " ".join(peer.messages[0].rcpt_lines)
    [block] = recipient_blocks(dsn)
    assert block["Action"] == "relayed" and block["Status"] == "2.0.0"
    assert "mx.fabrikam.test" in block["Diagnostic-Code"]
    assert dsn["Subject"] == "Relayed: relay me"


def test_dead_next_hop_retries_then_reuses_one_connection(demo_env: MailgateEnv,
                                                          dns: DnsServer) -> None:
    """Nothing listens at the MX host: the queue goes to Retry with a LastError naming the
    host and the reason, and the messages wait. When the next hop is back and the queue is
    retried, the four messages go over one connection (one EHLO); with
    SmtpMaxMessagesPerConnection 2, over two."""
    env = demo_env
    port = free_port()
    internet(env, port)
    node = NodeThread(env, resolver=resolver(dns))
    try:
        for i in range(4):
            pickup(env, f"m{i}.eml", f"bob{i}@fabrikam.test", f"m{i}")

        def retry_queue() -> dict[str, Any] | None:
            found = [q for q in json.loads(env.cli("queue", "get", "--json").stdout)
                     if q["DeliveryType"] == "DnsConnectorDelivery"]
            return found[0] if found and found[0]["Status"] == "Retry" \
                and found[0]["MessageCount"] == 4 else None
        q = cast(dict[str, Any], wait_for(retry_queue, what="the queue in Retry"))
        assert f"mx.fabrikam.test[127.0.0.1]:{port}: Connection refused" in q["LastError"]
        assert q["LastError"].startswith("451 4.4.1 ")
        assert len(events(env, "--event-id", "DEFER", "--source", "SMTP")) >= 4
        with AiosmtpdPeer() as peer:
            env.cli("send-connector", "set", "Internet", "--port", str(peer.port))
            wait_for(lambda: len(peer.messages) == 4, what="the four messages")
        assert len(peer.ehlos) == 1
        with AiosmtpdPeer() as peer2:
            env.cli("send-connector", "set", "Internet", "--port", "1",   # down again
                    "--smtp-max-messages-per-connection", "2")
            for i in range(4, 8):
                pickup(env, f"m{i}.eml", f"bob{i}@fabrikam.test", f"m{i}")
            wait_for(retry_queue, what="the queue in Retry again")
            env.cli("send-connector", "set", "Internet", "--port", str(peer2.port))
            wait_for(lambda: len(peer2.messages) == 4, what="the next four")
        assert len(peer2.ehlos) == 2
    finally:
        node.stop()


def test_tls_and_basic_auth_at_a_smart_host(demo_env: MailgateEnv, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A smart-host connector with BasicAuthRequireTLS: STARTTLS, then AUTH with the user
    and the password from the node's environment variable, then the message; a wrong
    password puts the queue in Retry with the server's 535; `--tls required` to a host
    without STARTTLS too, and nothing is sent."""
    env = demo_env
    monkeypatch.setenv("MAILGATE_TEST_RELAY_PW", "s3cret")
    ctx = self_signed_context(tmp_path)
    with AiosmtpdPeer(tls_context=ctx, login=("relayuser", "s3cret")) as peer, \
            AiosmtpdPeer() as plain:
        env.cli("send-connector", "new", "--name", "Relay", "--address-spaces", "*",
                "--smart-hosts", f"[127.0.0.1]:{peer.port}", "--tls", "opportunistic",
                "--smart-host-auth-mechanism", "BasicAuthRequireTLS",
                "--auth-user", "relayuser", "--auth-password-env", "MAILGATE_TEST_RELAY_PW")
        node = NodeThread(env)
        try:
            pickup(env, "t.eml", "bob@fabrikam.test", "over tls")
            wait_for(lambda: peer.messages, what="the delivery")
            assert peer.messages[0].tls and peer.logins == [("relayuser", True)]
            [q] = [q for q in json.loads(env.cli("queue", "get", "--json").stdout)
                   if q["DeliveryType"] == "SmartHostConnectorDelivery"]
            assert q["NextHopDomain"] == f"[127.0.0.1]:{peer.port}"

            monkeypatch.setenv("MAILGATE_TEST_RELAY_PW", "wrong")
            pickup(env, "t2.eml", "carol@fabrikam.test", "bad password")

            def in_retry(text: str) -> str | None:
                found = [q["LastError"] for q in
                         json.loads(env.cli("queue", "get", "--json").stdout)
                         if q["DeliveryType"] == "SmartHostConnectorDelivery"
                         and q["Status"] == "Retry" and text in (q["LastError"] or "")]
                return found[0] if found else None
            error = cast(str, wait_for(lambda: in_retry("authentication"),
                                       what="Retry after the failed AUTH"))
            assert "authentication as relayuser failed: 535" in error
            assert len(peer.messages) == 1

            env.cli("send-connector", "set", "Relay", "--smart-hosts",
                    f"[127.0.0.1]:{plain.port}", "--tls", "required",
                    "--smart-host-auth-mechanism", "None")
            pickup(env, "t3.eml", "dave@fabrikam.test", "tls required")
            error = cast(str, wait_for(lambda: in_retry("STARTTLS"), what="Retry for TLS"))
            assert "TLS is required, but the host does not offer STARTTLS" in error
            assert plain.messages == []
        finally:
            node.stop()


def test_null_mx_and_missing_domain_fail_with_an_ndr(demo_env: MailgateEnv) -> None:
    """RFC 7505: a domain whose only MX is "0 ." gets an NDR 5.1.10 without any connection;
    a domain that does not exist, 5.4.4."""
    env = demo_env
    with DnsServer({"nomail.test": [("MX", "0 .")]}) as server:
        internet(env, 25)
        node = NodeThread(env, resolver=resolver(server))
        try:
            pickup(env, "n.eml", "bob@nomail.test, carol@gone.test", "nowhere")
            found = cast(list[EmailMessage],
                         wait_for(lambda: len(reports(env)) == 2 and reports(env),
                                  what="the NDRs"))
        finally:
            node.stop()
    statuses = sorted(recipient_blocks(m)[0]["Status"] for m in found)
    assert statuses == ["5.1.10", "5.4.4"]



# -- TlsAuthLevel: what is checked of a next hop's certificate -----------------------------

async def send_via(target: Target, policy: ClientPolicy) -> Any:
    client = SmtpClient([target], policy)
    try:
        return await client.send(OutMessage(ALICE, (OutRecipient(1, "bob@fabrikam.test"),), 10,
                                            chunked(b"Subject: x\r\n\r\nx\r\n", 5)))
    finally:
        await client.close()


def tls_policy(level: str, ca_file: Path | None = None, domain: str | None = None
               ) -> ClientPolicy:
    return ClientPolicy("mailgate.test", tls="required", tls_auth_level=level,
                        tls_ca_file=str(ca_file) if ca_file else None, tls_domain=domain,
                        timeout=10)


async def test_certificate_validation_needs_a_chain_to_a_trusted_ca(tmp_path: Path) -> None:
    """CertificateValidation: a certificate issued by the TlsCaFile's CA is taken; a
    self-signed one, or the same CA-issued one without that CA file (the system's store
    does not know the test CA), fails the host with 4.7.5 and nothing is sent."""
    signed, ca = certificate_context(tmp_path, "mx.fabrikam.test", signed_by_ca=True)
    assert ca is not None
    with AiosmtpdPeer(tls_context=signed) as good, \
            AiosmtpdPeer(tls_context=self_signed_context(tmp_path)) as selfsigned:
        sent = await send_via(Target("mx.fabrikam.test", "127.0.0.1", good.port),
                              tls_policy("CertificateValidation", ca))
        assert sent.results[1].outcome == "delivered" and good.messages[0].tls
        for port, ca_file in ((selfsigned.port, ca), (good.port, None)):
            with pytest.raises(NoConnection) as exc:
                await send_via(Target("mx.fabrikam.test", "127.0.0.1", port),
                               tls_policy("CertificateValidation", ca_file))
            assert exc.value.last_error.startswith("451 4.7.5 ")
            assert "certificate verify failed" in exc.value.last_error
        assert len(good.messages) == 1 and selfsigned.messages == []
        # EncryptionOnly (the default) takes the self-signed one.
        sent = await send_via(Target("mx.fabrikam.test", "127.0.0.1", selfsigned.port),
                              tls_policy("EncryptionOnly"))
        assert sent.results[1].outcome == "delivered"


async def test_domain_validation_matches_tls_domain_or_the_host_name(tmp_path: Path) -> None:
    """DomainValidation: the trusted certificate must also name the host connected to (the
    MX or smart host name), or TlsDomain when set (*.domain: any host under it)."""
    signed, ca = certificate_context(tmp_path, "mx.fabrikam.test", signed_by_ca=True)
    with AiosmtpdPeer(tls_context=signed) as peer:
        as_named = Target("mx.fabrikam.test", "127.0.0.1", peer.port)
        as_other = Target("relay.contoso-partner.test", "127.0.0.1", peer.port)
        sent = await send_via(as_named, tls_policy("DomainValidation", ca))
        assert sent.results[1].outcome == "delivered"
        with pytest.raises(NoConnection) as exc:
            await send_via(as_other, tls_policy("DomainValidation", ca))
        assert "451 4.7.5 " in exc.value.last_error
        assert ("the certificate (mx.fabrikam.test) does not match relay.contoso-partner.test"
                in exc.value.last_error)
        sent = await send_via(as_other, tls_policy("DomainValidation", ca, "*.fabrikam.test"))
        assert sent.results[1].outcome == "delivered"
        with pytest.raises(NoConnection):
            await send_via(as_named, tls_policy("DomainValidation", ca, "fabrikam.test"))
        assert len(peer.messages) == 2
