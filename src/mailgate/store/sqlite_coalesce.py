"""Single-message submissions coalesced into one writer job.

Each SMTP session (and each Pickup marker) submits one message at a time. Stored one job
each, a message costs the writer thread a dozen statements, and every statement gives up
the GIL and waits to get it back while the event loop is busy (see sqlite_bulk). So the
messages submitted while the writer is busy wait in one pending list, and a single job
stores them all with one multi-row statement per table.

The contract of a lone submission is kept: each message has its own future, resolved only
after the commit that made it durable, to its id (None when its source_key was already
stored, 0 when it had no deliveries) or to the error that kept it, and it alone, out.
If the multi-row insert fails, the messages are stored again one by one, each in its own
savepoint, so that one bad message does not fail the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import sqlite3
import threading
from typing import Any, Callable, Union

from mailgate.store import NewMessage, StoreError
from mailgate.store.sqlite_insert import Result

Job = Callable[[sqlite3.Connection], Any]
StoreMany = Callable[[sqlite3.Connection, list[NewMessage], float], list[Result]]
_Outcome = Union[cf.Future[int | None], asyncio.Future[int | None]]
_Pending = tuple[NewMessage, float, _Outcome]


class SubmissionCoalescer:
    """Gathers single-message submissions into the writer's next job."""

    def __init__(self, writer_submit: Callable[[Job], cf.Future[Any]],
                 store_many: StoreMany) -> None:
        self._writer_submit = writer_submit
        self._store_many = store_many
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []

    def submit(self, message: NewMessage, now: float) -> cf.Future[int | None]:
        """For callers in worker threads."""
        fut: cf.Future[int | None] = cf.Future()
        self._add(message, now, fut)
        return fut

    def submit_async(self, message: NewMessage, now: float) -> asyncio.Future[int | None]:
        """For coroutines: an asyncio future of the running loop. The whole group's futures
        are resolved with one wake-up of the loop, not one each."""
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._add(message, now, fut)
        return fut

    def _add(self, message: NewMessage, now: float, fut: _Outcome) -> None:
        with self._lock:
            self._pending.append((message, now, fut))
            first = len(self._pending) == 1
        if first:
            # One job per non-empty pending list: the job takes the whole list when it runs,
            # so everything submitted until then goes with it.
            taken: list[_Pending] = []
            job = self._writer_submit(lambda c: self._run(c, taken))
            job.add_done_callback(lambda j: self._settle(j, taken))

    def _run(self, c: sqlite3.Connection, taken: list[_Pending]) -> list[Result]:
        with self._lock:
            taken.extend(self._pending)
            self._pending = []
        messages = [m for m, _, _ in taken]
        # The latest submission time: no message is stamped before it was handed over.
        now = max(t for _, t, _ in taken)
        if len(messages) == 1:
            # Alone, its failure is the job's: the writer reports it to this message only.
            return self._store_many(c, messages, now)
        c.execute("SAVEPOINT coalesced")
        try:
            results = self._store_many(c, messages, now)
            c.execute("RELEASE coalesced")
            return results
        except Exception:  # noqa: BLE001 - retried one by one below, to isolate the culprit
            c.execute("ROLLBACK TO coalesced")
            c.execute("RELEASE coalesced")
        return [self._run_one(c, m, now) for m in messages]

    def _run_one(self, c: sqlite3.Connection, message: NewMessage, now: float) -> Result:
        c.execute("SAVEPOINT single")
        try:
            result = self._store_many(c, [message], now)[0]
            c.execute("RELEASE single")
            return result
        except Exception as exc:  # noqa: BLE001 - this message's own failure
            c.execute("ROLLBACK TO single")
            c.execute("RELEASE single")
            return StoreError(str(exc)) if isinstance(exc, sqlite3.Error) else exc

    def _settle(self, job: cf.Future[Any], taken: list[_Pending]) -> None:
        """Runs once the job's group has committed (or failed): resolves each message."""
        if not taken:
            # The job never ran (the store closed, or could not open): what it would have
            # taken is still pending, and no other job was scheduled for it.
            with self._lock:
                taken.extend(self._pending)
                self._pending = []
        error = job.exception()
        results = job.result() if error is None else [error] * len(taken)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Result]]] = {}
        for (_, _, fut), result in zip(taken, results):
            if isinstance(fut, asyncio.Future):
                by_loop.setdefault(fut.get_loop(), []).append((fut, result))
            elif isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
        for loop, outcomes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, outcomes)
            except RuntimeError:   # the loop is closed: nobody waits for these any more
                pass


def _resolve(outcomes: list[tuple[asyncio.Future[Any], Result]]) -> None:
    for fut, result in outcomes:
        if fut.done():   # its caller gave up (a session closed meanwhile)
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
