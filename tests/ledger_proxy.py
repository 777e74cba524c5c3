"""A TCP proxy that keeps the client's ledger of an SMTP load it cannot keep itself:
Postfix's smtp-source reports no per-message outcome, so the proxy reads both directions
and records, per connection, the recipients of every transaction the server acknowledged
with `250` at the end of DATA (reliability catalogue, "ledger rule")."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from tests.peers import free_port


class LedgerProxy:
    """127.0.0.1:<port> → 127.0.0.1:<target>; `acked` holds acknowledged recipients."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.acked: list[str] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="ledger-proxy", daemon=True)
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> LedgerProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._session, "127.0.0.1", self.port)
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _session(self, client_r: asyncio.StreamReader,
                       client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            client_w.close()
            return
        # One entry per reply still to come, in order (replies are strictly ordered, even
        # when the client pipelines): the greeting, each command, each end of data with
        # the recipients accepted for it.
        expected: list[tuple[str, list[str]]] = [("greeting", [])]

        async def upstream() -> None:
            try:
                await relay_commands()
            finally:   # also when the client resets: the server side must not wait on
                server_w.close()

        async def relay_commands() -> None:
            in_data = False
            while line := await client_r.readline():
                if in_data:
                    if line == b".\r\n":
                        in_data = False
                        expected.append(("eod", []))
                    server_w.write(line)
                    await server_w.drain()
                    continue
                upper = line.upper()
                if upper.startswith(b"RCPT TO:"):
                    expected.append(("rcpt", [line[8:].split(b">")[0].strip(b" <")
                                              .decode("utf-8", "replace")]))
                elif upper.startswith(b"DATA"):
                    expected.append(("data", []))
                    in_data = True
                elif upper.startswith((b"MAIL FROM:", b"RSET")):
                    expected.append(("reset", []))
                else:
                    expected.append(("other", []))
                server_w.write(line)
                await server_w.drain()

        async def downstream() -> None:
            try:
                await relay_replies()
            finally:   # also when the node dies with a reset: the client must see it
                client_w.close()

        async def relay_replies() -> None:
            while line := await server_r.readline():
                client_w.write(line)
                await client_w.drain()
                if len(line) < 4 or line[3:4] != b" " or not expected:
                    continue                     # a continuation line of a reply
                kind, what = expected.pop(0)
                if kind == "rcpt" and line.startswith(b"2"):
                    # Accepted: part of the transaction whose end of data comes later.
                    pending.extend(what)
                elif kind == "reset" or (kind == "data" and not line.startswith(b"354")):
                    pending.clear()
                elif kind == "eod":
                    if line.startswith(b"250"):
                        with self._lock:
                            self.acked.extend(pending)
                    pending.clear()

        pending: list[str] = []
        try:
            await asyncio.gather(upstream(), downstream(), return_exceptions=True)
        finally:
            for w in (client_w, server_w):
                w.close()
