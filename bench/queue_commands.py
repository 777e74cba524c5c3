"""Queue and message commands at scale, and the idle cost of the queue engine (issue #3).

Fills a store with N messages (default 100,000) in 50 Fax-like delivery queues, the first
holding 10,000 (put in directly through the store, every queue in Retry an hour away, so
nothing drains), then times the whole CLI process, median of --runs runs, for:
  1. `queue get`;
  2. `message get --filter "FromAddress -like 'sender7@*'" --result-size 1000`;
  3. `queue suspend` / `queue resume` of the 10,000-message queue, and
     `message suspend --filter "Queue -eq 'bench\\1'"` / `message resume ...` of its messages;
then starts `mailgate serve` on the same store and measures its CPU use over --idle
seconds while nothing is due (every queue in Retry an hour away).
Usage: python bench/queue_commands.py [-n 100000] [--runs 5] [--idle 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
QUEUES = 50


def cli(root: Path, *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([PY, "-m", "mailgate", "-c", str(root / "mailgate.toml"), *args],
                         check=True, capture_output=True, text=True, cwd=root).stdout
    return time.perf_counter() - t0, out


def fill(root: Path, n: int) -> None:
    from mailgate.store import NewDelivery, NewMessage, NewRecipient, QueueKey
    from mailgate.store.sqlite import SqliteStore

    store = SqliteStore(root / "var" / "mailgate.db", node="bench")

    async def run() -> None:
        body = (b"From: bench@contoso.test\r\nTo: x@contoso.test\r\nSubject: bench\r\n\r\n"
                + b"x" * 1800 + b"\r\n")
        for q in range(QUEUES):
            key = QueueKey("NonSmtpGatewayDelivery", f"FAX{q}", f"bench-connector-{q}")
            per_queue = big_queue(n) if q == 0 else (n - big_queue(n)) // (QUEUES - 1)
            for start in range(0, per_queue, 5000):
                await store.submit([NewMessage(
                    from_address=f"sender{i % 100}@contoso.test", content=lambda: [body],
                    subject=f"bench {i}",
                    deliveries=[NewDelivery(key, [NewRecipient(f"FAX:+{q}{i}")])])
                    for i in range(start, min(per_queue, start + 5000))])
        await store.close()
    asyncio.run(run())


def big_queue(n: int) -> int:
    """The first queue holds 10,000 messages (a tenth of smaller runs), the rest share the
    remainder."""
    return min(10_000, n // 10)


def retry_later(root: Path) -> None:
    from mailgate.clock import SystemClock
    from mailgate.store import QueueState
    from mailgate.store.sqlite import SqliteStore

    store = SqliteStore(root / "var" / "mailgate.db", node="bench")

    async def run() -> None:
        later = SystemClock().now() + 3600
        for info in await store.list_queues("bench"):
            await store.set_queue_state(info.id, QueueState(
                "Retry", "bench: gateway down", 1, later - 3600, later - 3600, later),
                force=True)
        await store.close()
    asyncio.run(run())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median_of(runs: int, fn: object) -> float:
    times = [fn() for _ in range(runs)]  # type: ignore[operator]
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--idle", type=float, default=30.0)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mailgate-bench-q-", dir=os.environ.get("BENCH_DIR")))
    try:
        (root / "mailgate.toml").write_text('[node]\nname = "bench"\ndata_dir = "./var"\n')
        cli(root, "init", str(root))
        t0 = time.perf_counter()
        fill(root, args.n)
        retry_later(root)
        print(f"filled {args.n} messages in {QUEUES} queues in {time.perf_counter() - t0:.1f}s")

        t, out = cli(root, "queue", "get", "--json")
        assert out.count('"Status": "Retry"') == QUEUES, out[:500]
        print(f"queue get: median {median_of(args.runs, lambda: cli(root, 'queue', 'get')[0]) * 1000:.0f} ms")
        flt = "FromAddress -like 'sender7@*'"
        t, out = cli(root, "message", "get", "--filter", flt, "--result-size", "1000", "--json")
        found = out.count('"Identity"')
        assert 0 < found <= 1000, out[:300]
        med = median_of(args.runs, lambda: cli(root, "message", "get", "--filter", flt,
                                               "--result-size", "1000")[0])
        print(f"message get --filter ... --result-size 1000: median {med * 1000:.0f} ms")

        # The first queue's messages, selected the Exchange way.
        per_queue = big_queue(args.n)
        flt10k = "Queue -eq 'bench\\1'"
        suspend, resume = [], []
        queue_ident = "bench\\1"
        for _ in range(args.runs):
            t, out = cli(root, "message", "suspend", "--filter", flt10k)
            assert out.strip() == f"{per_queue} message(s) suspended", out
            suspend.append(t)
            t, out = cli(root, "message", "resume", "--filter", flt10k)
            assert out.strip() == f"{per_queue} message(s) resumed", out
            resume.append(t)
        print(f"message suspend/resume --filter of {per_queue} messages: median "
              f"{statistics.median(suspend) * 1000:.0f} / {statistics.median(resume) * 1000:.0f} ms")
        qs, qr = [], []
        for _ in range(args.runs):
            qs.append(cli(root, "queue", "suspend", queue_ident)[0])
            qr.append(cli(root, "queue", "resume", queue_ident)[0])
            retry_later(root)  # resumed is Ready; only Active/Retry queues can be suspended
        print(f"queue suspend/resume of a {per_queue}-message queue: median "
              f"{statistics.median(qs) * 1000:.0f} / {statistics.median(qr) * 1000:.0f} ms")

        # Idle node: every queue in Retry an hour away (resume made one due: put it back).
        retry_later(root)
        log = open(root / "serve.log", "ab")
        proc = subprocess.Popen([PY, "-m", "mailgate", "-c", str(root / "mailgate.toml"),
                                 "serve", "--log-level", "warning"], cwd=root, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            time.sleep(5.0)  # startup and the first maintenance pass
            c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            time.sleep(args.idle)
            used = cpu_seconds(proc.pid) - c0
            print(f"idle node with {args.n} queued messages: {100 * used / (time.perf_counter() - t0):.2f} % "
                  f"of one core over {args.idle:.0f} s")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            log.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
