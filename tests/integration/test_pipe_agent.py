"""The built-in pipe delivery agent (PRODUCT §4.7, Postfix pipe(8) semantics): real
commands (sh and Python scripts written to the test's folder) get the message on stdin,
placeholders as separate arguments, and their exit status becomes per-recipient results.
Settings go through the registry's checks as for a connector, then PipeAgent.check."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from mailgate.deliver.agents.api import Item, ItemRecipient, NextHop, RecipientResult
from mailgate.deliver.agents.pipe import PipeAgent, PipeConnection
from mailgate.deliver.agents.registry import (
    AgentError,
    AgentInfo,
    check_settings,
    resolve_settings,
)
from tests.agents import deliver_once, outcomes

INFO = AgentInfo("pipe", "test", "mailgate (mailgate.deliver.agents.pipe:PipeAgent)",
                 PipeAgent, PipeAgent.settings)
MESSAGE = (b"From: alice@contoso.test\r\nTo: bob@fabrikam.test\r\nSubject: for the pipe\r\n"
           b"Message-ID: <m1@contoso.test>\r\n\r\nline one\r\n\x00binary \xff\xfe\r\n"
           b"From the start\r\n.\r\nlast line\r\n")


def script(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def make_item(*addresses: str, content: bytes = MESSAGE, sender: str = "alice@contoso.test",
              message_id: int = 42) -> Item:
    step = 7 if len(content) < 4096 else 64 * 1024   # small messages: many tiny chunks
    pieces = [content[i:i + step] for i in range(0, len(content), step)]
    return Item(message_id, "<m1@contoso.test>", sender,
                tuple(ItemRecipient(a) for a in addresses), None, len(content), 1.8e9,
                lambda: iter(pieces))


def settings_for(**given: str) -> dict[str, Any]:
    """Connector settings as stored (registry check plus the agent's own) and resolved."""
    stored = check_settings(INFO, {k.replace("_", "-"): v for k, v in given.items()})
    PipeAgent.check(stored)
    return resolve_settings(INFO, stored, {})


async def connect(**given: str) -> PipeConnection:
    return await PipeAgent().open_connection(NextHop("Pipe", "PIPE", settings_for(**given)))


async def deliver(item: Item, **given: str) -> list[RecipientResult]:
    return await deliver_once(await connect(**given), item)


ARGV_DUMP = f"""#!{sys.executable}
import json, sys
env = dict(kv.split("=", 1) for kv in
           open("/proc/self/environ", "rb").read().decode().split("\\0") if kv)
json.dump({{"argv": sys.argv[2:], "env": env, "cwd": __import__("os").getcwd(),
           "stdin": len(sys.stdin.buffer.read())}}, open(sys.argv[1], "w"))
"""


async def test_delivered_with_the_exact_message_bytes_on_stdin(tmp_path: Path) -> None:
    """Exit 0 delivers every recipient of the item, in the item's order; the command reads
    exactly the item's bytes (CRLF, NUL and 8-bit bytes unchanged) from stdin."""
    cat = script(tmp_path, "cat.sh", '#!/bin/sh\ncat > "$1"\n')
    out = tmp_path / "received.eml"
    item = make_item("bob@fabrikam.test", "carol@fabrikam.test")
    results = await deliver(item, argv=f"{cat} {out}")
    assert outcomes(results) == [("bob@fabrikam.test", "delivered", "2.0.0"),
                                 ("carol@fabrikam.test", "delivered", "2.0.0")]
    assert results[0].status == "250 2.0.0 cat.sh accepted the message"
    assert out.read_bytes() == b"".join(item.chunks()) == MESSAGE


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


async def test_a_large_message_is_streamed_not_held_in_memory(tmp_path: Path) -> None:
    """A 20 MiB message generated in 1 MiB chunks goes through `cat > file` whole, and the
    agent's peak RSS grows by far less than the message size (one chunk at a time)."""
    mib = 1024 * 1024

    def chunks() -> Iterator[bytes]:
        for n in range(20):
            line = f"chunk {n:04d} ".encode() + b"x" * 100 + b"\r\n"
            yield (line * (mib // len(line) + 1))[:mib]

    expected = hashlib.sha256()
    for chunk in chunks():
        expected.update(chunk)
    item = Item(7, None, "", (ItemRecipient("big@fabrikam.test"),), None, 20 * mib, 1.8e9,
                chunks)
    cat = script(tmp_path, "cat.sh", '#!/bin/sh\ncat > "$1"\n')
    out = tmp_path / "big.eml"
    conn = await connect(argv=f"{cat} {out}")
    # Reset the peak (VmHWM) to the current RSS, so the delta is this delivery's peak.
    Path("/proc/self/clear_refs").write_text("5")
    before = _vm_kib("VmHWM")
    results = await conn.deliver(item)
    peak_growth = _vm_kib("VmHWM") - before
    assert outcomes(results) == [("big@fabrikam.test", "delivered", "2.0.0")]
    got = hashlib.sha256()
    with open(out, "rb") as f:
        while block := f.read(mib):
            got.update(block)
    assert out.stat().st_size == 20 * mib and got.hexdigest() == expected.hexdigest()
    assert peak_growth < 8 * 1024, f"peak RSS grew by {peak_growth} KiB for a 20 MiB message"


async def test_placeholders_become_separate_arguments_and_the_environment_is_minimal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """{recipients} is one argument per recipient, other placeholders are substituted
    inside their argument, {{ }} are literal braces, quoting is shell-like; the child sees
    only PATH, LANG and the MAILGATE_* variables, and runs in / by default."""
    monkeypatch.setenv("MAILGATE_TEST_CANARY", "must not leak")
    dump = script(tmp_path, "dump.py", ARGV_DUMP)
    out = tmp_path / "argv.json"
    item = make_item("bob@fabrikam.test", "carol@fabrikam.test", message_id=4711)
    results = await deliver(
        item, argv=f"{dump} {out} -f {{sender}} {{recipients}} 'size={{size}} q={{queue_id}}'"
                   f" --mid={{message_id}} '{{{{literal}}}}' ''")
    assert [r.outcome for r in results] == ["delivered", "delivered"]
    seen = json.loads(out.read_text())
    assert seen["argv"] == ["-f", "alice@contoso.test", "bob@fabrikam.test",
                            "carol@fabrikam.test", f"size={len(MESSAGE)} q=4711",
                            "--mid=<m1@contoso.test>", "{literal}", ""]
    assert seen["env"] == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": os.environ.get("LANG", "C"), "MAILGATE_SENDER": "alice@contoso.test",
        "MAILGATE_RECIPIENTS": "bob@fabrikam.test\ncarol@fabrikam.test",
        "MAILGATE_QUEUE_ID": "4711", "MAILGATE_SIZE": str(len(MESSAGE))}
    assert seen["cwd"] == "/" and seen["stdin"] == len(MESSAGE)


async def test_a_hostile_recipient_arrives_as_one_argument(tmp_path: Path) -> None:
    """An address full of spaces, quotes and shell syntax is one argv element, exactly as
    given; nothing of it is run by a shell."""
    dump = script(tmp_path, "dump.py", ARGV_DUMP)
    out = tmp_path / "argv.json"
    hostile = '"a b; rm -rf / $(touch pwned) `touch pwned2` > x"@x'
    results = await deliver(make_item(hostile), argv=f"{dump} {out} --to {{recipient}}",
                            directory=str(tmp_path))
    assert outcomes(results) == [(hostile, "delivered", "2.0.0")]
    assert json.loads(out.read_text())["argv"] == ["--to", hostile]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["argv.json", "dump.py"]


async def test_addresses_that_could_be_options_are_failed_without_running(
        tmp_path: Path) -> None:
    """A recipient beginning with '-' is failed 5.1.3 and never passed to the command (it
    could be read as an option); the other recipients are delivered. Such a sender fails
    every recipient 5.1.7 and the command does not run."""
    dump = script(tmp_path, "dump.py", ARGV_DUMP)
    out = tmp_path / "argv.json"
    results = await deliver(make_item("-oQ/tmp/evil@x", "bob@fabrikam.test"),
                            argv=f"{dump} {out} {{recipients}}")
    assert outcomes(results) == [("-oQ/tmp/evil@x", "failed", "5.1.3"),
                                 ("bob@fabrikam.test", "delivered", "2.0.0")]
    assert json.loads(out.read_text())["argv"] == ["bob@fabrikam.test"]
    out.unlink()
    results = await deliver(make_item("bob@fabrikam.test", sender="-fevil@x"),
                            argv=f"{dump} {out} {{recipients}}")
    assert outcomes(results) == [("bob@fabrikam.test", "failed", "5.1.7")]
    assert not out.exists()


@pytest.mark.parametrize("code, outcome, enhanced, meaning", [
    (75, "deferred", "4.3.0", "temporary failure"),
    (67, "failed", "5.1.1", "user unknown"),
    (68, "failed", "5.1.2", "host name unknown"),
    (69, "failed", "5.3.0", "service unavailable"),
    (77, "failed", "5.7.1", "permission denied"),
    (64, "failed", "5.3.0", "command line usage error"),
    (71, "deferred", "4.3.0", "system resource problem"),
    (1, "failed", "5.3.0", "unknown mail system error"),
])
async def test_exit_status_follows_sysexits(tmp_path: Path, code: int, outcome: str,
                                            enhanced: str, meaning: str) -> None:
    """Non-zero exits map as Postfix pipe(8): EX_TEMPFAIL (and EX_OSERR) defer 4.3.0,
    other sysexits fail with a fitting code, any other status fails 5.3.0; the command's
    output is in the status text."""
    cmd = script(tmp_path, "exit.sh", f"#!/bin/sh\ncat >/dev/null\necho 'said: no'\n"
                                      f"exit {code}\n")
    [result] = await deliver(make_item("bob@fabrikam.test"), argv=str(cmd))
    assert (result.outcome, result.status.split()[1]) == (outcome, enhanced)
    assert result.status.endswith(f"exit.sh exited with status {code} ({meaning}): said: no")


@pytest.mark.parametrize("body, outcome, status", [
    ("echo '4.2.2 mailbox full'; exit 1", "deferred",
     "451 4.2.2 sh.sh exited with status 1: mailbox full"),
    ("echo '5.2.2 over quota for good'; exit 75", "failed",
     "550 5.2.2 sh.sh exited with status 75: over quota for good"),
])
async def test_an_enhanced_status_at_the_start_of_the_output_wins(
        tmp_path: Path, body: str, outcome: str, status: str) -> None:
    """As Postfix 2.3+: output that begins with 4.X.X or 5.X.X decides the outcome and the
    code, over the exit status."""
    cmd = script(tmp_path, "sh.sh", f"#!/bin/sh\n{body}\n")
    [result] = await deliver(make_item("bob@fabrikam.test"), argv=str(cmd))
    assert (result.outcome, result.status) == (outcome, status)


async def test_killed_by_a_signal_is_deferred(tmp_path: Path) -> None:
    """A command that dies from a signal is a temporary problem: deferred 4.3.0, naming
    the signal."""
    cmd = script(tmp_path, "die.sh", "#!/bin/sh\nkill -TERM $$\n")
    [result] = await deliver(make_item("bob@fabrikam.test"), argv=str(cmd))
    assert result.outcome == "deferred"
    assert result.status == "451 4.3.0 die.sh was killed by signal 15 (SIGTERM)"


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")   # a zombie is dead, only waiting for its new parent


def all_gone(*pids: int) -> bool:
    """True once every pid has ended (SIGKILL lands asynchronously: allow 5 s)."""
    deadline = time.monotonic() + 5
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(_gone(p) for p in pids)


async def test_past_the_timeout_the_command_and_its_children_are_killed(
        tmp_path: Path) -> None:
    """A command (and the child it started) still running after `timeout` seconds is
    killed with its whole process group and reaped; the item is deferred 4.4.7 with the
    output so far, well before the command would have ended."""
    pids = tmp_path / "pids"
    cmd = script(tmp_path, "slow.sh", f'#!/bin/sh\necho $$ > {pids}\nsleep 60 &\n'
                                      f'echo $! >> {pids}\necho started\nwait\n')
    started = time.monotonic()
    [result] = await deliver(make_item("bob@fabrikam.test"), argv=str(cmd), timeout="1")
    assert time.monotonic() - started < 10
    assert result.outcome == "deferred"
    assert result.status == ("451 4.4.7 slow.sh did not finish within 1 s and was killed: "
                             "started")
    shell, sleeper = (int(p) for p in pids.read_text().split())
    assert all_gone(shell, sleeper)


async def test_a_cancelled_delivery_kills_and_reaps_the_command(tmp_path: Path) -> None:
    """When the caller gives up on deliver (the session's own item timeout cancels it),
    the command and its children are killed and reaped before the cancellation returns."""
    pids = tmp_path / "pids"
    cmd = script(tmp_path, "slow.sh", f'#!/bin/sh\necho $$ > {pids}\nsleep 60 &\n'
                                      f'echo $! >> {pids}\nwait\n')
    conn = await connect(argv=str(cmd))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(conn.deliver(make_item("bob@fabrikam.test")), 1)
    shell, sleeper = (int(p) for p in pids.read_text().split())
    assert _gone(shell)   # reaped before the cancellation returned
    assert all_gone(sleeper)


async def test_a_background_child_holding_the_output_does_not_stall_the_result(
        tmp_path: Path) -> None:
    """A command that exits while a child it left in the background still holds stdout
    is judged by its exit status after a short grace, not at the timeout; the background
    child is left running (only a timeout kills the group)."""
    pids = tmp_path / "pids"
    cmd = script(tmp_path, "bg.sh", f"#!/bin/sh\nsleep 30 &\necho $! > {pids}\n"
                                    "echo queued\nexit 0\n")
    started = time.monotonic()
    [result] = await deliver(make_item("bob@fabrikam.test"), argv=str(cmd), timeout="20")
    assert time.monotonic() - started < 10
    assert result.status == "250 2.0.0 bg.sh accepted the message: queued"
    sleeper = int(pids.read_text())
    try:
        assert not _gone(sleeper)
    finally:
        os.kill(sleeper, signal.SIGKILL)


async def test_a_command_that_does_not_read_its_input_is_judged_by_its_exit(
        tmp_path: Path) -> None:
    """A command may exit without reading the message (the pipe breaks under the agent's
    writes); its exit status still decides, and nothing hangs."""
    content = b"Subject: big\r\n\r\n" + b"y" * (4 * 1024 * 1024)
    for code, outcome in ((0, "delivered"), (67, "failed")):
        cmd = script(tmp_path, f"exit{code}.sh", f"#!/bin/sh\nexit {code}\n")
        [result] = await deliver(make_item("bob@fabrikam.test", content=content),
                                 argv=str(cmd))
        assert result.outcome == outcome


async def test_output_is_one_bounded_line_of_printable_text(tmp_path: Path) -> None:
    """stdout and stderr are captured together; newlines, tabs and runs of spaces become
    one space, control and non-ASCII characters '_'; a long output keeps its first and
    last KiB. The command runs in the `directory` setting."""
    cmd = script(tmp_path, "talk.sh",
                 "#!/bin/sh\nprintf 'first\\n\\tsecond \\033[31mred\\n'\n"
                 "printf 'caf\\303\\251\\n' >&2\npwd\n")
    [result] = await deliver(make_item("bob@fabrikam.test"), argv=str(cmd),
                             directory=str(tmp_path))
    assert result.status == (f"250 2.0.0 talk.sh accepted the message: first second "
                             f"_[31mred caf_ {tmp_path}")
    noisy = script(tmp_path, "noisy.py", f"#!{sys.executable}\nimport sys\n"
                                         "print('START'); print('x' * 100000, flush=True)\n"
                                         "print('FINAL ERROR', file=sys.stderr)\n"
                                         "sys.exit(69)\n")
    [result] = await deliver(make_item("bob@fabrikam.test"), argv=str(noisy))
    assert result.outcome == "failed" and result.status.startswith(
        "550 5.3.0 noisy.py exited with status 69 (service unavailable): START x")
    assert " ... " in result.status and result.status.endswith("xxx FINAL ERROR")
    assert len(result.status) < 2200


async def test_recipient_placeholder_runs_once_per_recipient(tmp_path: Path) -> None:
    """With {recipient} the limit is 1; an item with several recipients still gets one
    run each, and each result is that run's, in the item's order."""
    log = tmp_path / "log"
    cmd = script(tmp_path, "one.sh", f'#!/bin/sh\necho "$1" >> {log}\n'
                                     'case "$1" in *unknown*) exit 67;; esac\n')
    results = await deliver(make_item("a@x", "unknown@x", "c@x"),
                            argv=f"{cmd} {{recipient}}")
    assert outcomes(results) == [("a@x", "delivered", "2.0.0"),
                                 ("unknown@x", "failed", "5.1.1"), ("c@x", "delivered", "2.0.0")]
    assert log.read_text().split() == ["a@x", "unknown@x", "c@x"]


@pytest.mark.parametrize("argv, message", [
    ("{dir}/missing", "does not exist"),
    ("no-such-program-for-mailgate", "not found in PATH"),
    ("{dir}/plain.sh", "is not executable"),
    ("{dir}", "is not a file"),
])
async def test_a_program_that_cannot_run_fails_open_connection(
        tmp_path: Path, argv: str, message: str) -> None:
    """A missing or non-executable program raises from open_connection (so the queue goes
    to Retry with the reason), before any message is tried."""
    (tmp_path / "plain.sh").write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(AgentError, match=message):
        await connect(argv=argv.format(dir=tmp_path))


async def test_a_program_gone_after_open_defers_the_item(tmp_path: Path) -> None:
    """If the program disappears after the connection opened, each recipient is deferred
    4.3.0 with the reason (not an exception, which would count toward poisoning)."""
    cmd = script(tmp_path, "gone.sh", "#!/bin/sh\nexit 0\n")
    conn = await connect(argv=str(cmd))
    cmd.unlink()
    results = await conn.deliver(make_item("a@x", "b@x"))
    assert [r.outcome for r in results] == ["deferred", "deferred"]
    assert results[0].status == f"451 4.3.0 cannot run {cmd}: No such file or directory"


async def test_a_message_that_cannot_be_read_raises_and_the_command_is_killed(
        tmp_path: Path) -> None:
    """When the message bytes cannot be read part way, deliver raises (the contract's item
    deferral) and the command, which has only part of the message, is killed rather than
    allowed to finish with it."""
    out = tmp_path / "partial"
    cat = script(tmp_path, "cat.sh", f'#!/bin/sh\ncat > {out}\necho done >> {out}.exit\n')

    def broken() -> Iterator[bytes]:
        yield b"From: a@x\r\n\r\nfirst part\r\n"
        raise OSError("content of message 42 changed while read")

    item = Item(42, None, "a@x", (ItemRecipient("b@x"),), None, 100, 1.8e9, broken)
    conn = await connect(argv=str(cat))
    with pytest.raises(OSError, match="changed while read"):
        await conn.deliver(item)
    assert not (tmp_path / "partial.exit").exists()


@pytest.mark.parametrize("given, message", [
    ({"argv": "/bin/cat {recipent}"}, r"unknown placeholder \{recipent\}"),
    ({"argv": "/bin/cat {size!r}"}, r"unknown placeholder \{size!r\}"),
    ({"argv": "/bin/cat {}"}, r"unknown placeholder \{\}"),
    ({"argv": "/bin/cat --to={recipients}"}, "must be a whole argument"),
    ({"argv": "/bin/{sender}"}, "program .* cannot contain a placeholder"),
    ({"argv": "bin/cat"}, "absolute path or a bare name"),
    ({"argv": "/bin/cat {size"}, "unbalanced brace"),
    ({"argv": "/bin/cat 'open"}, "No closing quotation"),
    ({"argv": "/bin/cat {recipient}", "recipient-limit": "5"}, "recipient-limit must be 1"),
    ({"argv": "/bin/cat", "timeout": "0"}, "timeout must be 1 or more"),
    ({"argv": "/bin/cat", "directory": "spool"}, "must be an absolute path"),
    ({"argv": "/bin/cat", "user": "a b"}, "must be a user name"),
    ({"argv": "   "}, "needs the setting argv"),
    ({"argv": "'' /tmp/x"}, "program .* is empty"),
])
def test_check_refuses_settings_a_command_could_not_run_with(given: dict[str, str],
                                                             message: str) -> None:
    """PipeAgent.check (for connector creation) refuses an unknown placeholder and the
    other template and setting mistakes with one line."""
    with pytest.raises(AgentError, match=message):
        PipeAgent.check(check_settings(INFO, given))


def test_recipient_limit_per_connector() -> None:
    """The scheduler reads the limit per connector: 1 for {recipient}, the recipient-limit
    setting otherwise, None (any number) when neither applies."""
    assert PipeAgent.recipient_limit_for(settings_for(argv="/bin/cat {recipient}")) == 1
    assert PipeAgent.recipient_limit_for(settings_for(argv="/bin/cat {recipient}",
                                                      recipient_limit="1")) == 1
    assert PipeAgent.recipient_limit_for(settings_for(argv="/bin/cat {recipients}",
                                                      recipient_limit="50")) == 50
    assert PipeAgent.recipient_limit_for(settings_for(argv="/bin/cat")) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_user_setting_runs_the_command_as_that_user_and_its_groups() -> None:
    """With `user`, the command runs with that user's uid, gid and supplementary groups,
    none of the node's (root's gid 0 is not kept)."""
    id_program = shutil.which("id")
    assert id_program is not None
    [result] = await deliver(make_item("bob@fabrikam.test"), argv=id_program, user="nobody")
    assert result.outcome == "delivered"
    output = result.status.split(": ", 1)[1]
    assert output.startswith("uid=65534(nobody) gid=65534(") and "(root)" not in output


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop and regain the euid")
async def test_user_setting_is_refused_when_the_node_is_unprivileged() -> None:
    """A node that does not run as root cannot switch users: a different `user` fails
    open_connection with the reason; its own user is accepted (no switch)."""
    os.seteuid(65534)
    try:
        with pytest.raises(AgentError, match=r"runs unprivileged \(uid 65534\) and cannot "
                                             r"run commands as user daemon"):
            await connect(argv="/bin/cat", user="daemon")
        conn = await connect(argv="/bin/cat", user="nobody")
        assert conn.ids == {}
    finally:
        os.seteuid(0)
    with pytest.raises(AgentError, match="user no-such-user-here does not exist"):
        await connect(argv="/bin/cat", user="no-such-user-here")
