"""Pickup -> Drop directory throughput and latency, fully durable (issue #2).

Runs a real `mailgate serve` on a temp folder with the demo organization and measures:
  1. throughput: N messages of ~2 KB moved into the Pickup directory at once; time from the
     first file until all N files are in the Fax connector's Drop directory;
  2. latency: single messages, one at a time on an idle node, Pickup -> Drop file;
  3. a 50 MB message Pickup -> Drop, with the node's peak RSS (VmHWM);
  4. `mailgate queue get` wall time with 100,000 messages queued.
Prints figures and the median of --runs runs. Usage: python bench/pickup_to_drop.py [-n 5000]
"""

from __future__ import annotations

import argparse
import array
import ctypes
import fcntl
import os
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable


def cli(root: Path, *args: str) -> str:
    return subprocess.run([PY, "-m", "mailgate", "-c", str(root / "mailgate.toml"), *args],
                          check=True, capture_output=True, text=True, cwd=root).stdout


class Node:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = open(root / "serve.log", "ab")
        self.proc = subprocess.Popen([PY, "-m", "mailgate", "-c", str(root / "mailgate.toml"),
                                      "serve", "--log-level", "warning"], cwd=root,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        time.sleep(1.0)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def setup(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "mailgate.toml").write_text('[node]\nname = "bench"\ndata_dir = "./var"\n')
    cli(root, "init", str(root), "--demo")
    return root / "var" / "pickup", root / "var" / "drop" / "Fax"


def settle(seconds: float = 5.0) -> None:
    """Let the disk finish the previous run's writeback and discards before measuring.
    (A run right after thousands of deletions in the same inode group is slower still:
    bench/README.md, "Recently deleted files".)"""
    os.sync()
    time.sleep(seconds)


def message(i: int, size: int = 2048) -> bytes:
    head = (f"From: bench@contoso.test\r\nTo: IMCEAFAX-+2B1555{i:07d}@contoso.test\r\n"
            f"Subject: bench {i}\r\nMessage-ID: <bench-{i}@contoso.test>\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + body


# ioctl numbers and the flag from <linux/fs.h>: FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_TOPDIR_FL.
_GETFLAGS, _SETFLAGS, _TOPDIR = 0x80086601, 0x40086602, 0x00020000


def bench_base(prefix: str) -> Path:
    """A new temp folder for a bench's runs, marked as the top of a directory hierarchy
    (`chattr +T`) where the filesystem knows the flag (ext2/3/4), so that each run's folder
    is placed in an inode group of its own (bench/README.md, "Recently deleted files")."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("BENCH_DIR")))
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            flags = array.array("l", [0])
            fcntl.ioctl(fd, _GETFLAGS, flags, True)
            flags[0] |= _TOPDIR
            fcntl.ioctl(fd, _SETFLAGS, flags, True)
        finally:
            os.close(fd)
    except OSError:
        pass  # another filesystem: it places folders its own way
    return base


def run_folder(base: Path, k: int) -> Path:
    """A new folder in `base` for run k, to be deleted only with `base` when the bench ends,
    so that no run follows a run's mass deletion (bench/README.md, "Recently deleted
    files"). Its name is random: ext4 starts the search for a top-level folder's inode group
    from a hash of its name, so a fixed name would put every bench's run k in the same group
    as the last bench's (deleted) run k."""
    return Path(tempfile.mkdtemp(prefix=f"run{k}-", dir=base))


def count_eml(folder: Path, suffix: str = ".eml") -> int:
    with os.scandir(folder) as it:
        return sum(1 for e in it if e.name.endswith(suffix))


class Arrivals:
    """Counts files (names ending in `suffix`) renamed or linked into a folder, from inotify
    events. Waiting this way costs the measured machine almost nothing; rescanning a folder
    of thousands of files every few milliseconds took a sixth of the 2-core machine's CPU
    from the node. (mailgate renames its Drop files into place; Postfix links its Maildir
    files into new/.)"""

    IN_CREATE = 0x100
    IN_MOVED_TO = 0x080

    def __init__(self, folder: Path, suffix: str = ".eml") -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0 or self.libc.inotify_add_watch(
                self.fd, os.fsencode(folder), self.IN_MOVED_TO | self.IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), "inotify unavailable")
        self.folder = folder
        self.suffix = suffix
        self.count = 0

    def wait_for(self, n: int, stall: float | None = None) -> None:
        """Returns once n files have arrived; with `stall`, TimeoutError when none arrives
        for that many seconds."""
        header = struct.Struct("iIII")
        suffix = os.fsencode(self.suffix)
        while self.count < n:
            if stall is not None and not select.select([self.fd], [], [], stall)[0]:
                raise TimeoutError(f"{self.count} of {n} files after no arrival for "
                                   f"{stall:g} s")
            data = os.read(self.fd, 1 << 20)
            pos = 0
            while pos < len(data):
                _, _, _, length = header.unpack_from(data, pos)
                name = data[pos + header.size:pos + header.size + length].rstrip(b"\0")
                pos += header.size + length
                if name.endswith(suffix):
                    self.count += 1
        # The events are only a cheap clock; the folder itself is the proof.
        assert count_eml(self.folder, self.suffix) >= n

    def close(self) -> None:
        os.close(self.fd)


def throughput(base: Path, k: int, n: int) -> float:
    # The Pickup directory's own deletions during the run are part of the load.
    root = run_folder(base, k)
    pickup, drop = setup(root)
    stage = root / "stage"
    stage.mkdir()
    for i in range(n):
        (stage / f"m{i:06d}.eml").write_bytes(message(i))
    settle()
    node = Node(root)
    arrivals = Arrivals(drop)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            os.rename(stage / f"m{i:06d}.eml", pickup / f"m{i:06d}.eml")
        arrivals.wait_for(n)
        elapsed = time.perf_counter() - t0
    finally:
        arrivals.close()
        node.stop()
    return n / elapsed


def latency(base: Path, runs: int) -> list[float]:
    root = base / "lat"
    pickup, drop = setup(root)
    node = Node(root)
    out = []
    try:
        for i in range(runs):
            data = message(i)
            tmp = root / f"l{i}.tmp"
            tmp.write_bytes(data)
            before = count_eml(drop)
            t0 = time.perf_counter()
            os.rename(tmp, pickup / f"l{i}.eml")
            while count_eml(drop) == before:
                time.sleep(0.0005)
            out.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.05)
    finally:
        node.stop()
    shutil.rmtree(root)
    return out


