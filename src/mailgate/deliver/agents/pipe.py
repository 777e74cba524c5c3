"""The built-in `pipe` delivery agent: each message goes to an external command on its
standard input, with sysexits semantics as Postfix's pipe(8) (PRODUCT §4.7, reference
peers §4.1).

Contract
--------
Settings (checked by `PipeAgent.check(settings)` when a connector is created or changed,
and again by `open_connection`):

- `argv` (required): the command line, split like a POSIX shell would split it
  (`shlex.split`), but never run by a shell. Arguments may contain placeholders:
  `{sender}` (`''` for the null sender), `{recipient}`, `{size}`, `{queue_id}` (the queue's
  message number), `{message_id}` (the Internet Message-ID, `''` if none), and
  `{recipients}`, which must be a whole argument and becomes one argument per recipient.
  `{{` and `}}` are literal braces. A value is put into its argument after splitting and
  never split again, so an address cannot add arguments or shell syntax. The program (the
  first word) is fixed: an absolute path, or a name looked up in the child's PATH.
- `recipient-limit` (int, optional): recipients per command run. A template with
  `{recipient}` needs 1 (implied when left out); `PipeAgent.recipient_limit_for(settings)`
  gives the scheduler the limit of a connector (the `recipient_limit` ClassVar cannot vary
  per connector, so it is None).
- `timeout` (int seconds, default 300): for one command run, from start to exit.
- `user` (optional): run the command as this user (its primary and supplementary groups
  too). Refused when mailgate runs unprivileged and the user is not mailgate's own.
- `directory` (absolute path, optional): the command's working directory (default `/`).

The command gets a minimal environment: PATH (a fixed system path, not the node's), LANG
(the node's, else `C`), MAILGATE_SENDER, MAILGATE_RECIPIENTS (one address per line),
MAILGATE_QUEUE_ID and MAILGATE_SIZE. It runs in a session of its own (its own process
group) with no file descriptors of the node except stdin and stdout/stderr.

The message bytes (CRLF, unchanged) are streamed to stdin from `item.chunks()`, one chunk
in memory at a time. stdout and stderr are captured together (the first and last KiB) and
put, as one line of printable ASCII, into the status text.

Outcome of one run, for every recipient it was run for:

- exit 0: delivered;
- non-zero exit and the output begins with an enhanced status code (`4.2.2 mailbox
  full`): that code decides, deferred for 4.x.x and failed for 5.x.x (as Postfix 2.3+);
- a sysexits code: 75 EX_TEMPFAIL and 71 EX_OSERR are deferred (4.3.0); the others fail:
  67 EX_NOUSER 5.1.1, 68 EX_NOHOST 5.1.2, 65 EX_DATAERR 5.6.0, 73 EX_CANTCREAT 5.2.0,
  76 EX_PROTOCOL 5.5.0, 77 EX_NOPERM 5.7.1, 78 EX_CONFIG 5.3.5, the rest 5.3.0;
- any other exit status: failed 5.3.0 (Postfix bounces it too);
- killed by a signal: deferred 4.3.0;
- past the timeout: the whole process group is killed and reaped, deferred 4.4.7;
- the command cannot be started (removed since the connection opened, exec refused):
  deferred 4.3.0. `open_connection` raises when the program cannot be found or executed,
  so a missing program puts the queue in Retry rather than deferring message by message.

A recipient whose address begins with `-` (it could be read as an option, Postfix's
allow_min_user=no) or contains control characters is failed 5.1.3 without running the
command; such a sender fails every recipient 5.1.7. `deliver` raises only when the message
cannot be read (the command is killed first, so it never sees a truncated message as
whole): that is the contract's item deferral.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import string
import subprocess
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Literal, Mapping, Sequence

from mailgate.deliver.agents.api import (
    Item,
    NextHop,
    RecipientResult,
    Setting,
    deferred,
    delivered,
    failed,
)
from mailgate.deliver.agents.registry import AgentError, int_setting
from mailgate.core.text import one_line

PLACEHOLDERS = ("sender", "recipient", "recipients", "size", "queue_id", "message_id")

# Fixed rather than inherited: the node's PATH depends on how it was started (a shell, a
# service manager), and a command must find the same programs either way (Postfix resets
# PATH for pipe(8) too).
CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_DIRECTORY = "/"
DEFAULT_TIMEOUT = 300

OUTPUT_KEEP = 1024        # bytes kept from the start and from the end of the output
WRITE_SLICE = 64 * 1024   # stdin is written in slices, so the pipe buffer stays small
OUTPUT_GRACE = 2.0        # after exit, how long a background child may hold the output
REAP_WAIT = 5.0           # after SIGKILL, how long to wait for the exit to be reaped

TIMEOUT_STATUS = "4.4.7"
SIGNAL_STATUS = "4.3.0"
EXEC_STATUS = "4.3.0"

# <sysexits.h>: (enhanced status, description). A 4.x.x status defers, a 5.x.x one
# fails. The table is Postfix's (global/sys_exits.c), except 77 EX_NOPERM: 5.7.1
# "delivery not authorized" rather than 5.7.0.
SYSEXITS: dict[int, tuple[str, str]] = {
    64: ("5.3.0", "command line usage error"),
    65: ("5.6.0", "data format error"),
    66: ("5.3.0", "cannot open input"),
    67: ("5.1.1", "user unknown"),
    68: ("5.1.2", "host name unknown"),
    69: ("5.3.0", "service unavailable"),
    70: ("5.3.0", "internal software error"),
    71: ("4.3.0", "system resource problem"),
    72: ("5.3.0", "critical OS file missing"),
    73: ("5.2.0", "can't create user output file"),
    74: ("5.3.0", "input/output error"),
    75: ("4.3.0", "temporary failure"),
    76: ("5.5.0", "remote error in protocol"),
    77: ("5.7.1", "permission denied"),
    78: ("5.3.5", "local configuration error"),
}

_ENHANCED = re.compile(r"([45])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


# -- settings -----------------------------------------------------------------------------

# One argument of the template: literal text and placeholder names, in order; or None for
# a whole-word {recipients}, which becomes one argument per recipient.
_Piece = tuple[str, str | None]
_Arg = tuple[_Piece, ...] | None


def _parse_arg(arg: str, first: bool) -> _Arg:
    try:
        parsed = list(string.Formatter().parse(arg))
    except ValueError:
        raise AgentError(f"argv: unbalanced brace in '{arg}' (write {{{{ or }}}} for a "
                         f"literal brace)") from None
    pieces: list[_Piece] = []
    for literal, name, spec, conversion in parsed:
        if name is None:
            pieces.append((literal, None))
            continue
        if name not in PLACEHOLDERS or spec or conversion:
            shown = "{" + name + ("!" + conversion if conversion else "") + (
                ":" + spec if spec else "") + "}"
            raise AgentError(f"argv: unknown placeholder {shown} (known: "
                             + ", ".join("{" + p + "}" for p in PLACEHOLDERS) + ")")
        if first:
            raise AgentError("argv: the program (the first word) cannot contain a "
                             "placeholder")
        if name == "recipients":
            if arg != "{recipients}":
                raise AgentError("argv: {recipients} must be a whole argument (it becomes "
                                 "one argument per recipient)")
            return None
        pieces.append((literal, name))
    return tuple(pieces)


@dataclass(frozen=True)
class PipeConfig:
    """A connector's settings, checked and parsed."""

    program: str
    args: tuple[_Arg, ...]          # the template after the program
    recipient_limit: int | None
    timeout: int
    user: str | None
    directory: str | None

    @classmethod
    def parse(cls, settings: Mapping[str, Any]) -> PipeConfig:
        argv = settings.get("argv")
        if not isinstance(argv, str) or not argv.strip():
            raise AgentError("the pipe agent needs the setting argv (the command line)")
        try:
            words = shlex.split(argv)
        except ValueError as exc:
            raise AgentError(f"argv: {exc} in '{argv}'") from None
        _parse_arg(words[0], first=True)
        program = words[0].replace("{{", "{").replace("}}", "}")
        if not program:
            raise AgentError("argv: the program (the first word) is empty")
        if "/" in program and not program.startswith("/"):
            # Relative to what? The working directory is a setting; refuse the ambiguity.
            raise AgentError(f"argv: the program must be an absolute path or a bare name "
                             f"looked up in PATH, not '{program}'")
        args = tuple(_parse_arg(w, first=False) for w in words[1:])
        uses_recipient = any(a is not None and any(n == "recipient" for _, n in a)
                             for a in args)
        limit = int_setting(settings, "recipient-limit", None)
        if uses_recipient:
            if limit not in (None, 1):
                raise AgentError(f"argv uses {{recipient}}, so recipient-limit must be 1 "
                                 f"(or left out), not {limit}")
            limit = 1
        timeout = int_setting(settings, "timeout", DEFAULT_TIMEOUT)
        assert timeout is not None
        user = settings.get("user")
        if user is not None and (not isinstance(user, str) or not re.fullmatch(
                r"[A-Za-z0-9_.][A-Za-z0-9_.@-]*\$?", user)):
            raise AgentError(f"setting user must be a user name, not '{user}'")
        directory = settings.get("directory")
        if directory is not None and (not isinstance(directory, str)
                                      or not os.path.isabs(directory)):
            raise AgentError(f"setting directory must be an absolute path, not '{directory}'")
        return cls(program, args, limit, timeout, user or None, directory or None)

    def expand(self, values: Mapping[str, str], recipients: Sequence[str]) -> list[str]:
        """The arguments after the program, each value substituted into one argument."""
        out: list[str] = []
        for arg in self.args:
            if arg is None:
                out.extend(recipients)
            else:
                out.append("".join(lit + (values[name] if name else "") for lit, name in arg))
        return out


