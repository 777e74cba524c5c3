"""Confirmed hand-off for Foreign connectors (PRODUCT §4.6, beyond Exchange).

With DeliveryConfirmation on, a message written to the connector's Drop directory is not
done: it stays in its queue as AwaitingConfirmation (LastError says which file and until
when) until the gateway answers next to the drop file `<stem>.eml`:

- `<stem>.ack`: delivered (DELIVER, source GATEWAY; a DSN with Action delivered for the
  recipients that asked for NOTIFY=SUCCESS). The first line of the file, if any, is kept
  as the gateway's text.
- `<stem>.nack`: one line per recipient that was not delivered, `<address> <status>
  <text>`, the status an enhanced code (`5.1.1`) optionally after a reply code
  (`550 5.1.1`). 5.x.x fails the recipient (FAIL and an NDR with the gateway's text), 4.x.x
  defers it (DEFER; dropped again after MessageRetryInterval), 2.x.x delivers it. A line
  that begins with a status instead of an address applies to every recipient the file does
  not name. Recipients the file does not name are delivered when it names any; a `.nack`
  naming nobody fails every recipient (5.0.0, with its first line as the text).
- no answer by ConfirmationTimeout: ConfirmationTimeoutAction decides. Fail: an NDR
  (5.4.7); Delivered: assumed delivered (a DSN with Action relayed for NOTIFY=SUCCESS);
  Retry: the drop file is taken back (deleted if the gateway has not taken it) and the
  message is dropped again. For Fail the drop file is deleted too, before the NDR is
  recorded, so that a gateway that comes back late does not deliver a message that was
  reported failed.

`<stem>.eml.ack` and `<stem>.eml.nack` are accepted too. An answer is read when it is at
least a second old (gateways should write it under another name and rename it), at most
its first 64 KiB; it is deleted once its outcome is committed. Answers that match no
awaiting message of this node are left alone for the administrator (logged once).
Messages awaiting confirmation do not expire; the confirmation timeout bounds their stay.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mailgate import tracking
from mailgate.aio import log_failure
from mailgate.clock import iso
from mailgate.core.status import Status
from mailgate.core.text import one_line
from mailgate.core.units import format_duration
from mailgate.deliver.agents.api import RecipientResult
from mailgate.deliver.drop import drop_file_name
from mailgate.directory import OrganizationCache
from mailgate.dsn import DELIVERED, RELAYED
from mailgate.organization import ForeignConnector, Organization
from mailgate.store import ClaimedDelivery, DeliveryResult

if TYPE_CHECKING:
    from mailgate.queue.delivery import Deliverers

log = logging.getLogger(__name__)

POLL = 1.0             # seconds between looks at the Drop directories
SETTLE = 1.0           # an answer younger than this may still be being written
READ_LIMIT = 64 * 1024
ACK, NACK = "ack", "nack"
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}")
_REPLY = re.compile(r"[245]\d\d")


@dataclass(frozen=True)
class Answer:
    """A gateway's answer file for one drop file."""

    path: Path
    kind: str            # ACK or NACK
    text: bytes


def leading_status(words: list[str]) -> tuple[str, int] | None:
    """The enhanced status code at the start of `words` (`5.1.1`, or `550 5.1.1` with the
    same class) and how many words it took; None when they do not start with one."""
    if words and _ENHANCED.fullmatch(words[0]):
        return words[0], 1
    if (len(words) > 1 and _REPLY.fullmatch(words[0]) and _ENHANCED.fullmatch(words[1])
            and words[0][0] == words[1][0]):
        return words[1], 2
    return None


def _result(address: str, enhanced: str, text: str) -> RecipientResult:
    if enhanced.startswith("2"):
        return RecipientResult(address, "delivered", f"250 {enhanced} {text}")
    if enhanced.startswith("4"):
        return RecipientResult(address, "deferred", f"451 {enhanced} {text}")
    return RecipientResult(address, "failed", f"550 {enhanced} {text}")


