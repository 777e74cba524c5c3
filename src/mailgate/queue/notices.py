"""What happens to queued messages with time and by an administrator's hand: expiry, delay
notifications and removal (Postfix would call this part of qmgr and bounce).

- A message still undelivered MessageExpirationTimeout after it was received fails for its
  remaining recipients with `550 4.4.7 QUEUE.Expired` and the sender gets an NDR.
- Once it has waited DelayNotificationTimeout, the sender gets one delay DSN (Action:
  delayed, Will-Retry-Until the expiry time).
- Suspended messages (including the Poison queue) neither expire nor produce delay DSNs
  while suspended: an administrator is holding them.
- Messages in the Unreachable queue are resubmitted when the configuration changes
  (unless the queue is suspended), so a new connector or domain picks them up.
- A removed message fails for its remaining recipients with `550 4.3.2 QUEUE.Admin` and an
  NDR when asked for (Remove-Message -WithNDR, default true), else a DROP event.
"""

from __future__ import annotations

import logging
from typing import Iterator

from mailgate import tracking
from mailgate.clock import Clock, iso
from mailgate.core.status import Status
from mailgate.dsn import DELAYED, FailedRecipient
from mailgate.organization import Organization
from mailgate.receive.submit import Inbound, InboundRecipient, Submitter
from mailgate.store import DeliveryResult, MessageInfo, MessageQuery, Store, TrackingEvent

log = logging.getLogger(__name__)

MAX_NDR_HEADER = 64 * 1024
BATCH = 500

S550_EXPIRED = Status(550, "4.4.7", "QUEUE.Expired; message expired")
S400_DELAYED = Status(400, "4.4.7", "Message delayed")
S550_REMOVED = Status(550, "4.3.2", "QUEUE.Admin; message deleted by administrative action")


def message_header(store: Store, message_id: int) -> bytes:
    """The stored message's header block (at most MAX_NDR_HEADER bytes), for DSNs."""
    head = b""
    for chunk in store.iter_content(message_id):
        head += chunk
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            return head[:end]
        if len(head) > MAX_NDR_HEADER:
            break
    return head[:MAX_NDR_HEADER]