# -- running one command ------------------------------------------------------------------

class _Output:
    """The command's output, bounded: the first and the last OUTPUT_KEEP bytes."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = OUTPUT_KEEP - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data[-OUTPUT_KEEP:]
            del self.tail[:-OUTPUT_KEEP]

    def text(self) -> str:
        gap = b" ... " if self.total > len(self.head) + len(self.tail) else b""
        return one_line(bytes(self.head) + gap + bytes(self.tail))


class _CommandProtocol(asyncio.SubprocessProtocol):
    """The low-level subprocess protocol rather than asyncio.subprocess.Process: on Python
    3.11 `Process.wait()` only returns once every pipe is closed, so a background child
    holding stdout would look like a hung command; here the exit is seen when it happens,
    and the output is kept bounded as it arrives instead of in a StreamReader."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.exited: asyncio.Future[None] = loop.create_future()
        self.output_closed: asyncio.Future[None] = loop.create_future()
        self.output = _Output()
        self.stdin_closed = False
        self._writable = asyncio.Event()
        self._writable.set()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.output.add(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 0:
            # The command closed its stdin (or exited): stop writing, wake a drain.
            self.stdin_closed = True
            self._writable.set()
        elif not self.output_closed.done():
            self.output_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def drain(self) -> None:
        await self._writable.wait()


@dataclass(frozen=True)
class _Outcome:
    outcome: Literal["delivered", "deferred", "failed"]
    enhanced: str
    text: str

    def result(self, address: str) -> RecipientResult:
        if self.outcome == "delivered":
            return delivered(address, self.text)
        if self.outcome == "deferred":
            return deferred(address, self.text, enhanced=self.enhanced)
        return failed(address, self.enhanced, self.text)


def _with_output(text: str, output: str) -> str:
    return f"{text}: {output}" if output else text


def interpret(name: str, returncode: int, output: str) -> _Outcome:
    """The outcome of a finished command, from its exit status and output."""
    if returncode == 0:
        return _Outcome("delivered", "2.0.0", _with_output(f"{name} accepted the message",
                                                           output))
    if returncode < 0:
        try:
            signame = signal.Signals(-returncode).name
        except ValueError:
            signame = "unknown signal"
        return _Outcome("deferred", SIGNAL_STATUS, _with_output(
            f"{name} was killed by signal {-returncode} ({signame})", output))
    code = _ENHANCED.match(output)
    if code:
        # Postfix 2.3+: a status code at the start of the output wins over the exit status.
        rest = output[code.end():].strip() or code.group(0)
        return _Outcome("deferred" if code.group(1) == "4" else "failed", code.group(0),
                        f"{name} exited with status {returncode}: {rest}")
    enhanced, meaning = SYSEXITS.get(returncode, ("5.3.0", "unknown mail system error"))
    return _Outcome("deferred" if enhanced.startswith("4.") else "failed", enhanced,
                    _with_output(f"{name} exited with status {returncode} ({meaning})",
                                 output))


def _kill_group(pid: int) -> None:
    # The command leads its own session (start_new_session), so this also reaches the
    # children it started, which would otherwise keep running and hold the pipes open.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _address_problem(address: str) -> str | None:
    if address.startswith("-"):
        return "an address that begins with '-' is not passed to a command"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in address):
        return "an address with control characters is not passed to a command"
    return None


