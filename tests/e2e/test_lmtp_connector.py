"""The built-in lmtp agent end to end: a Delivery Agent connector for an SMTP address space
(archive.contoso.test) hands messages from the Pickup directory to a real, private Dovecot
LMTP server (tests/dovecot.py), through the real CLI and an in-process node: delivered
recipients land in Dovecot's Maildirs with DELIVER events (source AGENT), a user Dovecot
does not know gets an NDR with its 5.1.1, and a server that is down puts the connector's
queue in Retry with the agent's reason."""

from __future__ import annotations

import json
from typing import Any, Iterator, cast

import pytest

from tests.conftest import MailgateEnv, NodeThread, drop_file, wait_for
from tests.dovecot import Dovecot, free_port
from tests.e2e.test_queue_engine import messages, reports

DOMAIN = "archive.contoso.test"
BOB, CAROL = f"bob@{DOMAIN}", f"carol@{DOMAIN}"


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    with Dovecot([BOB, CAROL]) as server:
        yield server


def agent_queue(env: MailgateEnv) -> dict[str, Any] | None:
    found = [q for q in json.loads(env.cli("queue", "get", "--json").stdout)
             if q["DeliveryType"] == "DeliveryAgent"]
    return found[0] if found else None


def test_lmtp_connector_delivers_to_dovecot_and_fails_an_unknown_user(
        demo_env: MailgateEnv, dovecot: Dovecot) -> None:
    """`delivery-agent list` shows the built-in lmtp agent; a connector with
    host=127.0.0.1:PORT delivers a message for two Dovecot users and one unknown user: the
    two Maildirs hold it, the unknown one is an NDR with Dovecot's 5.1.1, tracking has
    DELIVER and FAIL events for the connector, and the queue is empty afterwards."""
    env = demo_env
    listed = json.loads(env.cli("delivery-agent", "list", "--json").stdout)
    [lmtp] = [a for a in listed if a["Name"] == "lmtp"]
    assert lmtp["Origin"].split()[0] == "mailgate"
    bad = env.cli("delivery-agent-connector", "new", "--name", "Archive", "--address-spaces",
                  f"{DOMAIN};1", "--delivery-protocol", "lmtp", "--setting", "host=::1",
                  check=False)
    assert bad.returncode == 1 and "in brackets" in bad.stderr, bad.stderr
    env.cli("delivery-agent-connector", "new", "--name", "Archive", "--address-spaces",
            f"{DOMAIN};1", "--delivery-protocol", "lmtp",
            "--setting", f"host={dovecot.address}")
    node = NodeThread(env)
    try:
        drop_file(env.pickup, "a.eml",
                  f"From: alice@contoso.test\nTo: {BOB}, {CAROL}, nobody@{DOMAIN}\n"
                  f"Subject: to the archive\nMessage-ID: <lmtp1@contoso.test>\n\n"
                  f"keep this\n.dotted line\n".encode())
        for user in (BOB, CAROL):
            [stored] = cast(list[bytes], wait_for(lambda: dovecot.messages(user) or None,
                                                  what=f"the message in {user}'s Maildir"))
            assert stored.startswith(b"Return-Path: <alice@contoso.test>\n")
            assert b"\nSubject: to the archive\n" in stored
            assert stored.endswith(b"\n\nkeep this\n.dotted line\n")
        [ndr] = cast(list[Any], wait_for(lambda: reports(env) or None, what="the NDR"))
        block = ndr.get_payload()[1].get_payload()[1]
        assert block["Final-Recipient"] == f"rfc822; nobody@{DOMAIN}"
        assert block["Status"] == "5.1.1"
        wait_for(lambda: not messages(env), what="the queue to empty")
        events = json.loads(env.cli("tracking", "search", "--source", "AGENT",
                                    "--json").stdout)
        outcome = {(e["EventId"], r): status for e in events
                   for r, status in zip(e["Recipients"], e["RecipientStatus"])}
        assert sorted(outcome) == [("DELIVER", BOB), ("DELIVER", CAROL),
                                   ("FAIL", f"nobody@{DOMAIN}")]
        assert outcome[("DELIVER", BOB)].startswith(f"250 2.0.0 {dovecot.address} said: ")
        assert outcome[("FAIL", f"nobody@{DOMAIN}")].startswith("550 5.1.1 ")
        assert {e["ConnectorId"] for e in events} == {"Archive"}
    finally:
        node.stop()


def test_lmtp_server_down_puts_the_queue_in_retry(demo_env: MailgateEnv) -> None:
    """Nothing listens at the connector's host: opening the session fails, the
    DeliveryAgent queue goes to Retry with 'cannot connect' and the message waits."""
    env = demo_env
    port = free_port()
    env.cli("delivery-agent-connector", "new", "--name", "Archive", "--address-spaces",
            f"{DOMAIN};1", "--delivery-protocol", "lmtp", "--setting", f"host=127.0.0.1:{port}")
    node = NodeThread(env)
    try:
        drop_file(env.pickup, "b.eml", f"From: alice@contoso.test\nTo: {BOB}\n"
                                       f"Subject: wait\n\nx\n".encode())
        q = cast(dict[str, Any], wait_for(
            lambda: (lambda q: q if q and q["Status"] == "Retry" else None)(agent_queue(env)),
            what="the queue in Retry"))
        assert f"cannot connect to 127.0.0.1:{port}: Connection refused" in q["LastError"]
        assert q["MessageCount"] == 1
    finally:
        node.stop()
