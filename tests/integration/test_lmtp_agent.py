"""The built-in lmtp delivery agent (RFC 2033): messages go to a real, private Dovecot LMTP
server (tests/dovecot.py) and are read back from its Maildirs; what Dovecot cannot be made
to do (a 4xx for one recipient after the data, multi-line replies, DSN, a connection lost
mid-DATA, a server that stops answering) is played by a small scripted LMTP server on
127.0.0.1 that records every command and the exact data bytes. Settings go through the
registry's checks as for a connector, then LmtpAgent.check."""

from __future__ import annotations

import asyncio
import hashlib
import re
import tracemalloc
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailgate.deliver.agents.api import Item, ItemRecipient, NextHop, RecipientResult
from mailgate.deliver.agents.lmtp import (
    LmtpAgent,
    LmtpConnection,
    LmtpUnavailable,
    MessageUnreadable,
)
from mailgate.deliver.agents.registry import (
    AgentError,
    AgentInfo,
    check_settings,
    resolve_settings,
)
from mailgate.deliver.wire import WireData
from tests.agents import deliver_once, outcomes
from tests.dovecot import Dovecot, free_port

INFO = AgentInfo("lmtp", "test", "mailgate (mailgate.deliver.agents.lmtp:LmtpAgent)",
                 LmtpAgent, LmtpAgent.settings)
DOMAIN = "lmtp.test"
BOB, CAROL, NOBODY = f"bob@{DOMAIN}", f"carol@{DOMAIN}", f"nobody@{DOMAIN}"
MESSAGE = (b"From: alice@contoso.test\r\nTo: bob@lmtp.test\r\nSubject: for the mailbox\r\n"
           b"Message-ID: <m1@contoso.test>\r\n\r\nline one\r\ncaf\xc3\xa9 8-bit\r\n"
           b"From the start\r\nlast line\r\n")


def lf(data: bytes) -> bytes:
    """As Dovecot stores it in a Maildir: LF line ends."""
    return data.replace(b"\r\n", b"\n")


def make_item(*addresses: str, content: bytes = MESSAGE, sender: str = "alice@contoso.test",
              step: int = 7, message_id: int = 42, envid: str | None = None,
              dsn: bool = False) -> Item:
    pieces = [content[i:i + step] for i in range(0, len(content), step)]
    return Item(message_id, "<m1@contoso.test>", sender,
                tuple(ItemRecipient(a, "SUCCESS,FAILURE" if dsn else None,
                                    f"rfc822;{a}" if dsn else None) for a in addresses),
                envid, len(content), 1.8e9, lambda: iter(pieces))


def settings_for(**given: str) -> dict[str, Any]:
    """Connector settings as stored (registry check plus the agent's own) and resolved."""
    stored = check_settings(INFO, {k.replace("_", "-"): v for k, v in given.items()})
    LmtpAgent.check(stored)
    return resolve_settings(INFO, stored, {})


async def connect(**given: str) -> LmtpConnection:
    return await LmtpAgent().open_connection(NextHop("Mailbox", DOMAIN, settings_for(**given)))


async def deliver(item: Item, **given: str) -> list[RecipientResult]:
    return await deliver_once(await connect(**given), item)


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    with Dovecot([BOB, CAROL]) as server:
        yield server


# -- against Dovecot ----------------------------------------------------------------------

async def test_two_known_recipients_are_delivered_and_stored(dovecot: Dovecot) -> None:
    """Both recipients are delivered with Dovecot's per-recipient reply as the status text,
    and each Maildir holds the message: Dovecot's Return-Path and Received, then the
    message's own bytes (stored with LF)."""
    results = await deliver(make_item(BOB, CAROL), host=dovecot.address)
    assert outcomes(results) == [(BOB, "delivered", "2.0.0"), (CAROL, "delivered", "2.0.0")]
    assert re.fullmatch(rf"250 2\.0\.0 {dovecot.address} said: <{BOB}> \S+ Saved",
                        results[0].status), results[0].status
    for user in (BOB, CAROL):
        [stored] = dovecot.messages(user)
        assert stored.startswith(b"Return-Path: <alice@contoso.test>\n")
        assert b"\nReceived: from " in stored.split(b"\n\n")[0]
        assert stored.endswith(lf(MESSAGE))