class PipeConnection:
    """A session of a pipe connector: one command run per item (or per recipient-limit
    group of its recipients). Nothing is kept open between items."""

    def __init__(self, config: PipeConfig, program: str, ids: Mapping[str, Any],
                 directory: str) -> None:
        self.config = config
        self.program = program              # resolved to a path by open_connection
        self.name = os.path.basename(program)
        self.ids = dict(ids)                # user=, group=, extra_groups= for the child
        self.directory = directory

    async def deliver(self, item: Item) -> list[RecipientResult]:
        results: dict[int, RecipientResult] = {}
        runnable: list[int] = []
        sender_problem = _address_problem(item.sender) if item.sender else None
        for i, r in enumerate(item.recipients):
            problem = _address_problem(r.address)
            if sender_problem:
                results[i] = failed(r.address, "5.1.7", f"sender refused: {sender_problem}")
            elif problem:
                results[i] = failed(r.address, "5.1.3", problem)
            else:
                runnable.append(i)
        # The scheduler gives items of at most recipient_limit_for() recipients; grouping
        # here again keeps {recipient} correct if an item arrives with more.
        size = self.config.recipient_limit or len(runnable) or 1
        for start in range(0, len(runnable), size):
            group = runnable[start:start + size]
            addresses = [item.recipients[i].address for i in group]
            outcome = await self._run(item, addresses)
            for i, address in zip(group, addresses):
                results[i] = outcome.result(address)
        return [results[i] for i in range(len(item.recipients))]

    async def close(self) -> None:
        """Nothing to release: every command run has ended (and been reaped) in deliver."""

    def _argv_env(self, item: Item, recipients: list[str]) -> tuple[list[str], dict[str, str]]:
        message_id = "".join(ch for ch in item.internet_message_id or ""
                             if 32 <= ord(ch) != 127)
        values = {"sender": item.sender, "recipient": recipients[0],
                  "size": str(item.size), "queue_id": str(item.message_id),
                  "message_id": message_id}
        env = {"PATH": CHILD_PATH, "LANG": os.environ.get("LANG", "C"),
               "MAILGATE_SENDER": item.sender,
               "MAILGATE_RECIPIENTS": "\n".join(recipients),
               "MAILGATE_QUEUE_ID": str(item.message_id),
               "MAILGATE_SIZE": str(item.size)}
        return [self.program, *self.config.expand(values, recipients)], env

    async def _run(self, item: Item, recipients: list[str]) -> _Outcome:
        argv, env = self._argv_env(item, recipients)
        loop = asyncio.get_running_loop()
        proto = _CommandProtocol(loop)
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: proto, *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=env, cwd=self.directory,
                start_new_session=True, **self.ids)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            # Not raised: an exception would count toward the poison threshold, and the
            # message is not at fault (the program went away, the directory is gone...).
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            return _Outcome("deferred", EXEC_STATUS, f"cannot run {self.program}: {reason}")
        feeder = asyncio.create_task(self._feed(transport, proto, item))
        deadline = asyncio.timeout(self.config.timeout)
        try:
            try:
                async with deadline:
                    await asyncio.wait({feeder, proto.exited},
                                       return_when=asyncio.FIRST_COMPLETED)
                    if feeder.done():
                        feeder.result()   # the message could not be read: raise
                    # asyncio.wait, not `await proto.exited`: a cancelled await would
                    # cancel the future itself, and the exit would never be seen.
                    await asyncio.wait({proto.exited})
            except TimeoutError:
                if not deadline.expired():
                    raise
            if proto.exited.done():
                # Output written just before exit may still be in the pipe.
                await asyncio.wait({proto.output_closed}, timeout=OUTPUT_GRACE)
        finally:
            if not feeder.done():
                feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            if not proto.exited.done():
                # Timed out, cancelled, or the message could not be read: the command
                # must not finish with what it has. Kill it and its children, and reap.
                _kill_group(transport.get_pid())
                await asyncio.wait({proto.exited}, timeout=REAP_WAIT)
                timed_out = True
            else:
                timed_out = False
            transport.close()
        if timed_out:
            return _Outcome("deferred", TIMEOUT_STATUS, _with_output(
                f"{self.name} did not finish within {self.config.timeout} s and was killed",
                proto.output.text()))
        returncode = transport.get_returncode()
        assert returncode is not None
        return interpret(self.name, returncode, proto.output.text())

    async def _feed(self, transport: asyncio.SubprocessTransport, proto: _CommandProtocol,
                    item: Item) -> None:
        """Stream the message to stdin, one chunk in memory at a time, then close it."""
        stdin = transport.get_pipe_transport(0)
        assert isinstance(stdin, asyncio.WriteTransport)
        chunks: Iterator[bytes] = iter(item.chunks())
        try:
            while not proto.stdin_closed:
                # Reading a chunk may touch the disk: never on the event loop.
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None:
                    break
                view = memoryview(chunk)
                for start in range(0, len(view), WRITE_SLICE):
                    if proto.stdin_closed:
                        # The command stopped reading; its exit status will tell.
                        return
                    stdin.write(view[start:start + WRITE_SLICE])
                    await proto.drain()
            if not proto.stdin_closed:
                stdin.close()     # EOF, once the buffered bytes are written
        finally:
            close = getattr(chunks, "close", None)
            if callable(close):
                # ValueError: the generator is still running in a worker thread (we were
                # cancelled mid-read); it is dropped when that read returns.
                with contextlib.suppress(ValueError):
                    close()


