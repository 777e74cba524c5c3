"""Queue and message commands (PRODUCT §4.2, reference §4.5-§4.6) through the real CLI
against a node in Retry: identities, --filter, bulk only with a filter, Exchange's
transition rules, removal with and without NDR, export in the Replay format, and the
Unreachable queue resubmitted when routing changes."""

from __future__ import annotations

import email
import email.policy
import json
import time
from pathlib import Path
from typing import Any, Iterator, cast

import pytest

from tests.conftest import MailgateEnv, NodeThread, drop_file, wait_for
from tests.e2e.test_queue_engine import (
    ALICE,
    alice_mail,
    fax,
    fax_queue,
    gateway_down,
    messages,
    reports,
)


@pytest.fixture
def stuck(demo_env: MailgateEnv) -> Iterator[MailgateEnv]:
    """A node whose Fax gateway is down, with three faxes from alice in its queue."""
    env = demo_env
    gateway_down(env)
    env.cli("transport-service", "set", "--transient-failure-retry-interval", "1h")
    node = NodeThread(env)
    for i in (1, 2, 3):
        drop_file(env.pickup, f"f{i}.eml", fax(i))
    wait_for(lambda: (fax_queue(env) or {}).get("MessageCount") == 3
             and fax_queue(env)["Status"] == "Retry", what="three faxes in Retry")  # type: ignore[index]
    yield env
    node.stop()


def one_line_error(proc: Any, *needles: str) -> None:
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.count("\n") == 1, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


def ident(env: MailgateEnv, subject: str) -> str:
    [m] = [m for m in messages(env) if m["Subject"] == subject]
    return cast(str, m["Identity"])


def test_queue_get_filter_and_identity(stuck: MailgateEnv) -> None:
    """`queue get --filter` takes Exchange's syntax; an identity is `node\\id`, the id or the
    NextHopDomain; a bad filter is a one-line error."""
    env = stuck
    q = fax_queue(env)
    assert q is not None
    rows = json.loads(env.cli("queue", "get", "--filter", "Status -eq 'Retry' -and "
                              "MessageCount -ge 3", "--json").stdout)
    assert [r["Identity"] for r in rows] == [q["Identity"]]
    assert json.loads(env.cli("queue", "get", "--filter", "LastError -contains 'quota'",
                              "--json").stdout) == []
    by_hop = json.loads(env.cli("queue", "get", "FAX", "--json").stdout)
    assert [r["Identity"] for r in by_hop] == [q["Identity"]]
    one_line_error(env.cli("queue", "get", "--filter", "Statuss -eq 'Retry'", check=False),
                   "unknown property")
    one_line_error(env.cli("queue", "get", "FAX", "--filter", "Status -eq 'Retry'",
                           check=False), "not both")


def test_queue_suspend_resume_retry_rules(stuck: MailgateEnv) -> None:
    """Only Active/Retry queues can be suspended; a suspended queue keeps its messages' own
    statuses and sends nothing; resume and retry make it try again; retry of a queue not in
    Retry is refused; bulk only with --filter."""
    env = stuck
    q = fax_queue(env)
    assert q is not None
    mailbox_queue = [r for r in json.loads(env.cli("queue", "get", "--json").stdout)
                     if r["DeliveryType"] == "SmtpDeliveryToMailbox"]
    if mailbox_queue:
        one_line_error(env.cli("queue", "suspend", mailbox_queue[0]["Identity"], check=False),
                       "only queues in Active or Retry")
    [s] = json.loads(env.cli("queue", "suspend", q["Identity"], "--json").stdout)
    assert s["Status"] == "Suspended"
    (env.root / "fax-out").mkdir()
    one_line_error(env.cli("queue", "retry", q["Identity"], check=False), "Retry")
    assert {m["Status"] for m in messages(env)} == {"Ready"}
    assert fax_queue(env)["Status"] == "Suspended"  # type: ignore[index]
    assert not list((env.root / "fax-out").glob("*.eml"))
    [r] = json.loads(env.cli("queue", "resume", "--filter", "Status -eq 'Suspended'",
                             "--json").stdout)
    assert r["Identity"] == q["Identity"]
    wait_for(lambda: len(list((env.root / "fax-out").glob("*.eml"))) == 3,
             what="the faxes after resume")
    one_line_error(env.cli("queue", "suspend", check=False), "exactly one")


