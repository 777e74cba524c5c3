"""Delivery Agent connectors through the real CLI and node (issue #5), with the example
agent package installed by the test run: routing to the connector's own queue, per
recipient results (delivered, failed with an NDR, deferred in Retry), a next hop that
cannot be reached (queue in Retry with the agent's reason), settings checked at `new`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, cast

import pytest

from tests.conftest import MailgateEnv, NodeThread, drop_file, wait_for
from tests.e2e.test_queue_engine import messages, reports

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("plugins")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                           "--disable-pip-version-check", "--target", str(target),
                           str(ROOT / "examples" / "mailgate-example-agent")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return target


@pytest.fixture
def archive(demo_env: MailgateEnv, plugins: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[MailgateEnv, Path]]:
    """The demo organization with an Archive connector served by the example agent."""
    monkeypatch.setenv("PYTHONPATH", str(plugins))      # for the CLI processes
    monkeypatch.syspath_prepend(str(plugins))           # for the in-process node
    folder = demo_env.root / "archive"
    folder.mkdir()
    demo_env.cli("delivery-agent-connector", "new", "--name", "Archive", "--address-spaces",
                 "ARCHIVE:*;1", "--delivery-protocol", "example-folder",
                 "--setting", f"folder={folder}", "--max-concurrent-connections", "2")
    yield demo_env, folder


def archive_queue(env: MailgateEnv) -> dict[str, Any] | None:
    found = [q for q in json.loads(env.cli("queue", "get", "--json").stdout)
             if q["DeliveryType"] == "DeliveryAgent"]
    return found[0] if found else None


def test_agent_delivers_fails_and_defers_per_recipient(
        archive: tuple[MailgateEnv, Path]) -> None:
    """A message to three ARCHIVE recipients: the agent writes it for one (DELIVER, source
    AGENT), fails one (the sender gets an NDR with 5.1.1) and defers one (the message
    stays in the DeliveryAgent queue in Retry for that recipient only)."""
    env, folder = archive
    node = NodeThread(env)
    try:
        drop_file(env.pickup, "a.eml",
                  b"From: alice@contoso.test\nTo: IMCEAARCHIVE-keep@contoso.test, "
                  b"IMCEAARCHIVE-reject-me@contoso.test, IMCEAARCHIVE-later@contoso.test\n"
                  b"Subject: to the archive\n\nkeep this\n")
        wait_for(lambda: list(folder.glob("*.eml")), what="the archived message")
        [meta] = [json.loads(p.read_text()) for p in folder.glob("*.json")]
        assert meta["recipients"] == ["ARCHIVE:keep"]
        assert meta["subject"] == "to the archive"
        [ndr] = cast(list[Any], wait_for(lambda: reports(env) or None, what="the NDR"))
        block = ndr.get_payload()[1].get_payload()[1]
        assert block["Final-Recipient"] == "x-archive; reject-me"
        assert block["Status"] == "5.1.1"
        [m] = wait_for(lambda: messages(env) or None, what="the deferred part")  # type: ignore[misc]
        assert sorted((r["Address"], r["Status"]) for r in m["Recipients"]) == [
            ("ARCHIVE:keep", "Delivered"), ("ARCHIVE:later", "Retry"),
            ("ARCHIVE:reject-me", "Failed")]
        assert "come back later" in m["LastError"]
        q = archive_queue(env)
        assert q is not None and q["NextHopDomain"] == "ARCHIVE"
        events = json.loads(env.cli("tracking", "search", "--source", "AGENT",
                                    "--json").stdout)
        assert sorted(e["EventId"] for e in events) == ["DEFER", "DELIVER", "FAIL"]
        assert {e["ConnectorId"] for e in events} == {"Archive"}
    finally:
        node.stop()


def test_next_hop_down_puts_the_queue_in_retry_with_the_agents_reason(
        archive: tuple[MailgateEnv, Path]) -> None:
    """open_connection failing (the archive folder is gone) is a connection failure: the
    DeliveryAgent queue goes to Retry with the agent's text as LastError; the message waits,
    and is delivered once the folder is back and the queue is retried."""
    env, folder = archive
    folder.rmdir()
    node = NodeThread(env)
    try:
        drop_file(env.pickup, "b.eml", b"From: alice@contoso.test\nTo: "
                                       b"IMCEAARCHIVE-x@contoso.test\nSubject: wait\n\nx\n")
        q = cast(dict[str, Any], wait_for(
            lambda: (lambda q: q if q and q["Status"] == "Retry" else None)(archive_queue(env)),
            what="the queue in Retry"))
        assert "cannot connect" in q["LastError"] and "does not exist" in q["LastError"]
        assert q["MessageCount"] == 1
        folder.mkdir()
        env.cli("queue", "retry", q["Identity"])
        wait_for(lambda: list(folder.glob("*.eml")), what="the delivery after the retry")
    finally:
        node.stop()


def test_settings_are_checked_when_the_connector_is_made(archive: tuple[MailgateEnv, Path]
                                                          ) -> None:
    """`new` and `set` refuse unknown protocols, unknown or missing settings and secrets
    given in clear, with one line; a secret is stored only as its variable's name."""
    env, _ = archive
    for args, needle in [
        (("--delivery-protocol", "sms"), "unknown delivery protocol 'sms'"),
        (("--delivery-protocol", "example-folder"), "needs the setting folder"),
        (("--delivery-protocol", "example-folder", "--setting", "folder=/x",
          "--setting", "token=hunter2"), "is a secret"),
    ]:
        proc = env.cli("delivery-agent-connector", "new", "--name", "Bad", "--address-spaces",
                       "BAD:*", *args, check=False)
        assert proc.returncode == 1 and needle in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1
    # Identities as for every connector: name, GUID, or Node\\Name.
    out = json.loads(env.cli("delivery-agent-connector", "set", "testnode\\Archive",
                             "--setting", "token-env=ARCHIVE_TOKEN", "--json").stdout)
    assert out["Settings"]["token-env"] == "ARCHIVE_TOKEN"
    assert "hunter2" not in env.cli("delivery-agent-connector", "get", "--json").stdout


