"""SMTP -> Drop directory throughput, latency and memory, fully durable (issue #4).

Runs a real `mailgate serve` on a temp folder (demo organization, plus an InternalRelay
domain sink.test routed by a Foreign connector to its Drop directory, and a Receive
connector on a free loopback port) and measures:
  1. throughput: Postfix's `smtp-source -s 10 -m N -l 2000` (one connection per message, a
     numbered recipient each), time from the start until all N Drop files are written
     (accepted *and* delivered, each 250 after an fsynced commit);
  2. latency under that load: a probe client sends one message every 20 ms meanwhile and
     times end of DATA -> 250 (p50, p99);
  3. the node's peak RSS during the load, and with one 50 MB message over SMTP;
  4. the whole machine's busy CPU time per message during the load (node, smtp-source and
     kernel), comparable with bench/postfix_reference.py's.
Each run's folder is kept until the bench ends (bench/README.md, "Recently deleted files",
says why). Prints figures and the median of --runs runs. smtp-source comes from .peers/postfix
(.ci/run extracts it) or PATH.
Usage: python bench/smtp_to_drop.py [-n 5000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pickup_to_drop import Arrivals, Node, bench_base, cli, run_folder, settle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POSTFIX = ROOT / ".peers" / "postfix"


def smtp_source() -> tuple[str, dict[str, str]]:
    env = dict(os.environ)
    found = shutil.which("smtp-source")
    if found is None and (POSTFIX / "usr/sbin/smtp-source").exists():
        found = str(POSTFIX / "usr/sbin/smtp-source")
        env["LD_LIBRARY_PATH"] = str(POSTFIX / "usr/lib/postfix")
    if found is None:
        sys.exit("smtp-source not found: run .ci/run's install steps (Postfix into .peers/)")
    return found, env


def machine_cpu() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq) since
    boot, from /proc/stat: over a run, the node's (or Postfix's), smtp-source's and the
    kernel's work together. Per message it drifts less with the VM's speed than msg/s."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:8]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields)
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup(root: Path) -> tuple[int, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "mailgate.toml").write_text('[node]\nname = "bench"\ndata_dir = "./var"\n')
    cli(root, "init", str(root), "--demo")
    cli(root, "accepted-domain", "new", "--domain-name", "sink.test", "--domain-type",
        "internal-relay")
    cli(root, "foreign-connector", "new", "--name", "Sink", "--address-spaces", "sink.test;1")
    drop = root / "var" / "drop" / "Sink"
    drop.mkdir(parents=True)
    port = free_port()
    cli(root, "receive-connector", "new", "--name", "Bench", "--bindings",
        f"127.0.0.1:{port}", "--permission-groups", "AnonymousUsers",
        "--max-inbound-connection-per-source", "200", "--max-message-size", "100MB")
    return port, drop


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Probe(threading.Thread):
    """Sends a message every `interval` s on its own connection; times DATA's end -> 250."""

    def __init__(self, port: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.port, self.interval = port, interval
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        body = b"Subject: probe\r\n\r\n" + (b"x" * 78 + b"\r\n") * 25
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as c:
            c.ehlo("probe.test")
            i = 0
            while not self.stop.is_set():
                i += 1
                c.mail("probe@fabrikam.test")
                c.rcpt(f"probe{i}@sink.test")
                c.putcmd("data")
                c.getreply()
                c.send(body + b".\r\n")
                t0 = time.perf_counter()
                code, text = c.getreply()
                if code == 250:
                    self.latencies.append(time.perf_counter() - t0)
                else:
                    self.errors.append(f"{code} {text!r}")
                time.sleep(self.interval)


def throughput(base: Path, k: int, n: int) -> tuple[float, float, float, float, float]:
    root = run_folder(base, k)
    port, drop = setup(root)
    settle()
    node = Node(root)
    wait_port(port)
    arrivals = Arrivals(drop)
    binary, env = smtp_source()
    probe = Probe(port)
    try:
        t0, cpu0 = time.perf_counter(), machine_cpu()
        probe.start()
        subprocess.run([binary, "-s", "10", "-m", str(n), "-l", "2000", "-N", "-f",
                        "bench@fabrikam.test", "-t", "user@sink.test", "-M", "bench.test",
                        f"127.0.0.1:{port}"], env=env, check=True)
        probe.stop.set()
        probe.join(30)
        arrivals.wait_for(n + len(probe.latencies))
        elapsed, cpu = time.perf_counter() - t0, machine_cpu() - cpu0
        rss = node.peak_rss_mb()
    finally:
        arrivals.close()
        node.stop()
    if probe.errors:
        print(f"probe errors: {len(probe.errors)}, e.g. {probe.errors[0]}")
    lat = sorted(probe.latencies)
    p50 = lat[len(lat) // 2] * 1000 if lat else float("nan")
    p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else float("nan")
    return n / elapsed, p50, p99, rss, cpu * 1000 / (n + len(lat))


def big_message(base: Path, mb: int = 50) -> tuple[float, float]:
    root = base / "big"
    port, drop = setup(root)
    node = Node(root)
    wait_port(port)
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij\r\n"
    body = b"Subject: big\r\n\r\n" + line * (mb * 1024 * 1024 // len(line))
    try:
        t0 = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", port, timeout=300) as c:
            c.sendmail("bench@fabrikam.test", ["big@sink.test"], body)
        while not list(drop.glob("*.eml")):
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        rss = node.peak_rss_mb()
    finally:
        node.stop()
    shutil.rmtree(root)
    return elapsed, rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    base = bench_base("mailgate-bench-smtp-")
    try:
        rates, p50s, p99s, rsss = [], [], [], []
        for run in range(args.runs):
            rate, p50, p99, rss, cpu = throughput(base, run + 1, args.n)
            rates.append(rate)
            p50s.append(p50)
            p99s.append(p99)
            rsss.append(rss)
            print(f"run {run + 1}: {rate:,.0f} msg/s accepted and delivered; probe end of DATA"
                  f" -> 250 p50 {p50:.1f} ms, p99 {p99:.1f} ms; node peak RSS {rss:.0f} MB;"
                  f" machine CPU {cpu:.2f} ms/msg", flush=True)
        print(f"median: {statistics.median(rates):,.0f} msg/s (target >= 1,000); p99 "
              f"{statistics.median(p99s):.1f} ms (target <= 50); peak RSS "
              f"{statistics.median(rsss):.0f} MB (target <= 300)")
        elapsed, rss = big_message(base)
        print(f"50 MB message over SMTP -> Drop: {elapsed:.1f} s, node peak RSS {rss:.0f} MB "
              f"(target <= 200)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
