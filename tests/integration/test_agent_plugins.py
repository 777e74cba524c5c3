"""Delivery agent plugins (issue #5, PRODUCT §4.7): the example package under examples/ is
installed by the test run (pip, into a folder of its own), found through its entry point,
listed by `mailgate delivery-agent list`, and used through the contract; settings are
checked as documented in docs/delivery-agents.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from mailgate.deliver.agents.api import Item, ItemRecipient, NextHop, deferred, failed
from mailgate.deliver.agents.registry import (
    AgentError,
    check_settings,
    discover,
    find,
    resolve_settings,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mailgate-example-agent"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package, installed with pip into its own folder (not the venv)."""
    target = tmp_path_factory.mktemp("plugins")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                           "--disable-pip-version-check", "--target", str(target),
                           str(EXAMPLE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return target


@pytest.fixture
def plugin_path(installed: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(installed))
    yield installed


def test_cli_lists_the_installed_protocol_with_version_and_origin(installed: Path,
                                                                  tmp_path: Path) -> None:
    """`mailgate delivery-agent list` shows each protocol found through the entry-point
    group, with the version and the package it comes from, and its settings."""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    proc = subprocess.run([sys.executable, "-m", "mailgate", "delivery-agent", "list",
                           "--json"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [agent] = [a for a in json.loads(proc.stdout) if a["Name"] == "example-folder"]
    assert agent["Version"] == "0.1.0"
    assert agent["Origin"].startswith("mailgate-example-agent (mailgate_example_agent:")
    assert agent["Settings"] == ["folder*", "token (secret)", "timeout"]
    assert agent["Status"] == "ok"
    without = subprocess.run([sys.executable, "-m", "mailgate", "delivery-agent", "list",
                              "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert "example-folder" not in without.stdout


def item(message_id: int, *addresses: str, body: bytes = b"page 1\r\n") -> Item:
    data = b"From: alice@contoso.test\r\nSubject: fax for you\r\n\r\n" + body
    return Item(message_id, "<m@contoso.test>", "alice@contoso.test",
                tuple(ItemRecipient(a) for a in addresses), None, len(data), 1.8e9,
                lambda: iter([data[:20], data[20:]]))


def test_the_example_agent_delivers_fails_and_defers_per_recipient(plugin_path: Path,
                                                                   tmp_path: Path) -> None:
    """Through the contract: open_connection, deliver (one result per recipient: written,
    failed 5.1.1, deferred 4.x.x), close; the message bytes arrive whole from the chunks
    and the headers are parsed on demand."""
    info = find("EXAMPLE-FOLDER")
    assert info.agent is not None
    settings = resolve_settings(info, check_settings(info, {"folder": str(tmp_path)}), {})
    conn: Any = info.agent().open_connection(NextHop("Archive", "ARCHIVE", settings))
    results = conn.deliver(item(7, "ARCHIVE:a", "ARCHIVE:reject-me", "ARCHIVE:later"))
    conn.close()
    assert [(r.address, r.outcome, r.status.split()[1]) for r in results] == [
        ("ARCHIVE:reject-me", "failed", "5.1.1"), ("ARCHIVE:later", "deferred", "4.0.0"),
        ("ARCHIVE:a", "delivered", "2.0.0")]
    written = (tmp_path / "7-1.eml").read_bytes()
    assert written.endswith(b"\r\n\r\npage 1\r\n") and written.startswith(b"From: alice")
    meta = json.loads((tmp_path / "7-1.json").read_text())
    assert meta == {"sender": "alice@contoso.test", "recipients": ["ARCHIVE:a"],
                    "subject": "fax for you", "size": len(written)}


def test_open_connection_failure_is_an_exception_with_the_reason(plugin_path: Path,
                                                                 tmp_path: Path) -> None:
    """A next hop that cannot be reached raises from open_connection (the queue will go to
    Retry with this text as LastError)."""
    info = find("example-folder")
    assert info.agent is not None
    with pytest.raises(OSError, match="does not exist"):
        info.agent().open_connection(NextHop("Archive", "ARCHIVE",
                                             {"folder": str(tmp_path / "missing")}))


@pytest.mark.parametrize("given, message", [
    ({}, "needs the setting folder"),
    ({"folder": "/x", "colour": "red"}, "no setting 'colour' (it takes: folder, token, timeout)"),
    ({"folder": "/x", "token": "s3cret"}, "is a secret: give the name of an environment"),
    ({"folder": "/x", "token-env": "not a name"}, "must name an environment variable"),
    ({"folder-env": "X"}, "is not a secret"),
    ({"folder": "/x\n"}, "control characters"),
])
def test_settings_are_checked_and_secrets_only_by_variable(plugin_path: Path,
                                                           given: dict[str, str],
                                                           message: str) -> None:
    """Unknown and missing settings are refused with the agent's list; a secret is only
    accepted as <name>-env=VARIABLE, so its value is never stored."""
    with pytest.raises(AgentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_settings(find("example-folder"), given)


def test_secret_is_read_from_the_environment_when_resolved(plugin_path: Path) -> None:
    """A stored secret is the variable's name; the agent gets the value, and a variable
    missing from the node's environment is a clear error."""
    info = find("example-folder")
    stored = check_settings(info, {"folder": "/x", "token-env": "ARCHIVE_TOKEN"})
    assert stored == {"folder": "/x", "token-env": "ARCHIVE_TOKEN"}
    assert resolve_settings(info, stored, {"ARCHIVE_TOKEN": "t0k"}) == {
        "folder": "/x", "token": "t0k", "timeout": 60}
    with pytest.raises(AgentError, match="ARCHIVE_TOKEN .* is not set"):
        resolve_settings(info, stored, {})


def test_unknown_and_broken_protocols_are_reported_not_fatal(plugin_path: Path,
                                                             tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """An unknown protocol names the ones found; an entry point whose module fails to
    import is listed as broken and refused by find(), and discovery goes on."""
    broken = tmp_path / "broken"
    (broken / "broken_agent-1.0.dist-info").mkdir(parents=True)
    (broken / "broken_agent-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: broken-agent\nVersion: 1.0\n")
    (broken / "broken_agent-1.0.dist-info" / "entry_points.txt").write_text(
        "[mailgate.delivery_agents]\nbroken = broken_agent_module:Agent\n")
    (broken / "broken_agent_module.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(broken))
    by_name = {a.name: a for a in discover()}
    assert by_name["broken"].error == "cannot load: RuntimeError: boom"
    assert by_name["example-folder"].error is None
    with pytest.raises(AgentError, match="broken: cannot load"):
        find("broken")
    with pytest.raises(AgentError, match="unknown delivery protocol 'sms' .*example-folder"):
        find("sms")


def test_result_helpers_refuse_the_wrong_status_class() -> None:
    """A deferral carries a 4.x.x status and a failure a 5.x.x one."""
    with pytest.raises(ValueError):
        deferred("a@b", "x", enhanced="5.0.0")
    with pytest.raises(ValueError):
        failed("a@b", "4.0.0", "x")