def test_builtin_pipe_connector_runs_a_real_command_per_recipient(demo_env: MailgateEnv
                                                                  ) -> None:
    """The built-in pipe agent (no plugin to install): `delivery-agent list` shows it; a
    connector with argv "... {recipient}" runs the script once per recipient with the
    message on stdin; exit 0 is delivered and exit 67 (EX_NOUSER) an NDR 5.1.1."""
    env = demo_env
    listed = json.loads(env.cli("delivery-agent", "list", "--json").stdout)
    assert [a["Origin"].split()[0] for a in listed if a["Name"] == "pipe"] == ["mailgate"]
    out = env.root / "faxes"
    out.mkdir()
    script = env.root / "sendfax"
    # {recipient} is the routed address, TYPE:value (FAX:+15550777).
    script.write_text(f"#!/bin/sh\nn=\"${{1#FAX:}}\"\n[ \"$n\" = '+15550666' ] && exit 67\n"
                      # Write then rename, so the test never reads a half-written file.
                      f"cat > '{out}'/\"$n\".tmp && mv '{out}'/\"$n\".tmp '{out}'/\"$n\".eml\n")
    script.chmod(0o755)
    bad = env.cli("delivery-agent-connector", "new", "--name", "FaxPipe", "--address-spaces",
                  "FAX:+1555*;1", "--delivery-protocol", "pipe", "--setting",
                  f"argv={script} {{nosuch}}", check=False)
    assert bad.returncode == 1 and "nosuch" in bad.stderr, bad.stderr
    env.cli("delivery-agent-connector", "new", "--name", "FaxPipe", "--address-spaces",
            "FAX:+1555*;1", "--delivery-protocol", "pipe", "--setting",
            f"argv={script} {{recipient}}")
    node = NodeThread(env)
    try:
        drop_file(env.pickup, "p.eml", b"From: alice@contoso.test\nTo: "
                                       b"IMCEAFAX-+2B15550777@contoso.test, "
                                       b"IMCEAFAX-+2B15550666@contoso.test\n"
                                       b"Subject: piped\n\npage\n")
        [sent] = cast(list[Path], wait_for(lambda: list(out.glob("*.eml")) or None,
                                           what="the piped fax"))
        assert sent.name == "+15550777.eml"
        assert sent.read_bytes().endswith(b"\r\n\r\npage\r\n")
        [ndr] = cast(list[Any], wait_for(lambda: reports(env) or None, what="the NDR"))
        block = ndr.get_payload()[1].get_payload()[1]
        assert (block["Final-Recipient"], block["Status"]) == ("x-fax; +15550666", "5.1.1")
    finally:
        node.stop()


