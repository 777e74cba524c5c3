"""Shared fixtures: a node's config in a temp folder, the real CLI and `mailgate serve` as
subprocesses, and a wait helper. Tests never touch ./var or fixed ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

NODE = "testnode"


def wait_for(predicate: Callable[[], object], timeout: float = 10.0,
             interval: float = 0.02, what: str = "condition") -> object:
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class MailgateEnv:
    """One node's folder: config, data dir, the CLI and a `mailgate serve` process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "mailgate.toml"
        self.data = root / "var"
        self.config.write_text(f'[node]\nname = "{NODE}"\ndata_dir = "./var"\n')
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "serve.log"

    @property
    def pickup(self) -> Path:
        return self.data / "pickup"

    @property
    def drop(self) -> Path:
        return self.data / "drop"

    def maildir(self, address: str) -> Path:
        return self.data / "mailboxes" / address.lower() / "Maildir"

    def cli(self, *args: str, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "mailgate", "-c", str(self.config), *args],
                              capture_output=True, text=True, cwd=self.root, input=input,
                              timeout=60)
        if check and proc.returncode != 0:
            pytest.fail(f"mailgate {' '.join(args)} failed ({proc.returncode}):\n"
                        f"{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self, env: dict[str, str] | None = None,
              may_die: bool = False) -> subprocess.Popen[bytes]:
        """Start `mailgate serve` and wait until it has started (`may_die`: a process that
        dies right after starting, e.g. on a crash hook, is not an error)."""
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.log, "ab")
        offset = log.tell()  # the log of earlier runs is kept: look only at this run's
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailgate", "-c", str(self.config), "serve"],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})})
        log.close()
        wait_for(lambda: b"started" in self.log.read_bytes()[offset:]
                 or self.proc.poll() is not None,
                 timeout=20, what="mailgate serve to start")
        assert may_die or self.proc.poll() is None, self.log.read_text()
        return self.proc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[MailgateEnv]:
    e = MailgateEnv(tmp_path)
    yield e
    e.stop()


def drop_file(folder: Path, name: str, data: bytes) -> Path:
    """Write a file the supported way: elsewhere, then rename into the folder."""
    tmp = folder.parent / f".{name}.writing"
    tmp.write_bytes(data)
    final = folder / name
    os.rename(tmp, final)
    return final


class NodeThread:
    """A real Node (store, Pickup, queues, deliverers) running in a background thread of
    the test process: faster than a subprocess, and the test can inject a clock."""

    def __init__(self, env: MailgateEnv, clock: object | None = None,
                 resolver: object | None = None) -> None:
        import asyncio
        import threading

        from mailgate.node import Node
        from mailgate.settings import load_settings

        self.settings = load_settings(str(env.config))
        self.node = Node(self.settings, clock=clock,  # type: ignore[arg-type]
                         resolver=resolver)  # type: ignore[arg-type]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._started = threading.Event()

        def main() -> None:
            async def run() -> None:
                self._loop = asyncio.get_running_loop()
                self._started.set()
                await self.node.run()
            try:
                asyncio.run(run())
            except BaseException as exc:  # noqa: BLE001 - reported by stop()
                self._error = exc
                self._started.set()

        self._thread = threading.Thread(target=main, name="test-node", daemon=True)
        self._thread.start()
        self._started.wait(10)

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.node.stop)
        self._thread.join(30)
        assert not self._thread.is_alive(), "node did not stop"
        if self._error is not None:
            raise self._error


@pytest.fixture
def demo_env(env: MailgateEnv) -> MailgateEnv:
    """A node folder with the demo organization (contoso.test, alice, Fax connector)."""
    env.cli("init", str(env.root), "--demo")
    return env


@pytest.fixture
def node(demo_env: MailgateEnv) -> Iterator[NodeThread]:
    """The demo organization served by an in-process node."""
    n = NodeThread(demo_env)
    yield n
    n.stop()
