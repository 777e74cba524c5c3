"""Postfix 3.7 SMTP -> Maildir throughput on this machine: the reference for issue #4's target.

Issue #4's target (>= 1,000 msg/s) was set against "Postfix 3.7 -> Maildir measured about
650 msg/s with the same tool" on a development VM whose speed varies a lot from day to day.
This script measures that Postfix here and now, so mailgate's figure from
bench/smtp_to_drop.py can be compared with a same-machine, same-time one.

It runs the Postfix extracted (not installed) under .peers/postfix (Debian bookworm's 3.7
package, `dpkg -x`, as .ci/run does) on a temp folder: its own config_directory, queue,
data directory and maillog; smtpd on a free 127.0.0.1 port; every recipient of the virtual
domain sink.test delivered by the virtual agent into one Maildir. Durability is Postfix's
own default: the queue file is fsynced before the 250, the Maildir file on delivery.
Load: exactly smtp_to_drop.py's `smtp-source -s 10 -m N -l 2000 -N` (one connection per
message, a numbered recipient each); the clock runs from the start until N files are in the
Maildir's new/ (accepted *and* delivered; counted from inotify events, as smtp_to_drop.py
counts its Drop files, so that waiting costs the measured machine nothing); the machine's
busy CPU time per message over that time is printed too (smtp_to_drop.py prints the same).
Each run starts a fresh Postfix on a fresh queue and Maildir, after the same 5 s settle
pause; the runs' folders are deleted only at the end, as smtp_to_drop.py's are. Postfix's
other settings are its defaults (process and concurrency limits, anvil, in_flow_delay;
mynetworks is exempt from anvil's limits). Prints each run, the median of
--runs runs and the Postfix version.

Usage (as root: Postfix's master must run as root):
  sudo .venv/bin/python bench/postfix_reference.py [-n 5000] [--runs 3] [--create-users]
Changes to the machine: none, except that --create-users adds the system user `postfix`
(mail_owner, also the Maildir's owner) and the system group `postdrop` (setgid_group) if
they are missing. Nothing is installed, /etc/postfix is not used and port 25 is not opened;
every Postfix process is stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pickup_to_drop import Arrivals, bench_base, run_folder, settle  # noqa: E402
from smtp_to_drop import POSTFIX, free_port, machine_cpu, smtp_source  # noqa: E402

MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"
SBIN = POSTFIX / "usr/sbin"
DAEMONS = POSTFIX / "usr/lib/postfix/sbin"
SHLIB = POSTFIX / "usr/lib/postfix"
META = POSTFIX / "etc/postfix"

# Upstream's master.cf services (the Debian package's minus its pipe examples), chroot off
# as upstream ships them, and smtpd on the bench port only.
MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{port} inet n      -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_env() -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(SHLIB)
    env.pop("MAIL_CONFIG", None)
    return env


def postfix_cmd(conf: Path, *args: str, check: bool = True) -> str:
    res = subprocess.run([str(SBIN / args[0]), "-c", str(conf), *args[1:]], env=postfix_env(),
                         capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise RuntimeError(f"{args[0]} {' '.join(args[1:])} failed ({res.returncode}):\n"
                           f"{res.stdout}{res.stderr}")
    return res.stdout


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
        return True
    except KeyError:
        return False


def ensure_accounts(create: bool) -> tuple[int, int]:
    """The uid and gid of the mail_owner; creates the accounts only if asked to."""
    if os.geteuid() != 0:
        sys.exit("run as root (e.g. sudo .venv/bin/python bench/postfix_reference.py): "
                 "Postfix's master must run as root")
    has_group, has_user = _exists(grp.getgrnam, SETGID_GROUP), _exists(pwd.getpwnam, MAIL_OWNER)
    missing = ([] if has_group else [f"group {SETGID_GROUP!r} (Postfix's setgid_group)"]) + (
        [] if has_user else [f"user {MAIL_OWNER!r} (Postfix's mail_owner)"])
    if missing and not create:
        sys.exit(f"missing on this machine: {', '.join(missing)}. Pass --create-users to "
                 f"create them (system accounts, no home), or create them yourself.")
    if not has_group:
        subprocess.run(["groupadd", "--system", SETGID_GROUP], check=True)
        print(f"created system group {SETGID_GROUP}")
    if not has_user:
        group = (["--gid", MAIL_OWNER] if _exists(grp.getgrnam, MAIL_OWNER)
                 else ["--user-group"])
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir",
                        "/nonexistent", "--shell", "/usr/sbin/nologin", *group, MAIL_OWNER],
                       check=True)
        print(f"created system user {MAIL_OWNER}")
    pw = pwd.getpwnam(MAIL_OWNER)
    return pw.pw_uid, pw.pw_gid


class Postfix:
    """A private Postfix instance on `root` (config, queue, data, maillog and Maildir)."""

    def __init__(self, root: Path, uid: int, gid: int) -> None:
        self.root = root
        self.conf = root / "etc"
        self.maillog = root / "maillog"
        self.maildir = root / "mail" / "sink" / "Maildir"
        self.port = free_port()
        self.master_pid: int | None = None
        self.pid_file = root / "queue" / "pid" / "master.pid"
        self.conf.mkdir(parents=True)
        for sub in ("tmp", "new", "cur"):
            (self.maildir / sub).mkdir(parents=True)
        for path in (root / "mail", root / "mail" / "sink", self.maildir, *self.maildir.iterdir()):
            os.chown(path, uid, gid)
        (self.conf / "master.cf").write_text(MASTER_CF.format(port=self.port))
        (self.conf / "main.cf").write_text("")
        defaults = default_param(self.conf, "import_environment")
        settings = {
            "compatibility_level": "3.6",
            "daemon_directory": str(DAEMONS),
            "command_directory": str(SBIN),
            "shlib_directory": str(SHLIB),
            "meta_directory": str(META),
            "queue_directory": str(root / "queue"),
            "data_directory": str(root / "data"),
            "mail_owner": MAIL_OWNER,
            "setgid_group": SETGID_GROUP,
            # master cleans its environment, and every daemon's, to this list.
            "import_environment": f"{defaults} LD_LIBRARY_PATH={SHLIB}",
            "maillog_file": str(self.maillog),
            # Default /var, /dev/stdout: Postfix refuses a maillog_file anywhere else.
            "maillog_file_prefixes": str(root),
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "bench.test",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            # No local delivery here; without these Postfix would look for /etc/aliases.
            "alias_maps": "",
            "alias_database": "",
            "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination",
            "virtual_mailbox_domains": "sink.test",
            "virtual_mailbox_base": str(root / "mail"),
            "virtual_mailbox_maps": "static:sink/Maildir/",
            "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}",
        }
        if uid < 100:  # below virtual_minimum_uid's default, the virtual agent would refuse it
            settings["virtual_minimum_uid"] = str(uid)
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        # `postfix` changes into the queue directory before it creates the rest.
        (root / "queue").mkdir(mode=0o755)

    def start(self) -> None:
        # `postfix start` creates the queue directories (post-install create-missing), checks
        # the instance, then starts master and waits until it has initialized.
        try:
            postfix_cmd(self.conf, "postfix", "start")
        except RuntimeError as e:
            raise RuntimeError(f"{e}maillog tail:\n{self.log_tail()}") from None
        self.master_pid = self._pid()

    def _pid(self) -> int:
        return int(self.pid_file.read_text().split()[0])

    def stop(self) -> None:
        if self.master_pid is None and self.pid_file.exists():  # start() failed half way
            self.master_pid = self._pid()
        if self.master_pid is None:
            return
        postfix_cmd(self.conf, "postfix", "stop", check=False)
        # master leads the process group of all its daemons: it ends them on SIGTERM, and
        # postfix-script's own last resort is kill -9 -pid. Make sure none is left.
        deadline = time.monotonic() + 10
        while "R" in group_states(self.master_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if "R" in group_states(self.master_pid):
            os.killpg(self.master_pid, signal.SIGKILL)
            print(f"Postfix did not stop within 10 s: killed process group {self.master_pid}",
                  file=sys.stderr)
        # Give init a moment to reap the daemons it inherited, for a clean `ps` afterwards.
        deadline = time.monotonic() + 5
        while group_states(self.master_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.master_pid = None

    def problems(self) -> list[str]:
        """The maillog's warnings and errors, but postfix-script's about the extracted tree's
        file modes (postdrop and postqueue not set-gid: not used here)."""
        try:
            lines = self.maillog.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if any(w in line for w in (
            "warning:", "error:", "fatal:", "panic:", "status=deferred", "status=bounced"))
            and "postfix-script" not in line]

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.maillog.read_text(errors="replace")
        except OSError as e:
            return f"(no maillog: {e})"
        return "\n".join(text.splitlines()[-lines:])


def group_states(pgid: int) -> set[str]:
    """R if a process of group pgid still runs, Z if one is a zombie not yet reaped."""
    states = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid:
            states.add("Z" if fields[0] == "Z" else "R")
    return states


def default_param(conf: Path, name: str) -> str:
    """A parameter's built-in default, from `postconf -c conf -d` (conf has main.cf and
    master.cf, so that postconf looks at nothing in /etc/postfix)."""
    return postfix_cmd(conf, "postconf", "-d", "-h", name).strip()


def version(base: Path) -> str:
    conf = base / "defaults"
    conf.mkdir()
    (conf / "main.cf").write_text("")
    (conf / "master.cf").write_text("")
    return default_param(conf, "mail_version")


def throughput(base: Path, k: int, n: int, uid: int, gid: int) -> tuple[float, float]:
    """msg/s, and the machine's busy CPU milliseconds per message meanwhile."""
    root = run_folder(base, k)
    root.chmod(0o755)  # as base: the mail_owner must reach its queue and the Maildir
    postfix = Postfix(root, uid, gid)
    settle()
    binary, env = smtp_source()
    arrivals: Arrivals | None = None
    try:
        postfix.start()
        arrivals = Arrivals(postfix.maildir / "new", suffix="")
        t0, cpu0 = time.perf_counter(), machine_cpu()
        res = subprocess.run([binary, "-s", "10", "-m", str(n), "-l", "2000", "-N", "-f",
                              "bench@fabrikam.test", "-t", "user@sink.test", "-M", "bench.test",
                              f"127.0.0.1:{postfix.port}"], env=env, timeout=max(300, n / 10))
        if res.returncode != 0:
            raise RuntimeError(f"smtp-source failed ({res.returncode}); maillog tail:\n"
                               f"{postfix.log_tail()}")
        try:
            arrivals.wait_for(n, stall=60)
        except TimeoutError as e:
            raise RuntimeError(f"delivery stalled: {e}; maillog tail:\n{postfix.log_tail()}"
                               ) from None
        elapsed, cpu = time.perf_counter() - t0, machine_cpu() - cpu0
    finally:
        if arrivals is not None:
            arrivals.close()
        postfix.stop()
    problems = postfix.problems()
    if problems:
        print(f"run {k}: {len(problems)} warnings or errors in the maillog, e.g.:\n"
              + "\n".join(problems[:5]))
    return n / elapsed, cpu * 1000 / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--create-users", action="store_true",
                    help=f"create the system user {MAIL_OWNER} and group {SETGID_GROUP} if "
                    "missing")
    args = ap.parse_args()
    if not (DAEMONS / "master").exists():
        sys.exit(f"no Postfix under {POSTFIX}: run .ci/run's install steps (Postfix into "
                 ".peers/)")
    uid, gid = ensure_accounts(args.create_users)
    # A plain `kill` of this script still stops Postfix (through the finally clauses).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    base = bench_base("mailgate-bench-postfix-")
    # The virtual agent delivers as the mail_owner, which must reach the Maildir.
    base.chmod(0o755)
    try:
        mail_version = version(base)
        print(f"Postfix {mail_version} (extracted in {POSTFIX}): smtp-source -s 10 -m {args.n}"
              f" -l 2000 -N -> smtpd -> virtual -> Maildir", flush=True)
        rates = []
        for run in range(args.runs):
            try:
                rate, cpu = throughput(base, run + 1, args.n, uid, gid)
            except RuntimeError as e:  # Postfix failed; it has been stopped
                sys.exit(f"run {run + 1}: {e}")
            rates.append(rate)
            print(f"run {run + 1}: {rate:,.0f} msg/s accepted and delivered; machine CPU"
                  f" {cpu:.2f} ms/msg", flush=True)
        print(f"median: {statistics.median(rates):,.0f} msg/s (Postfix {mail_version}, "
              f"{args.runs} runs of {args.n})")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