def big_message(base: Path, mb: int = 50) -> tuple[float, float]:
    root = base / "big"
    pickup, drop = setup(root)
    src = root / "big.tmp"
    with open(src, "wb") as f:
        f.write(b"From: bench@contoso.test\r\nTo: IMCEAFAX-+2B15550000@contoso.test\r\n"
                b"Subject: big\r\n\r\n")
        line = b"x" * 76 + b"\r\n"
        for _ in range(mb * 1024 * 1024 // len(line)):
            f.write(line)
    node = Node(root)
    try:
        t0 = time.perf_counter()
        os.rename(src, pickup / "big.eml")
        while count_eml(drop) < 1:
            time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        rss = node.peak_rss_mb()
    finally:
        node.stop()
    shutil.rmtree(root)
    return elapsed, rss


def queue_get(base: Path, n: int) -> float:
    """Time `mailgate queue get` with n messages queued (put in the store directly, into a
    Fax queue whose Drop directory is missing so nothing drains)."""
    import asyncio

    from mailgate.store import NewDelivery, NewMessage, NewRecipient, QueueKey
    from mailgate.store.sqlite import SqliteStore

    root = base / "qg"
    setup(root)
    store = SqliteStore(root / "var" / "mailgate.db", node="bench")

    async def fill() -> None:
        key = QueueKey("NonSmtpGatewayDelivery", "FAX", "bench-connector")
        body = message(0)
        for start in range(0, n, 5000):
            batch = [NewMessage(from_address="bench@contoso.test", content=lambda: [body],
                                deliveries=[NewDelivery(key, [NewRecipient(f"FAX:+{i}")])])
                     for i in range(start, min(n, start + 5000))]
            await store.submit(batch)
        await store.close()
    asyncio.run(fill())
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        out = cli(root, "queue", "get")
        times.append(time.perf_counter() - t0)
    assert str(n) in out, out
    shutil.rmtree(root)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--latency-samples", type=int, default=30)
    ap.add_argument("--queued", type=int, default=100_000)
    ap.add_argument("--skip", default="", help="comma list of: throughput,latency,big,queue")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    base = bench_base("mailgate-bench-")
    try:
        if "throughput" not in skip:
            rates = [throughput(base, k + 1, args.n) for k in range(args.runs)]
            print(f"throughput: {args.n} x 2 KB Pickup -> Drop: "
                  f"{', '.join(f'{r:.0f}' for r in rates)} msg/s; "
                  f"median {statistics.median(rates):.0f} msg/s")
        if "latency" not in skip:
            lat = latency(base, args.latency_samples)
            q = statistics.quantiles(lat, n=100)
            print(f"latency: Pickup -> Drop, {len(lat)} single messages: p50 "
                  f"{statistics.median(lat):.1f} ms, p90 {q[89]:.1f} ms, max {max(lat):.1f} ms")
        if "big" not in skip:
            res = [big_message(base) for _ in range(args.runs)]
            print(f"50 MB message Pickup -> Drop: {', '.join(f'{t:.2f}s' for t, _ in res)}; "
                  f"node peak RSS {', '.join(f'{r:.0f}' for _, r in res)} MB; median "
                  f"{statistics.median(r for _, r in res):.0f} MB")
        if "queue" not in skip:
            t = queue_get(base, args.queued)
            print(f"queue get with {args.queued} messages queued: median {t * 1000:.0f} ms "
                  f"(whole CLI process)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