def test_message_suspend_resume_remove_with_and_without_ndr(stuck: MailgateEnv) -> None:
    """Messages are found by identity or filter; suspend/resume follow Exchange's rules;
    remove sends an NDR by default (5.x QUEUE.Admin) and none with --with-ndr false (a DROP
    event instead)."""
    env = stuck
    one, two = ident(env, "fax 1"), ident(env, "fax 2")
    [m] = json.loads(env.cli("message", "suspend", one, "--json").stdout)
    assert m["Status"] == "Suspended"
    one_line_error(env.cli("message", "resume", two, check=False), "only suspended")
    found = json.loads(env.cli("message", "get", "--filter", "Status -eq 'Suspended'",
                               "--json").stdout)
    assert [f["Identity"] for f in found] == [one]
    queue = found[0]["Queue"]
    in_queue = json.loads(env.cli("message", "get", "--filter", f"Queue -eq '{queue}' -and "
                                  "Subject -like 'fax*'", "--json").stdout)
    assert len(in_queue) == 3
    # A bulk action prints a count (--json lists the messages).
    bulk = env.cli("message", "suspend", "--filter", f"Queue -eq '{queue}'")
    assert bulk.stdout.strip() == "3 message(s) suspended"
    bulk = env.cli("message", "resume", "--filter", f"Queue -eq '{queue}'")
    assert bulk.stdout.strip() == "3 message(s) resumed"
    # Resumed messages are due at once: the node tries (and fails) again first.
    wait_for(lambda: fax_queue(env)["Status"] == "Retry"  # type: ignore[index]
             and all(m["Status"] == "Ready" for m in messages(env)), what="Retry again")
    env.cli("message", "suspend", one)
    [m] = json.loads(env.cli("message", "resume", one, "--json").stdout)
    assert m["Status"] == "Ready"

    env.cli("message", "remove", one)
    ndr = cast(list[Any], wait_for(lambda: reports(env) or None, what="the removal NDR"))
    assert ndr[0]["Subject"] == "Undeliverable: fax 1"
    _, status, _ = ndr[0].get_payload()
    assert status.get_payload()[1]["Status"] == "4.3.2"
    env.cli("message", "remove", two, "--with-ndr", "false")
    wait_for(lambda: len(messages(env)) == 1, what="two messages removed")
    assert len(reports(env)) == 1
    drops = json.loads(env.cli("tracking", "search", "--event-id", "DROP", "--json").stdout)
    assert [d["MessageSubject"] for d in drops] == ["fax 2"]
    one_line_error(env.cli("message", "remove", check=False), "exactly one")
    one_line_error(env.cli("message", "get", "n1\\2\\x", check=False), "not a message identity")


def test_export_needs_a_suspended_message_and_writes_the_replay_format(
        stuck: MailgateEnv) -> None:
    """Export-Message refuses a message that is not suspended; for a suspended one it
    writes X-Sender, X-Receiver and X-EndOfInjectedXHeaders, then the queued bytes; the
    message stays in the queue."""
    env = stuck
    out = env.root / "export"
    out.mkdir()
    three = ident(env, "fax 3")
    one_line_error(env.cli("message", "export", three, "--path", str(out), check=False),
                   "suspend it")
    env.cli("message", "suspend", three)
    written = Path(env.cli("message", "export", three, "--path", str(out)).stdout.strip())
    data = written.read_bytes()
    head, _, rest = data.partition(b"X-EndOfInjectedXHeaders: ")
    assert head.startswith(b"X-Sender: <alice@contoso.test>\r\n")
    assert b"X-Receiver: <FAX:+16660003>" in head
    message = rest.split(b"\r\n", 1)[1]
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert parsed["Subject"] == "fax 3" and parsed["Message-ID"] == "<fax3@contoso.test>"
    assert three in [m["Identity"] for m in messages(env)]
    one_line_error(env.cli("message", "export", three, "--path", str(out / "missing"),
                           check=False), "not a folder")


def test_unreachable_is_resubmitted_when_routing_changes(demo_env: MailgateEnv,
                                                         node: NodeThread) -> None:
    """A message for a domain nothing routes to waits in Unreachable; Retry-Queue needs
    --resubmit there; when a connector for that domain appears, it is resubmitted on its
    own and delivered."""
    env = demo_env
    drop_file(env.pickup, "u.eml", f"From: {ALICE}\nTo: bob@fabrikam.test\nSubject: far\n\n"
                                   f"hi\n".encode())

    def unreachable() -> dict[str, Any] | None:
        rows = json.loads(env.cli("queue", "get", "--json").stdout)
        found = [r for r in rows if r["Identity"].endswith("\\Unreachable")]
        return found[0] if found and found[0]["MessageCount"] == 1 else None
    q = cast(dict[str, Any], wait_for(unreachable, what="the Unreachable queue"))
    one_line_error(env.cli("queue", "retry", q["Identity"], check=False), "--resubmit")
    # Retry-Queue -Resubmit: routed again now; with nothing new it is unreachable again.
    env.cli("queue", "retry", q["Identity"], "--resubmit", "true")
    again = json.loads(env.cli("tracking", "search", "--event-id", "RESUBMIT",
                               "--json").stdout)
    by_admin = [r for r in again if "by an administrator" in r["RecipientStatus"][0]]
    assert [r["MessageSubject"] for r in by_admin] == ["far"]
    wait_for(unreachable, what="the message back in Unreachable")
    folder = env.root / "fabrikam-out"
    folder.mkdir()
    env.cli("foreign-connector", "new", "--name", "Fabrikam", "--address-spaces",
            "SMTP:fabrikam.test;1", "--drop-directory", str(folder))
    wait_for(lambda: list(folder.glob("*.eml")), what="the resubmitted message")
    resubmits = json.loads(env.cli("tracking", "search", "--event-id", "RESUBMIT",
                                   "--json").stdout)
    # Each configuration change (and the node's start) resubmits what is still unreachable.
    assert {r["MessageSubject"] for r in resubmits} == {"far"}
    assert len(list(folder.glob("*.eml"))) == 1