def test_an_agent_that_raises_defers_and_after_the_threshold_poisons(
        archive: tuple[MailgateEnv, Path]) -> None:
    """An exception from the agent's deliver defers the message with the reason and counts
    toward PoisonThreshold (2): after the second failure the message is in the Poison queue,
    suspended, with a POISONMESSAGE event; other messages are delivered meanwhile."""
    env, folder = archive
    env.cli("transport-service", "set", "--message-retry-interval", "1s")
    node = NodeThread(env)
    try:
        drop_file(env.pickup, "e.eml", b"From: alice@contoso.test\nTo: "
                                       b"IMCEAARCHIVE-explode@contoso.test\nSubject: boom\n\nx\n")
        drop_file(env.pickup, "f.eml", b"From: alice@contoso.test\nTo: "
                                       b"IMCEAARCHIVE-fine@contoso.test\nSubject: fine\n\nx\n")
        wait_for(lambda: list(folder.glob("*.eml")), what="the other message")

        def poisoned() -> list[dict[str, Any]] | None:
            found = [m for m in messages(env) if m["Queue"].endswith("\\Poison")]
            return found or None
        [m] = cast(list[dict[str, Any]], wait_for(poisoned, timeout=20, what="Poison"))
        assert m["Subject"] == "boom" and m["Status"] == "Suspended"
        assert "RuntimeError: the example agent was told to explode" in m["LastError"]
        assert m["RetryCount"] == 2
        events = json.loads(env.cli("tracking", "search", "--event-id", "POISONMESSAGE",
                                    "--json").stdout)
        assert [e["MessageSubject"] for e in events] == ["boom"]
    finally:
        node.stop()


def test_an_agent_that_hangs_past_its_timeout_defers_and_after_the_threshold_poisons(
        archive: tuple[MailgateEnv, Path]) -> None:
    """An agent whose deliver does not return within its timeout (plus mailgate's grace)
    is given up on: the message is deferred with "did not answer in time" (DEFER, source
    AGENT) and counts toward PoisonThreshold; the second hang puts it in the Poison queue.
    The node keeps delivering other messages meanwhile."""
    env, folder = archive
    env.cli("delivery-agent-connector", "set", "Archive", "--setting", "timeout=1")
    env.cli("transport-service", "set", "--message-retry-interval", "1s")
    node = NodeThread(env)
    try:
        drop_file(env.pickup, "h.eml", b"From: alice@contoso.test\nTo: "
                                       b"IMCEAARCHIVE-hang@contoso.test\nSubject: stuck\n\nx\n")

        def deferred() -> list[dict[str, Any]] | None:
            found = [m for m in messages(env) if m["Subject"] == "stuck"
                     and m["RetryCount"] >= 1]
            return found or None
        [m] = cast(list[dict[str, Any]], wait_for(deferred, timeout=15, what="a deferral"))
        assert "451 4.4.0 the agent did not answer in time" in m["LastError"]
        drop_file(env.pickup, "f.eml", b"From: alice@contoso.test\nTo: "
                                       b"IMCEAARCHIVE-fine@contoso.test\nSubject: fine\n\nx\n")
        wait_for(lambda: list(folder.glob("*.eml")), timeout=15, what="the other message")

        def poisoned() -> list[dict[str, Any]] | None:
            found = [m for m in messages(env) if m["Queue"].endswith("\\Poison")]
            return found or None
        [m] = cast(list[dict[str, Any]], wait_for(poisoned, timeout=20, what="Poison"))
        assert m["Subject"] == "stuck" and m["Status"] == "Suspended"
        defers = json.loads(env.cli("tracking", "search", "--event-id", "DEFER",
                                    "--json").stdout)
        assert [(e["Source"], e["MessageSubject"]) for e in defers][:1] == [("AGENT", "stuck")]
    finally:
        node.stop()