async def test_an_unknown_recipient_fails_and_the_other_is_delivered(dovecot: Dovecot
                                                                     ) -> None:
    """Dovecot refuses a user it does not know at RCPT (550 5.1.1): that recipient fails with
    Dovecot's reply, is not waited for after the data, and the known one is delivered."""
    results = await deliver(make_item(BOB, NOBODY), host=dovecot.address)
    assert outcomes(results) == [(BOB, "delivered", "2.0.0"), (NOBODY, "failed", "5.1.1")]
    assert results[1].status.startswith(f"550 5.1.1 {dovecot.address} said: <{NOBODY}> ")
    assert results[1].status.endswith("(in reply to RCPT TO)")
    assert len(dovecot.messages(BOB)) == 1
    assert not dovecot.maildir(NOBODY).exists()


async def test_lines_starting_with_a_dot_survive(dovecot: Dovecot) -> None:
    """Dot stuffing, with the message in 1-byte chunks (every CR, LF and dot in a chunk of
    its own): lines that are '.', '..' or start with '.' arrive unchanged."""
    content = (b"Subject: dots\r\n\r\n.\r\n..\r\n.hidden\r\n...three\r\n"
               b"middle . dot\r\n.\r\nend\r\n")
    results = await deliver(make_item(BOB, content=content, step=1), host=dovecot.address)
    assert outcomes(results) == [(BOB, "delivered", "2.0.0")]
    [stored] = dovecot.messages(BOB)
    assert stored.endswith(lf(content))


async def test_bare_line_ends_arrive_as_line_breaks(dovecot: Dovecot) -> None:
    """A stored message with bare LF and bare CR line ends, and no line break at the end,
    arrives with each of them a line break, and one added at the end."""
    content = b"Subject: bare\n\nline1\nline2\r\nline3\rline4"
    results = await deliver(make_item(BOB, content=content, step=3), host=dovecot.address)
    assert outcomes(results) == [(BOB, "delivered", "2.0.0")]
    [stored] = dovecot.messages(BOB)
    assert stored.endswith(b"\nSubject: bare\n\nline1\nline2\nline3\nline4\n")


def big_chunks(total: int) -> Iterator[bytes]:
    """A message of `total` bytes in 1 MiB chunks, made as they are asked for; every 50th
    line begins with a dot."""
    yield b"Subject: big\r\n\r\n"
    line = b"x" * 78 + b"\r\n"
    dotted = b"." + b"y" * 77 + b"\r\n"
    block = (line * 49 + dotted) * 210      # 840,000 bytes of whole lines
    sent = 0
    while sent < total:
        piece = block[:total - sent]
        sent += len(piece)
        yield piece


async def test_a_large_message_is_streamed(dovecot: Dovecot) -> None:
    """A 20 MB message is sent chunk by chunk: the agent never holds much of it (traced
    allocations stay far below its size) and Dovecot stores all of it."""
    total = 20 * 1000 * 1000
    expected = hashlib.sha256()
    for chunk in big_chunks(total):
        expected.update(lf(chunk))
    item = Item(7, None, "alice@contoso.test", (ItemRecipient(BOB),), None, total, 1.8e9,
                lambda: big_chunks(total))
    conn = await connect(host=dovecot.address)
    tracemalloc.start()
    try:
        results = await conn.deliver(item)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await conn.close()
    assert outcomes(results) == [(BOB, "delivered", "2.0.0")]
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes"
    [stored] = dovecot.messages(BOB)
    body = stored[stored.index(b"\nSubject: big\n") + 1:]
    assert hashlib.sha256(body).hexdigest() == expected.hexdigest()


async def test_several_items_share_one_connection(dovecot: Dovecot) -> None:
    """Three items on one connection (RSET between them) arrive in order, as three
    transactions of one Dovecot LMTP session (its log names them <session>, :T2, :T3)."""
    offset = len(dovecot.log_text())
    conn = await connect(host=dovecot.address)
    try:
        for n in range(3):
            content = f"Subject: item {n}\r\n\r\nbody {n}\r\n".encode()
            results = await conn.deliver(make_item(BOB, content=content, message_id=n))
            assert outcomes(results) == [(BOB, "delivered", "2.0.0")]
    finally:
        await conn.close()
    stored = dovecot.messages(BOB)
    assert [s.split(b"\n\n", 1)[1] for s in stored] == [b"body 0\n", b"body 1\n", b"body 2\n"]
    log = dovecot.log_text()[offset:]
    sessions = re.findall(r"<\d+><([^>:]+)(?::T\d+)?>: Info: .*saved mail", log)
    assert len(sessions) == 3 and len(set(sessions)) == 1, log