def parse_nack(text: bytes, recipients: list[str]) -> dict[str, RecipientResult]:
    """Per-recipient outcomes of a `.nack` file (see the module docstring)."""
    known = {a.casefold(): a for a in recipients}
    named: dict[str, RecipientResult] = {}
    everyone: RecipientResult | None = None
    first = ""
    for raw in text.splitlines():
        words = one_line(raw).split(" ")
        if words == [""]:
            continue
        first = first or " ".join(words)
        status = leading_status(words)
        if status is not None:          # "<status> <text>": every recipient not named
            if everyone is None:
                everyone = _result("", status[0], _gateway(" ".join(words[status[1]:])))
            continue
        address = known.get(words[0].strip("<>").casefold())
        if address is None:
            continue                    # not a recipient of this file: ignored
        status = leading_status(words[1:]) or ("5.0.0", 0)
        named[address] = _result(address, status[0],
                                 _gateway(" ".join(words[1 + status[1]:])))
    out: dict[str, RecipientResult] = {}
    for address in recipients:
        if address in named:
            out[address] = named[address]
        elif everyone is not None:
            out[address] = RecipientResult(address, everyone.outcome, everyone.status)
        elif named:
            out[address] = RecipientResult(address, "delivered",
                                           "250 2.0.0 not named in the gateway's .nack")
        else:
            out[address] = _result(address, "5.0.0", _gateway(
                first or "empty .nack file: the gateway refused the message"))
    return out


def _gateway(text: str) -> str:
    return f"gateway: {text}" if text else "refused by the gateway"