def test_an_agent_that_crashes_the_process_ends_in_the_poison_queue(
        archive: tuple[MailgateEnv, Path], plugins: Path) -> None:
    """An agent that kills the node (`mailgate serve`) while delivering a message: after
    the restart that message is retried alone; it kills the node a second time
    (PoisonThreshold 2) and is put in the Poison queue, suspended, with a POISONMESSAGE
    event; the other message is delivered and the node keeps running."""
    env, folder = archive
    drop_file(env.pickup, "c.eml", b"From: alice@contoso.test\nTo: "
                                   b"IMCEAARCHIVE-crash@contoso.test\nSubject: killer\n\nx\n")
    drop_file(env.pickup, "f.eml", b"From: alice@contoso.test\nTo: "
                                   b"IMCEAARCHIVE-fine@contoso.test\nSubject: fine\n\nx\n")
    crashes = 0
    for _ in range(4):
        proc = env.start(env={"PYTHONPATH": str(plugins)}, may_die=True)
        wait_for(lambda: proc.poll() is not None or list(folder.glob("*.eml")),
                 timeout=20, what="a crash or the other message delivered")
        if proc.poll() is None:
            break
        assert proc.returncode == 137
        crashes += 1
    try:
        assert crashes == 2, env.log.read_text()
        [m] = [m for m in messages(env) if m["Queue"].endswith("\\Poison")]
        assert m["Subject"] == "killer" and m["Status"] == "Suspended"
        assert len(list(folder.glob("*.eml"))) == 1
        events = json.loads(env.cli("tracking", "search", "--event-id", "POISONMESSAGE",
                                    "--json").stdout)
        assert [e["MessageSubject"] for e in events] == ["killer"]
    finally:
        env.stop()


def test_builtin_webhook_connector_posts_each_message_to_a_real_http_server(
        demo_env: MailgateEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """A webhook connector (auth header from an environment variable) POSTs each message as
    JSON to a real local HTTP server: a 200 delivers it; a 503 with Retry-After defers it,
    keeping it queued in Retry."""
    import base64
    import http.server
    import threading

    received: list[dict[str, Any]] = []
    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"auth": self.headers["Authorization"], **json.loads(body)})
            self.send_response(status["code"])
            if status["code"] == 503:
                self.send_header("Retry-After", "3600")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = demo_env
    monkeypatch.setenv("SMS_TOKEN", "Bearer s3cret")
    try:
        env.cli("delivery-agent-connector", "new", "--name", "Sms", "--address-spaces",
                "SMS:*;1", "--delivery-protocol", "webhook", "--setting",
                f"url=http://127.0.0.1:{server.server_port}/send",
                "--setting", "auth-header-env=SMS_TOKEN")
        assert "s3cret" not in env.cli("delivery-agent-connector", "get", "--json").stdout
        node = NodeThread(env)
        try:
            drop_file(env.pickup, "s.eml", b"From: alice@contoso.test\nTo: "
                                           b"IMCEASMS-+2B15550123@contoso.test\n"
                                           b"Subject: text me\n\nhello\n")
            wait_for(lambda: received, what="the POST")
            [post] = received
            assert post["auth"] == "Bearer s3cret"
            assert [r["address"] for r in post["recipients"]] == ["SMS:+15550123"]
            assert base64.b64decode(post["message"]).endswith(b"\r\n\r\nhello\r\n")
            wait_for(lambda: not messages(env), what="delivered")
            status["code"] = 503
            drop_file(env.pickup, "t.eml", b"From: alice@contoso.test\nTo: "
                                           b"IMCEASMS-+2B15550124@contoso.test\n"
                                           b"Subject: later\n\nhello\n")
            [m] = cast(list[dict[str, Any]], wait_for(
                lambda: [m for m in messages(env) if m["Status"] == "Retry"] or None,
                what="the deferred message"))
            assert "503" in m["LastError"]
        finally:
            node.stop()
    finally:
        server.shutdown()
        server.server_close()