async def test_delivery_over_the_unix_socket(dovecot: Dovecot) -> None:
    """`socket` instead of `host`: Dovecot's own LMTP socket; texts name it unix:/path."""
    results = await deliver(make_item(CAROL), socket=str(dovecot.socket_path),
                            lhlo="mailgate.contoso.test")
    assert outcomes(results) == [(CAROL, "delivered", "2.0.0")]
    assert f" unix:{dovecot.socket_path} said: " in results[0].status
    assert len(dovecot.messages(CAROL)) == 1


async def test_connection_refused_at_open_raises() -> None:
    """Nothing listening: open_connection raises with the reason (the queue goes to
    Retry with it)."""
    port = free_port()
    with pytest.raises(LmtpUnavailable) as exc:
        await connect(host=f"127.0.0.1:{port}")
    assert str(exc.value) == f"cannot connect to 127.0.0.1:{port}: Connection refused"


# -- against a scripted LMTP server -------------------------------------------------------

def ok(address: str) -> bytes:
    return f"250 2.0.0 <{address}> saved\r\n".encode()


@dataclass
class Script:
    """What the scripted server answers, and what it saw."""

    greeting: bytes = b"220 fake.test LMTP ready\r\n"
    lhlo: bytes = b"250-fake.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
    mail: bytes = b"250 2.1.0 OK\r\n"
    rcpt: Callable[[str], bytes] = lambda address: b"250 2.1.5 OK\r\n"
    data: bytes = b"354 send it\r\n"
    after_data: Callable[[str], bytes] = ok
    drop_in_data: int | None = None     # close the connection after this many data bytes
    stall_after_data: bool = False      # never answer after the data
    rcpt_delay: float = 0.0             # seconds before each reply to RCPT
    close_idle: bool = False            # close the connection after each transaction
    port: int = 0
    connections: int = 0
    commands: list[str] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)   # complete DATA, as sent
    partial: list[bytes] = field(default_factory=list)    # DATA cut off by the client

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def _session(s: Script, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
    s.connections += 1
    writer.write(s.greeting)
    accepted: list[str] = []
    while line := await reader.readline():
        command = line.decode("ascii").rstrip("\r\n")
        s.commands.append(command)
        verb = command.split(" ")[0].upper()
        if verb == "LHLO":
            writer.write(s.lhlo)
        elif command.upper().startswith("MAIL FROM:"):
            accepted = []
            writer.write(s.mail)
        elif command.upper().startswith("RCPT TO:"):
            address = command[command.index("<") + 1:command.index(">")]
            await asyncio.sleep(s.rcpt_delay)
            reply = s.rcpt(address)
            if reply.startswith(b"2"):
                accepted.append(address)
            writer.write(reply)
        elif verb == "DATA" and not accepted:
            writer.write(b"503 5.5.1 no valid recipients\r\n")
        elif verb == "DATA":
            writer.write(s.data)
            if not s.data.startswith(b"354"):
                continue
            await writer.drain()
            data = b""
            while not data.endswith(b"\r\n.\r\n") and data != b".\r\n":
                piece = await reader.readline()
                if not piece:
                    s.partial.append(data)
                    return
                data += piece
                if s.drop_in_data is not None and len(data) >= s.drop_in_data:
                    s.partial.append(data)
                    writer.transport.abort()
                    return
            s.messages.append(data)
            if s.stall_after_data:
                await asyncio.sleep(3600)
            writer.write(b"".join(s.after_data(a) for a in accepted))
            if s.close_idle:
                await writer.drain()
                return
        elif verb == "RSET":
            writer.write(b"250 2.0.0 OK\r\n")
        elif verb == "QUIT":
            writer.write(b"221 2.0.0 bye\r\n")
            await writer.drain()
            return
        else:
            writer.write(b"500 5.5.1 unknown command\r\n")
        await writer.drain()


@pytest.fixture
async def fake() -> AsyncIterator[Script]:
    script = Script()
    tasks: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await _session(script, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    script.port = server.sockets[0].getsockname()[1]
    try:
        yield script
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def test_per_recipient_replies_after_the_data(fake: Script) -> None:
    """LMTP's point: one reply per accepted recipient after the data. 250, a multi-line
    451 4.2.1 and a 552 5.2.2 give delivered, deferred and failed, with the server's codes
    and its reply text as one line."""
    replies = {"a@x.test": ok("a@x.test"),
               "b@x.test": b"451-4.2.1 <b@x.test> mailbox busy,\r\n451 4.2.1 try later\r\n",
               "c@x.test": b"552 5.2.2 <c@x.test> over quota\r\n"}
    fake.after_data = lambda address: replies[address]
    results = await deliver(make_item("a@x.test", "b@x.test", "c@x.test"), host=fake.address)
    assert outcomes(results) == [("a@x.test", "delivered", "2.0.0"),
                                 ("b@x.test", "deferred", "4.2.1"),
                                 ("c@x.test", "failed", "5.2.2")]
    assert results[1].status == (f"451 4.2.1 {fake.address} said: <b@x.test> mailbox busy, "
                                 f"try later (in reply to end of data)")
    assert results[2].status.startswith("552 5.2.2 ")


async def test_the_session_on_the_wire(fake: Script) -> None:
    """Greeting and LHLO (multi-line), then per item MAIL, RCPT per recipient, DATA, the
    data; RSET before the second item, a refused RCPT's recipient is not waited for, an
    item with no recipient accepted sends no DATA, QUIT at close."""
    fake.greeting = b"220-fake.test\r\n220 ready\r\n"
    fake.rcpt = lambda a: (b"550-5.1.1 no such user\r\n550 5.1.1 here\r\n" if "no" in a
                           else b"250 2.1.5 OK\r\n")
    conn = await connect(host=fake.address, lhlo="relay.contoso.test")
    try:
        first = await conn.deliver(make_item("yes@x.test", "no@x.test"))
        second = await conn.deliver(make_item("no@x.test", "nope@x.test"))
        third = await conn.deliver(make_item("yes@x.test"))
    finally:
        await conn.close()
    assert outcomes(first) == [("yes@x.test", "delivered", "2.0.0"),
                               ("no@x.test", "failed", "5.1.1")]
    assert first[1].status == (f"550 5.1.1 {fake.address} said: no such user here "
                               f"(in reply to RCPT TO)")
    assert outcomes(second) == [("no@x.test", "failed", "5.1.1"),
                                ("nope@x.test", "failed", "5.1.1")]
    assert outcomes(third) == [("yes@x.test", "delivered", "2.0.0")]
    assert fake.commands == [
        "LHLO relay.contoso.test",
        "MAIL FROM:<alice@contoso.test>", "RCPT TO:<yes@x.test>", "RCPT TO:<no@x.test>",
        "DATA",
        "RSET", "MAIL FROM:<alice@contoso.test>", "RCPT TO:<no@x.test>",
        "RCPT TO:<nope@x.test>",
        "RSET", "MAIL FROM:<alice@contoso.test>", "RCPT TO:<yes@x.test>", "DATA",
        "QUIT"]
    assert fake.messages == [MESSAGE + b".\r\n"] * 2
    assert fake.connections == 1


async def test_size_and_dsn_parameters_only_when_advertised(fake: Script) -> None:
    """SIZE= goes with MAIL FROM only if LHLO advertised SIZE; ENVID= (xtext), NOTIFY= and
    ORCPT= only if it advertised DSN; the null sender is <>."""
    item = make_item("a@x.test", envid="id 1+x", dsn=True, sender="")
    await deliver(item, host=fake.address)
    assert fake.commands[1:3] == ["MAIL FROM:<>", "RCPT TO:<a@x.test>"]
    fake.commands.clear()
    fake.lhlo = b"250-fake.test\r\n250-SIZE 100000000\r\n250-DSN\r\n250 8BITMIME\r\n"
    await deliver(item, host=fake.address)
    assert fake.commands[1:3] == [
        f"MAIL FROM:<> SIZE={len(MESSAGE)} ENVID=id+201+2Bx",
        "RCPT TO:<a@x.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@x.test"]


async def test_the_data_on_the_wire_has_crlf_and_dot_stuffing(fake: Script) -> None:
    """The exact DATA bytes: bare LF and bare CR become CRLF (also when a CRLF is cut
    between chunks), lines starting with '.' get another, a final CRLF is added."""
    content = b"Subject: x\n\na\nb\r\nc\rd\r\n.e\n..f\r.\r\n.\r\n\nend"
    for step in (1, 2, 3, len(content)):
        fake.messages.clear()
        await deliver(make_item("a@x.test", content=content, step=step), host=fake.address)
        assert fake.messages == [b"Subject: x\r\n\r\na\r\nb\r\nc\r\nd\r\n..e\r\n...f\r\n"
                                 b"..\r\n..\r\n\r\nend\r\n.\r\n"], step


async def test_mail_from_refused_decides_for_every_recipient(fake: Script) -> None:
    """A 4xx (or 5xx) to MAIL FROM is every recipient's outcome; nothing more is sent."""
    fake.mail = b"452 4.3.1 insufficient system storage\r\n"
    results = await deliver(make_item("a@x.test", "b@x.test"), host=fake.address)
    assert outcomes(results) == [("a@x.test", "deferred", "4.3.1"),
                                 ("b@x.test", "deferred", "4.3.1")]
    assert results[0].status == (f"452 4.3.1 {fake.address} said: insufficient system "
                                 f"storage (in reply to MAIL FROM)")
    assert fake.commands[1:] == ["MAIL FROM:<alice@contoso.test>", "QUIT"]


async def test_a_reply_without_enhanced_code_gets_x00(fake: Script) -> None:
    """No enhanced status code (or one of another class) in the reply: X.0.0."""
    fake.rcpt = lambda a: b"554 no way\r\n" if a == "b@x.test" else b"250 ok\r\n"
    fake.after_data = lambda a: b"450 2.0.0 odd\r\n"
    results = await deliver(make_item("a@x.test", "b@x.test"), host=fake.address)
    assert [r.status for r in results] == [
        f"450 4.0.0 {fake.address} said: 2.0.0 odd (in reply to end of data)",
        f"554 5.0.0 {fake.address} said: no way (in reply to RCPT TO)"]


async def test_connection_lost_mid_data_defers_and_the_next_item_reconnects(fake: Script
                                                                            ) -> None:
    """The server drops the connection in the middle of the data: every accepted
    recipient is deferred 4.4.2 (a refused one keeps its failure); the next item on the
    same session connects again and is delivered."""
    fake.rcpt = lambda a: b"550 5.1.1 unknown\r\n" if a == "x@x.test" else b"250 OK\r\n"
    fake.drop_in_data = 10
    conn = await connect(host=fake.address)
    try:
        lost = await conn.deliver(make_item("a@x.test", "x@x.test", "b@x.test"))
        fake.drop_in_data = None
        again = await conn.deliver(make_item("a@x.test"))
    finally:
        await conn.close()
    assert outcomes(lost) == [("a@x.test", "deferred", "4.4.2"),
                              ("x@x.test", "failed", "5.1.1"),
                              ("b@x.test", "deferred", "4.4.2")]
    assert re.fullmatch(rf"451 4\.4\.2 ({fake.address} closed the connection|connection to "
                        rf"{fake.address} lost: .+)", lost[0].status), lost[0].status
    assert outcomes(again) == [("a@x.test", "delivered", "2.0.0")]
    assert fake.connections == 2


async def test_a_connection_closed_while_idle_is_opened_again(fake: Script) -> None:
    """The server closes the connection after each transaction: the RSET of the next
    item finds it closed, and the item goes over a new connection."""
    fake.close_idle = True
    conn = await connect(host=fake.address)
    try:
        for _ in range(3):
            assert outcomes(await conn.deliver(make_item("a@x.test"))) == [
                ("a@x.test", "delivered", "2.0.0")]
    finally:
        await conn.close()
    assert fake.connections == 3


async def test_no_reply_within_the_timeout_defers(fake: Script) -> None:
    """The server takes the data and never answers: after `timeout` every recipient is
    deferred 4.4.2."""
    fake.stall_after_data = True
    results = await deliver(make_item("a@x.test", "b@x.test"), host=fake.address, timeout="1")
    assert outcomes(results) == [("a@x.test", "deferred", "4.4.2"),
                                 ("b@x.test", "deferred", "4.4.2")]
    assert results[0].status == f"451 4.4.2 {fake.address} did not answer within 1 s"


async def test_a_server_slow_at_every_step_is_cut_at_timeout_for_the_message(
        fake: Script) -> None:
    """Each reply is in time, but the message as a whole is not: `timeout` also bounds one
    message, so the agent gives its own reason before the node's item limit (`timeout`
    plus a grace) would cut it short; recipients without an outcome are deferred 4.4.2."""
    fake.rcpt_delay = 0.8
    started = asyncio.get_running_loop().time()
    results = await deliver(make_item("a@x.test", "b@x.test", "c@x.test", "d@x.test"),
                            host=fake.address, timeout="2")
    assert asyncio.get_running_loop().time() - started < 3
    assert outcomes(results) == [(a, "deferred", "4.4.2") for a in
                                 ("a@x.test", "b@x.test", "c@x.test", "d@x.test")]
    assert results[0].status == (f"451 4.4.2 {fake.address} did not answer within the 2 s "
                                 f"allowed for the whole message")


async def test_reconnecting_fails_defers_the_rest_of_the_session(fake: Script) -> None:
    """After the connection was lost, a next item whose reconnect fails is deferred 4.4.1
    with the reason, as is every later item, without trying again."""
    fake.drop_in_data = 10
    conn = await connect(host=fake.address)
    try:
        await conn.deliver(make_item("a@x.test"))
        fake.greeting = b"421 4.3.2 shutting down\r\n"
        second = await conn.deliver(make_item("a@x.test"))
        third = await conn.deliver(make_item("b@x.test"))
    finally:
        await conn.close()
    assert second[0].status == (f"451 4.4.1 {fake.address} refused the session: 421 4.3.2 "
                                f"shutting down")
    assert outcomes(third) == [("b@x.test", "deferred", "4.4.1")]
    assert fake.connections == 2


async def test_a_refused_greeting_or_lhlo_raises_at_open(fake: Script) -> None:
    fake.greeting = b"554 5.3.2 not now\r\n"
    with pytest.raises(LmtpUnavailable, match=r"refused the session: 554 5\.3\.2 not now"):
        await connect(host=fake.address)
    fake.greeting = b"220 ok\r\n"
    fake.lhlo = b"500 5.5.1 what\r\n"
    with pytest.raises(LmtpUnavailable, match=r"refused LHLO: 500 5\.5\.1 what"):
        await connect(host=fake.address)


async def test_a_bad_reply_is_a_protocol_error(fake: Script) -> None:
    """A reply line that is not `ddd[ -]text` defers 4.5.0 and drops the connection; text
    from the server is printable ASCII in the status."""
    fake.rcpt = lambda a: b"hello\x07 \xff there\r\n"
    results = await deliver(make_item("a@x.test"), host=fake.address)
    assert results[0].status == (f"451 4.5.0 {fake.address} sent a line that is not a "
                                 f"valid reply: hello_ _ there")


async def test_an_unreadable_message_raises_and_the_data_is_not_ended(fake: Script) -> None:
    """The message cannot be read halfway: deliver raises (the item's deferral) and the
    server never receives the final '.', so it cannot take a truncated message."""
    def broken() -> Iterator[bytes]:
        yield b"Subject: half\r\n\r\nfirst part\r\n"
        raise OSError("disk gone")
    item = Item(1, None, "alice@contoso.test", (ItemRecipient("a@x.test"),), None, 100,
                1.8e9, broken)
    conn = await connect(host=fake.address)
    try:
        with pytest.raises(MessageUnreadable, match="disk gone"):
            await conn.deliver(item)
    finally:
        await conn.close()
    for _ in range(100):
        if fake.partial:
            break
        await asyncio.sleep(0.01)
    assert fake.messages == [] and fake.partial == [b"Subject: half\r\n\r\nfirst part\r\n"]


async def test_addresses_that_cannot_go_in_a_command_fail_without_being_sent(fake: Script
                                                                             ) -> None:
    results = await deliver(make_item("ARCHIVE:keep", "a b@x.test", "ok@x.test",
                                      "caf\u00e9@x.test"), host=fake.address)
    assert outcomes(results) == [("ARCHIVE:keep", "failed", "5.1.3"),
                                 ("a b@x.test", "failed", "5.1.3"),
                                 ("ok@x.test", "delivered", "2.0.0"),
                                 ("caf\u00e9@x.test", "failed", "5.1.3")]
    assert [c for c in fake.commands if c.startswith("RCPT")] == ["RCPT TO:<ok@x.test>"]
    bad_sender = await deliver(make_item("ok@x.test", sender="x<y>@z"), host=fake.address)
    assert outcomes(bad_sender) == [("ok@x.test", "failed", "5.1.7")]


# -- settings and the encoder -------------------------------------------------------------

def test_settings_are_checked() -> None:
    for values, needle in [
        ({}, "exactly one of the settings host"),
        ({"host": "h:24", "socket": "/run/lmtp"}, "exactly one of the settings host"),
        ({"host": "::1"}, "in brackets"),
        ({"host": "[nothost]:24"}, "not an IPv6 address"),
        ({"host": "h:0"}, "port must be 1 to 65535"),
        ({"host": "h:http"}, "port must be 1 to 65535"),
        ({"host": "bad host"}, "not a host name"),
        ({"socket": "run/lmtp"}, "absolute path"),
        ({"host": "h", "lhlo": "two words"}, "setting lhlo"),
        ({"host": "h", "timeout": "0"}, "1 or more"),
        ({"host": "h", "recipient_limit": "x"}, "whole number"),
    ]:
        with pytest.raises(AgentError, match=needle):
            settings_for(**values)


def test_good_settings_and_their_defaults() -> None:
    from mailgate.deliver.agents.lmtp import LmtpConfig
    c = LmtpConfig.parse(settings_for(host="mail.contoso.test"))
    assert (c.host, c.port, c.timeout, c.endpoint) == ("mail.contoso.test", 24, 300,
                                                       "mail.contoso.test:24")
    assert c.lhlo and " " not in c.lhlo
    assert LmtpConfig.parse(settings_for(host="[::1]:2424")).endpoint == "[::1]:2424"
    assert LmtpConfig.parse(settings_for(host="[::1]")).port == 24
    assert LmtpConfig.parse(settings_for(socket="/run/dovecot/lmtp")).endpoint == \
        "unix:/run/dovecot/lmtp"
    assert LmtpAgent.recipient_limit_for(settings_for(host="h", recipient_limit="5")) == 5
    assert LmtpAgent.recipient_limit_for(settings_for(host="h")) is None


def _unstuff(wire: bytes) -> bytes:
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    body = wire[:-3]
    lines = body.split(b"\r\n")
    assert lines[-1] == b""
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@settings(max_examples=300, deadline=None)
@example(b"\r\n\n.", [1, 1, 1])
@example(b"a\r", [1, 1])
@given(st.binary(max_size=200).map(lambda b: b.translate(bytes.maketrans(b"\x00\x01\x02",
                                                                          b"\r\n."))),
       st.lists(st.integers(min_value=1, max_value=8), max_size=40))
def test_the_encoder_never_sends_a_bare_line_end_and_round_trips(data: bytes,
                                                               cuts: list[int]) -> None:
    """Whatever the bytes and wherever the chunks are cut: no bare CR or LF on the wire,
    no line that is a lone '.' before the end, and un-stuffing gives the message with every
    line end (CRLF, bare CR, bare LF) as CRLF, and a final CRLF if it had none."""
    encoder = WireData()
    out, start = b"", 0
    for n in cuts:
        out += encoder.feed(data[start:start + n])
        start += n
    out += encoder.feed(data[start:]) + encoder.end()
    assert b"\r" not in out.replace(b"\r\n", b"") and b"\n" not in out.replace(b"\r\n", b"")
    assert b"\r\n.\r\n" not in out[:-5]
    normal = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if normal and not normal.endswith(b"\r\n"):
        normal += b"\r\n"
    assert _unstuff(out) == normal


async def test_a_cancelled_delivery_drops_the_connection(fake: Script) -> None:
    """Cancelled mid-transaction (the node's item timeout): the connection is not used
    again; the next item connects anew."""
    fake.stall_after_data = True
    conn = await connect(host=fake.address)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.deliver(make_item("a@x.test")), 0.5)
        fake.stall_after_data = False
        assert outcomes(await conn.deliver(make_item("a@x.test"))) == [
            ("a@x.test", "delivered", "2.0.0")]
    finally:
        await conn.close()
    assert fake.connections == 2
