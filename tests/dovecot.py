"""A private Dovecot LMTP server for tests: `/usr/sbin/dovecot -F -c <config>` as a child
process, with everything (config, base_dir, state, log, Maildirs) in a folder of its own.

Only the lmtp protocol runs, on an `inet_listener` at 127.0.0.1 with a free port (and its
default UNIX socket `<base_dir>/lmtp`). Users come from a passwd-file: a listed user gets
`maildir:<folder>/mail/<user>/Maildir`, any other is refused at RCPT (550 5.1.1).

As root, Dovecot's own accounts from the Debian package do the work (`dovecot` for the
internal services and as the owner of the mail, `dovenull` for logins): Dovecot refuses to
write mail as uid 0. The folder is then made traversable (0711) for them. As any other user
every service and the mail run as that user, with no chroot.

`dovecot_or_skip()` fails the test when the binary is missing and CI=true (the CI script
installs it), and skips it otherwise.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import pytest

from tests.peers import free_port, missing

DOVECOT = "/usr/sbin/dovecot"
START_WAIT = 20.0
STOP_WAIT = 15.0


def dovecot_or_skip() -> str:
    if os.path.exists(DOVECOT):
        return DOVECOT
    reason = (f"{DOVECOT} is missing: install Debian's dovecot-lmtpd (.ci/run does) to run "
              f"the LMTP tests against a real Dovecot")
    missing(reason)


class Dovecot:
    """One private Dovecot LMTP server (use as a context manager, or start()/stop())."""

    def __init__(self, users: list[str]) -> None:
        self.binary = dovecot_or_skip()
        self.users = list(users)
        self.root = Path(tempfile.mkdtemp(prefix="mailgate-dovecot-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # Paths.

    @property
    def config(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def log(self) -> Path:
        return self.root / "dovecot.log"

    @property
    def socket_path(self) -> Path:
        return self.root / "run" / "lmtp"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / user / "Maildir"

    def messages(self, user: str) -> list[bytes]:
        """The messages in the user's Maildir (new/ and cur/), oldest first, as stored
        (Dovecot stores LF line ends and adds Return-Path and Received)."""
        found = [p for sub in ("new", "cur") if (self.maildir(user) / sub).is_dir()
                 for p in (self.maildir(user) / sub).iterdir()]
        found.sort(key=lambda p: (p.stat().st_mtime, p.name))
        return [p.read_bytes() for p in found]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # Running.

    def _accounts(self) -> tuple[str, str, str, int, int]:
        """(internal user, its group, login user, mail uid, mail gid)."""
        if os.geteuid() == 0:
            try:
                internal = pwd.getpwnam("dovecot")
                pwd.getpwnam("dovenull")
            except KeyError:
                pytest.fail("running as root needs the dovecot and dovenull users (created "
                            "by Debian's dovecot-core)")
            return ("dovecot", grp.getgrgid(internal.pw_gid).gr_name, "dovenull",
                    internal.pw_uid, internal.pw_gid)
        me = pwd.getpwuid(os.geteuid())
        return (me.pw_name, grp.getgrgid(os.getegid()).gr_name, me.pw_name, os.geteuid(),
                os.getegid())

    def _write_config(self) -> None:
        internal, group, login, uid, gid = self._accounts()
        mail = self.root / "mail"
        mail.mkdir(exist_ok=True)
        users = self.root / "users"
        users.write_text("".join(f"{u}:::::\n" for u in self.users))
        users.chmod(0o644)
        if os.geteuid() == 0:
            self.root.chmod(0o711)
            os.chown(mail, uid, gid)
        # Without root, no service can chroot; the defaults chroot these.
        no_chroot = "".join(f"service {name} {{\n  chroot =\n}}\n"
                            for name in ("anvil", "ipc", "old-stats", "aggregator"))
        self.config.write_text(f"""\
base_dir = {self.root}/run
state_dir = {self.root}/state
instance_name = mailgate-test-{self.root.name}
protocols = lmtp
listen = 127.0.0.1
log_path = {self.log}
ssl = no
first_valid_uid = 1
default_internal_user = {internal}
default_internal_group = {group}
default_login_user = {login}
mail_location = maildir:{mail}/%u/Maildir
passdb {{
  driver = passwd-file
  args = {users}
}}
userdb {{
  driver = passwd-file
  args = {users}
  default_fields = uid={uid} gid={gid} home={mail}/%u
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
{no_chroot}""")

    def start(self) -> Dovecot:
        for _ in range(5):   # another process may take the free port before Dovecot does
            self.port = free_port()
            self._write_config()
            offset = self.log.stat().st_size if self.log.exists() else 0
            with open(self.root / "stderr.log", "ab") as stderr:
                self.proc = subprocess.Popen([self.binary, "-F", "-c", str(self.config)],
                                             stdout=subprocess.DEVNULL, stderr=stderr)
            deadline = time.monotonic() + START_WAIT
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            self._stop_process()
            if "Address already in use" not in self.log_text()[offset:]:
                break
        log = self.log_text() + (self.root / "stderr.log").read_text(errors="replace")
        self.cleanup()
        pytest.fail(f"dovecot did not start:\n{log}")

    def _stop_process(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()     # the master stops its services and exits
            try:
                proc.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def stop(self) -> None:
        self._stop_process()
        self.cleanup()

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