class Confirmations:
    """Turns gateways' `.ack`/`.nack` files and confirmation timeouts into outcomes."""

    def __init__(self, deliverers: Deliverers) -> None:
        self.d = deliverers
        self._reported: set[str] = set()

    def handed_off(self, connector: ForeignConnector, d: ClaimedDelivery,
                   file_name: str) -> DeliveryResult:
        """The result of a drop file written for a connector with DeliveryConfirmation."""
        until = self.d.clock.now() + connector.confirmation_timeout
        note = (f"awaiting the gateway's confirmation of {file_name} (.ack or .nack) until "
                f"{iso(until)}")
        res = DeliveryResult(d.id, d.message_id, awaiting_until=until, note=note)
        res.tracking.append(self.d.event(
            d, tracking.DEFER, tracking.GATEWAY, [r.address for r in d.recipients],
            [f"250 2.0.0 written to the Drop directory; {note}"] * len(d.recipients),
            connector_id=connector.name, source_context=file_name))
        return res

    async def run(self, orgs: OrganizationCache) -> None:
        """Look at the Drop directories every POLL seconds (the node's task)."""
        while True:
            await asyncio.sleep(POLL)
            try:
                await self.check(await orgs.get())
            except Exception as exc:  # noqa: BLE001 - keep looking; the next poll retries
                log_failure(log, "checking delivery confirmations failed", exc)

    async def check(self, org: Organization) -> int:
        """Process the answers and timeouts that are due; returns how many messages got
        their outcome."""
        due = await self.d.store.awaiting_queues()
        if not due:
            return 0
        now = self.d.clock.now()
        done = 0
        for queue_id, earliest in due.items():
            info = await self.d.store.queue(queue_id)
            connector = next((c for c in org.foreign_connectors
                              if c.guid == info.next_hop_connector), None)
            folder = self.d.drop(connector, org).path if connector is not None else None
            answers = await asyncio.to_thread(_answers, folder) if folder else {}
            if not answers and earliest > now:
                continue
            waiting = await self.d.store.awaiting([queue_id])
            done += await self._settle(org, connector, folder, waiting, answers, now)
        return done

    async def _settle(self, org: Organization, connector: ForeignConnector | None,
                      folder: Path | None, waiting: list[tuple[ClaimedDelivery, float]],
                      answers: dict[str, Answer], now: float) -> int:
        results: list[DeliveryResult] = []
        used: list[Path] = []
        name = connector.name if connector is not None else "(removed)"
        for d, deadline in waiting:
            file_name = drop_file_name(d)
            answer = answers.pop(file_name[:-4].casefold(), None)
            if answer is not None:
                results.append(self._answered(org, name, d, file_name, answer))
                used.append(answer.path)
            elif deadline <= now:
                action = connector.confirmation_timeout_action if connector else "Fail"
                timeout = connector.confirmation_timeout if connector else 0.0
                if action != "Delivered" and folder is not None:
                    # Taken back before the outcome is recorded: a gateway that comes back
                    # late must not deliver what was reported failed or is dropped again.
                    await asyncio.to_thread(_unlink, folder / file_name)
                results.append(self._timed_out(org, name, d, file_name, action, timeout))
        for answer in answers.values():
            if str(answer.path) not in self._reported:
                self._reported.add(str(answer.path))
                log.warning("%s matches no message awaiting confirmation on this node; "
                            "left alone", answer.path)
        if not results:
            return 0
        recorded = await self.d.store.confirm(results)
        # Answers are deleted once their outcome is committed (or when the message was
        # removed meanwhile: nobody waits for them any more).
        for path in used:
            await asyncio.to_thread(_unlink, path)
        return len(recorded)

    def _answered(self, org: Organization, connector: str, d: ClaimedDelivery,
                  file_name: str, answer: Answer) -> DeliveryResult:
        addresses = [r.address for r in d.recipients]
        text = f"delivery confirmed by the gateway ({answer.path.name})"
        if answer.kind == ACK:
            first = one_line(answer.text.split(b"\n", 1)[0])
            text += f": {first}" if first else ""
            by_address = {a: RecipientResult(a, "delivered", f"250 2.0.0 {text}")
                          for a in addresses}
        else:
            by_address = parse_nack(answer.text, addresses)
        outcome = {r.id: by_address[r.address] for r in d.recipients}
        res = self.d.outcome_result(org, d, outcome, tracking.GATEWAY, connector, DELIVERED,
                                    Status(250, "2.0.0", text))
        for ev in res.tracking:
            ev.source_context = file_name
        return res

    def _timed_out(self, org: Organization, connector: str, d: ClaimedDelivery,
                   file_name: str, action: str, timeout: float) -> DeliveryResult:
        within = format_duration(datetime.timedelta(seconds=timeout)) if timeout else "time"
        why = f"no confirmation from the gateway within {within} for {file_name}"
        now = self.d.clock.now()

        def result(address: str) -> RecipientResult:
            if action == "Delivered":
                return RecipientResult(address, "delivered", f"250 2.0.0 assumed delivered: {why}")
            if action == "Retry":   # dropped again at once
                return RecipientResult(address, "deferred", f"451 4.4.7 {why}", now)
            return RecipientResult(address, "failed", f"550 5.4.7 {why}")
        outcome = {r.id: result(r.address) for r in d.recipients}
        res = self.d.outcome_result(org, d, outcome, tracking.GATEWAY, connector, RELAYED,
                                    Status(250, "2.0.0", f"assumed delivered: {why}"))
        for ev in res.tracking:
            ev.source_context = file_name
        return res


def _answers(folder: Path) -> dict[str, Answer]:
    """The settled `.ack`/`.nack` files of a Drop directory, by casefolded stem."""
    out: dict[str, Answer] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    settled = time.time() - SETTLE
    for entry in entries:
        stem, dot, ext = entry.name.rpartition(".")
        kind = ext.casefold()
        if not dot or kind not in (ACK, NACK) or entry.name.startswith("."):
            continue
        if stem.casefold().endswith(".eml"):
            stem = stem[:-4]
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_mtime > settled:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                text = os.read(fd, READ_LIMIT)
            finally:
                os.close(fd)
        except OSError:
            continue
        out[stem.casefold()] = Answer(Path(entry.path), kind, text)
    return out


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot delete %s: %s", path, exc.strerror or exc)