def replay(env: MailgateEnv, name: str, envelope: str, subject: str) -> None:
    """Drop a Replay file (CRLF) with the given X-header envelope."""
    data = (envelope + f"From: {ALICE}\r\nSubject: {subject}\r\n\r\nbody\r\n").encode()
    drop_file(env.data / "replay", name, data)


def test_x_source_is_the_message_source_name_and_an_identity_in_two_queues_is_refused(
        stuck: MailgateEnv) -> None:
    """A Replay file's X-Source shows as MessageSourceName; a message split over two queues
    (Fax and Unreachable) has one number in both, so the bare number names two messages:
    an action on it is refused with the identities to choose from."""
    env = stuck
    replay(env, "r.eml", "X-Sender: <alice@contoso.test>\r\nX-Receiver: <FAX:+16669999>\r\n"
                         "X-Receiver: <bob@fabrikam.test>\r\nX-Source: FaxGateway\r\n",
           "split")
    wait_for(lambda: len([m for m in messages(env) if m["Subject"] == "split"]) == 2,
             what="both parts")
    found = [m for m in messages(env) if m["Subject"] == "split"]
    assert {m["MessageSourceName"] for m in found} == {"FaxGateway"}
    number = found[0]["Identity"].rsplit("\\", 1)[1]
    assert {m["Identity"].rsplit("\\", 1)[1] for m in found} == {number}
    one_line_error(env.cli("message", "suspend", number, check=False), "matches 2 messages")
    [m] = json.loads(env.cli("message", "suspend", found[0]["Identity"], "--json").stdout)
    assert m["Status"] == "Suspended"


def test_notify_success_to_a_mailbox_gives_a_delivered_dsn(demo_env: MailgateEnv,
                                                           node: NodeThread) -> None:
    """A Replay receiver with NOTIFY=SUCCESS delivered to a mailbox: the sender gets a DSN
    `Action: delivered`; a receiver without NOTIFY gets none."""
    env = demo_env
    replay(env, "ok.eml", "X-Sender: <alice@contoso.test>\r\n"
                          "X-Receiver: <alice@contoso.test> NOTIFY=SUCCESS\r\n", "tell me")
    [dsn] = cast(list[Any], wait_for(lambda: reports(env) or None, what="the delivered DSN"))
    assert dsn["Subject"] == "Delivered: tell me"
    _, status, _ = dsn.get_payload()
    block = status.get_payload()[1]
    assert (block["Action"], block["Status"]) == ("delivered", "2.0.0")
    replay(env, "quiet.eml", "X-Sender: <alice@contoso.test>\r\n"
                             "X-Receiver: <alice@contoso.test>\r\n", "say nothing")
    wait_for(lambda: any(m["Subject"] == "say nothing" for m in alice_mail(env)),
             what="the quiet message")
    assert len(reports(env)) == 1


def test_fixing_the_connector_retries_its_queue_at_once(stuck: MailgateEnv) -> None:
    """A queue in Retry an hour away is tried as soon as the configuration changes (here
    the Fax connector is pointed at a folder that exists): no waiting for the retry time."""
    env = stuck
    fixed = env.root / "fax-fixed"
    fixed.mkdir()
    env.cli("foreign-connector", "set", "Fax", "--drop-directory", str(fixed))
    wait_for(lambda: len(list(fixed.glob("*.eml"))) == 3, what="the three faxes")
    wait_for(lambda: (fax_queue(env) or {}).get("MessageCount") == 0, what="an empty queue")


def test_a_suspended_unreachable_queue_is_not_resubmitted(demo_env: MailgateEnv,
                                                         node: NodeThread) -> None:
    """Reference §4.3: a suspended Unreachable queue is not resubmitted when the
    configuration changes; once resumed, Retry-Queue -Resubmit routes its message."""
    env = demo_env
    drop_file(env.pickup, "u.eml", f"From: {ALICE}\nTo: carol@fabrikam.test\nSubject: held\n\n"
                                   f"hi\n".encode())

    def unreachable() -> dict[str, Any] | None:
        found = [q for q in json.loads(env.cli("queue", "get", "--json").stdout)
                 if q["Identity"].endswith("\\Unreachable") and q["MessageCount"] == 1]
        return found[0] if found else None
    q = cast(dict[str, Any], wait_for(unreachable, what="the Unreachable queue"))
    env.cli("queue", "suspend", q["Identity"])
    folder = env.root / "fabrikam-out"
    folder.mkdir()
    env.cli("foreign-connector", "new", "--name", "Fabrikam", "--address-spaces",
            "SMTP:fabrikam.test;1", "--drop-directory", str(folder))
    time.sleep(1.5)  # several scheduler ticks after the change
    assert not list(folder.glob("*.eml"))
    assert unreachable() is not None
    env.cli("queue", "resume", q["Identity"])
    env.cli("queue", "retry", q["Identity"], "--resubmit", "true")
    wait_for(lambda: list(folder.glob("*.eml")), what="the message after resubmission")
