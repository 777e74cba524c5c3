"""Delivery Agent connector throughput (issue #5).

Puts N messages (~2 KB, one recipient each) straight into a DeliveryAgent queue through the
store, starts `mailgate serve`, and times until the queue is empty, for:
  1. a no-op agent (a plugin package generated and pip-installed into a temporary folder,
     found through its entry point) with MaxConcurrentConnections 5;
  2. the built-in webhook agent against a local HTTP server (ThreadingHTTPServer in this
     process) answering 200, with MaxConcurrentConnections 5.
Each run's folder is kept until the bench ends (bench/README.md, "Recently deleted files").
Prints each run and the median. Usage: python bench/agent_throughput.py [-n 5000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pickup_to_drop import bench_base, run_folder  # noqa: E402

PY = sys.executable
_runs = itertools.count(1)  # each run gets a folder of its own, deleted when the bench ends

NOOP = '''
from mailgate.deliver.agents.api import delivered

class NoopAgent:
    settings = ()
    recipient_limit = None

    async def open_connection(self, next_hop):
        return NoopConnection()

class NoopConnection:
    async def deliver(self, item):
        return [delivered(r.address) for r in item.recipients]

    async def close(self):
        pass
'''


def install_noop(folder: Path) -> Path:
    pkg = folder / "noop-src"
    (pkg / "bench_noop_agent").mkdir(parents=True)
    (pkg / "bench_noop_agent" / "__init__.py").write_text(NOOP)
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling>=1.25,<2"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "bench-noop-agent"\nversion = "1.0"\n'
        '[project.entry-points."mailgate.delivery_agents"]\n'
        'noop = "bench_noop_agent:NoopAgent"\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["bench_noop_agent"]\n')
    target = folder / "plugins"
    subprocess.run([PY, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    str(target), str(pkg)], check=True)
    return target


def cli(root: Path, env: dict[str, str], *args: str) -> str:
    return subprocess.run([PY, "-m", "mailgate", "-c", str(root / "mailgate.toml"), *args],
                          check=True, capture_output=True, text=True, cwd=root,
                          env=env).stdout


def fill(root: Path, n: int, connector_guid: str, space: str) -> None:
    from mailgate.store import NewDelivery, NewMessage, NewRecipient, QueueKey
    from mailgate.store.sqlite import SqliteStore

    store = SqliteStore(root / "var" / "mailgate.db", node="bench")
    body = (b"From: bench@contoso.test\r\nTo: x@contoso.test\r\nSubject: bench\r\n\r\n"
            + b"x" * 1900 + b"\r\n")

    async def run() -> None:
        key = QueueKey("DeliveryAgent", space, connector_guid)
        for start in range(0, n, 5000):
            await store.submit([NewMessage(
                from_address="bench@contoso.test", content=lambda: [body],
                deliveries=[NewDelivery(key, [NewRecipient(f"{space}:+{i}")])])
                for i in range(start, min(n, start + 5000))])
        await store.close()
    asyncio.run(run())


def queued(root: Path) -> int:
    import sqlite3

    db = sqlite3.connect(root / "var" / "mailgate.db")
    try:
        return int(db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0])
    finally:
        db.close()


def one_run(base: Path, n: int, protocol: str, settings: list[str], env: dict[str, str]
            ) -> float:
    root = run_folder(base, next(_runs))
    (root / "mailgate.toml").write_text('[node]\nname = "bench"\ndata_dir = "./var"\n')
    cli(root, env, "init", str(root))
    import json

    made = json.loads(cli(root, env, "delivery-agent-connector", "new", "--name", "Bench",
                          "--address-spaces", "BENCH:*;1", "--delivery-protocol", protocol,
                          "--max-concurrent-connections", "5", *settings, "--json"))
    fill(root, n, made["Guid"], "BENCH")
    subprocess.run(["sync"], check=False)
    log = open(root / "serve.log", "ab")
    t0 = time.perf_counter()
    proc = subprocess.Popen([PY, "-m", "mailgate", "-c", str(root / "mailgate.toml"), "serve",
                             "--log-level", "warning"], cwd=root, stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    try:
        while queued(root):
            if proc.poll() is not None:
                raise SystemExit((root / "serve.log").read_text())
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    return n / elapsed


class Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    base = bench_base("mailgate-bench-agent-")
    try:
        plugins = install_noop(base)
        env = {**os.environ, "PYTHONPATH": str(plugins)}
        rates = [one_run(base, args.n, "noop", [], env) for _ in range(args.runs)]
        print(f"no-op agent, 5 connections: {', '.join(f'{r:.0f}' for r in rates)} msg/s; "
              f"median {statistics.median(rates):.0f} msg/s (including node start-up)")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"url=http://127.0.0.1:{server.server_port}/post"
            rates = [one_run(base, args.n, "webhook", ["--setting", url], env)
                     for _ in range(args.runs)]
        finally:
            server.shutdown()
            server.server_close()
        print(f"webhook agent, 5 connections, local HTTP server: "
              f"{', '.join(f'{r:.0f}' for r in rates)} msg/s; "
              f"median {statistics.median(rates):.0f} msg/s (including node start-up)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
