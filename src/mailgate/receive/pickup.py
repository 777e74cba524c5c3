"""The Pickup directory (PRODUCT §4.5, reference §2.2–2.4, §2.7).

Claiming, batching, crash recovery, badmail and the rate limit are the shared submission
directory's (`directory.py`); this module only turns a claimed Pickup file into a message:
the envelope comes from the header fields (`parse_pickup`: From/Sender, To/Cc/Bcc), the
header is limited by PickupDirectoryMaxHeaderSize and the recipients by
PickupDirectoryMaxRecipientsPerMessage, the header is rewritten as Exchange's Pickup does
(reference §2.4, our `Received:` first), and the message is tracked as RECEIVE with source
PICKUP. A message over MaxMessageSize from a valid sender is answered by an NDR. How it
differs from Exchange (each documented in the README) is listed in `directory.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mailgate import tracking
from mailgate.clock import utc
from mailgate.core import status
from mailgate.ids import message_id_uuid
from mailgate.organization import Organization, TransportService
from mailgate.receive import filecontent
from mailgate.receive.directory import (
    Claimed,
    DirectoryCounters,
    Prepared,
    SubmissionDirectory,
    strip_blank,
)
from mailgate.receive.pickup_parse import PickupError, parse_pickup
from mailgate.receive.submit import Inbound, InboundRecipient

PickupCounters = DirectoryCounters  # the name the counters had before Replay shared them


@dataclass
class PickupDirectory(SubmissionDirectory):
    LABEL: ClassVar[str] = "Pickup"
    SOURCE: ClassVar[str] = tracking.PICKUP
    CRASH: ClassVar[str] = "pickup"

    def _path_value(self, ts: TransportService) -> str | None:
        return ts.pickup_directory_path

    def _prepare(self, org: Organization, c: Claimed) -> Prepared:
        ts = org.transport
        now = self.clock.now()
        head = filecontent.read_head(c.fd, c.st.st_size, ts.pickup_directory_max_header_size)
        domain = org.default_domain.domain_name if org.default_domain else self.hostname
        msg = parse_pickup(head.head, received=self._received(now),
                           max_recipients=ts.pickup_directory_max_recipients_per_message,
                           now=utc(int(now)),
                           make_message_id=lambda: f"<{message_id_uuid()}@{domain}>",
                           body_offset=head.body_offset)
        body = filecontent.read_body(c.fd, head)
        size = len(msg.header) + body.size
        if ts.max_message_size is not None and size > ts.max_message_size:
            raise PickupError(
                f"message is {size} bytes, larger than MaxMessageSize "
                f"({ts.max_message_size} bytes)",
                ndr=str(status.S552_TOO_LARGE.with_text(
                    f"message too big ({size} bytes, the limit is {ts.max_message_size})")),
                sender=msg.sender, recipients=msg.recipients, subject=msg.subject,
                message_id=msg.message_id)
        # Time-ordered (the token leads), so the claim records are appended, not scattered.
        key = f"{c.token}:{self._tag}:{c.st.st_size}:{body.digest}"
        receive = tracking.event(
            tracking.RECEIVE, tracking.PICKUP, message_id=msg.message_id,
            recipients=msg.recipients, sender=msg.sender, return_path=msg.sender,
            subject=msg.subject, source_context=c.name, server_hostname=self.hostname,
            timestamp=now)
        inbound = Inbound(sender=msg.sender,
                          recipients=[InboundRecipient(r) for r in msg.recipients],
                          content=filecontent.content(c.fd, msg.header, body, head.body_offset),
                          size=size, header=strip_blank(msg.header),
                          source="PICKUP", source_context=c.name, message_id=msg.message_id,
                          subject=msg.subject, source_key=key, date_received=now,
                          receive_events=[receive])
        return Prepared(c, self.submitter.prepare(org, inbound, now))