class Notices:
    def __init__(self, store: Store, submitter: Submitter, clock: Clock,
                 hostname: str) -> None:
        self.store = store
        self.submitter = submitter
        self.clock = clock
        self.hostname = hostname

    def inbound(self, m: MessageInfo) -> Inbound:
        """The message as received, with the recipients still to be delivered."""
        def content() -> Iterator[bytes]:
            return self.store.iter_content(m.message_id)
        return Inbound(sender=m.from_address,
                       recipients=[InboundRecipient(r.original or r.address, r.orcpt, r.notify)
                                   for r in m.recipients if r.status in ("Ready", "Retry")],
                       content=content, size=m.size,
                       header=message_header(self.store, m.message_id), source="QUEUE",
                       message_id=m.internet_message_id, subject=m.subject, ret=m.ret,
                       envid=m.envid, is_dsn=m.is_dsn, date_received=m.date_received)

    def _event(self, m: MessageInfo, event_id: str, addresses: list[str],
               statuses: list[str], **extra: object) -> tracking.TrackingEvent:
        return tracking.event(
            event_id, tracking.QUEUE, message_id=m.internet_message_id,
            internal_message_id=m.message_id, recipients=addresses,
            recipient_status=statuses, sender=m.from_address or "<>",
            return_path=m.from_address or "<>", subject=m.subject, total_bytes=m.size,
            server_hostname=self.hostname, message_info=iso(m.date_received), **extra)

    def poison_event(self, m: MessageInfo) -> TrackingEvent:
        return self._event(m, tracking.POISONMESSAGE, [r.address for r in m.recipients],
                           ["moved to the Poison queue"] * len(m.recipients))

    def fail(self, org: Organization, m: MessageInfo, st: Status, *, ndr: bool = True,
             event_id: str = tracking.FAIL, source: str = tracking.QUEUE) -> DeliveryResult:
        """The result that fails every recipient still to be delivered, with the NDR."""
        open_rcpts = [r for r in m.recipients if r.status in ("Ready", "Retry")]
        res = DeliveryResult(m.delivery_id, m.message_id,
                             failed=[(r.id, str(st)) for r in open_rcpts])
        event = self._event(m, event_id, [r.address for r in open_rcpts],
                            [str(st)] * len(open_rcpts))
        event.source = source
        res.tracking.append(event)
        if ndr and open_rcpts:
            notice = self.submitter.ndr(
                org, self.inbound(m),
                [FailedRecipient(r.address, st, r.orcpt, r.notify) for r in open_rcpts],
                self.clock.now())
            if notice is not None:
                res.new_messages.append(notice)
        return res

    async def resubmit(self, org: Organization, messages: list[MessageInfo],
                       why: str) -> int:
        """Send messages back to the categorizer, routed with today's configuration
        (Retry-Queue -Resubmit, the Unreachable queue after a change, a poison message
        resumed). Messages being delivered right now are left alone. Returns how many."""
        now = self.clock.now()
        done = 0
        for m in messages:
            inbound = self.inbound(m)
            prepared = self.submitter.prepare(org, inbound, now)
            prepared.tracking.insert(0, tracking.event(
                tracking.RESUBMIT, tracking.QUEUE, message_id=m.internet_message_id,
                internal_message_id=m.message_id, sender=m.from_address or "<>",
                recipients=[r.address for r in inbound.recipients],
                recipient_status=[why] * len(inbound.recipients), subject=m.subject,
                server_hostname=self.hostname, timestamp=now))
            done += await self.store.reroute(m.delivery_id, m.message_id, prepared.deliveries,
                                             prepared.tracking, prepared.related,
                                             only_idle=True)
        return done

    async def expire(self, org: Organization) -> int:
        """Fail messages past MessageExpirationTimeout. Returns how many expired."""
        ts = org.transport
        total = 0
        while True:
            now = self.clock.now()
            due = await self.store.list_messages(MessageQuery(
                statuses=["Ready", "Retry"], received_before=now - ts.message_expiration_timeout,
                limit=BATCH))
            if not due:
                return total
            done = await self.store.finish_idle([self.fail(org, m, S550_EXPIRED) for m in due])
            total += len(done)
            if len(due) < BATCH or not done:
                return total

    async def notify_delays(self, org: Organization) -> int:
        """Send the one delay DSN of messages waiting longer than DelayNotificationTimeout.
        Returns how many messages were handled."""
        ts = org.transport
        total = 0
        while True:
            now = self.clock.now()
            due = await self.store.list_messages(MessageQuery(
                statuses=["Ready", "Retry"], received_before=now - ts.delay_notification_timeout,
                delay_notified=False, limit=BATCH))
            if not due:
                return total
            notices = []
            for m in due:
                waiting = [r for r in m.recipients if r.status in ("Ready", "Retry")]
                st = S400_DELAYED.with_text(f"Message delayed; {m.last_error}"
                                            if m.last_error else S400_DELAYED.text)
                notice = self.submitter.notice(
                    org, self.inbound(m),
                    [FailedRecipient(r.address, st, r.orcpt, r.notify, DELAYED)
                     for r in waiting], now,
                    will_retry_until=m.date_received + ts.message_expiration_timeout)
                if notice is not None:
                    notices.append(notice)
            await self.store.mark_delay_notified([m.delivery_id for m in due], notices, [])
            total += len(due)
            if len(due) < BATCH:
                return total

    def removal(self, org: Organization, m: MessageInfo, with_ndr: bool) -> DeliveryResult:
        return self.fail(org, m, S550_REMOVED, ndr=with_ndr,
                         event_id=tracking.FAIL if with_ndr else tracking.DROP,
                         source=tracking.ADMIN)

    async def finish_removals(self, org: Organization) -> int:
        """Remove messages whose removal waited for their delivery attempt to end."""
        due = await self.store.list_messages(MessageQuery(statuses=["PendingRemove"],
                                                          limit=BATCH))
        results = [self.removal(org, m, m.pending == "RemoveWithNdr") for m in due]
        return len(await self.store.finish_idle(results)) if results else 0