# -- the agent ----------------------------------------------------------------------------

def _resolve_program(program: str) -> str:
    path = program if "/" in program else shutil.which(program, path=CHILD_PATH)
    if path is None:
        raise AgentError(f"pipe: program '{program}' not found in PATH {CHILD_PATH} "
                         f"(give its absolute path)")
    if not os.path.exists(path):
        raise AgentError(f"pipe: program {path} does not exist")
    if not os.path.isfile(path):
        raise AgentError(f"pipe: program {path} is not a file")
    if not os.access(path, os.X_OK):
        raise AgentError(f"pipe: program {path} is not executable")
    return path


def _identity(user: str | None) -> dict[str, Any]:
    """The Popen arguments that make the child run as `user`, or none."""
    if user is None:
        return {}
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise AgentError(f"pipe: user {user} does not exist") from None
    euid = os.geteuid()
    if pw.pw_uid == euid:
        return {}   # already that user; setgroups() would need privileges for nothing
    if euid != 0:
        raise AgentError(f"pipe: mailgate runs unprivileged (uid {euid}) and cannot run "
                         f"commands as user {user}; leave the user setting out or run the "
                         f"node as root")
    # user= alone would keep the node's groups (root's gid 0): set them from the user.
    return {"user": pw.pw_uid, "group": pw.pw_gid,
            "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid)}


class PipeAgent:
    """Delivery to an external command (protocol `pipe`)."""

    settings: ClassVar[tuple[Setting, ...]] = (
        Setting("argv", "string", required=True,
                help="Command line; placeholders {sender} {recipient} {recipients} {size} "
                     "{queue_id} {message_id}. Never run by a shell."),
        Setting("recipient-limit", "int",
                help="Recipients per command run (1 when argv uses {recipient})."),
        Setting("timeout", "int", default=str(DEFAULT_TIMEOUT),
                help="Seconds a command run may take before it is killed (deferred)."),
        Setting("user", "string", help="Run the command as this user (node must be root)."),
        Setting("directory", "path", help="Working directory of the command (default /)."),
    )
    # Per connector: see recipient_limit_for().
    recipient_limit: ClassVar[int | None] = None

    @classmethod
    def check(cls, settings: Mapping[str, Any]) -> None:
        """Refuse settings a command could not be run with (AgentError, one line): an
        unknown placeholder, {recipients} inside a word, a placeholder in the program, a
        relative program path, recipient-limit other than 1 with {recipient}, a timeout
        under 1, a relative directory. Checks the text only; whether the program and the
        user exist is checked by open_connection on the node."""
        PipeConfig.parse(settings)

    @classmethod
    def recipient_limit_for(cls, settings: Mapping[str, Any]) -> int | None:
        """Recipients per item for a connector with these settings: 1 if argv uses
        {recipient}, else its recipient-limit, else None (any number)."""
        return PipeConfig.parse(settings).recipient_limit

    async def open_connection(self, next_hop: NextHop) -> PipeConnection:
        config = PipeConfig.parse(next_hop.settings)
        program = _resolve_program(config.program)
        directory = config.directory or DEFAULT_DIRECTORY
        if not os.path.isdir(directory):
            raise AgentError(f"pipe: directory {directory} does not exist")
        return PipeConnection(config, program, _identity(config.user), directory)
