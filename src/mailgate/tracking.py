"""Message tracking events (Exchange's event IDs and sources, reference §6.1).

Mailgate's choices where Exchange is silent: a hand-off to a Drop directory is DELIVER with
source GATEWAY (connector-id = connector name, source-context = file name); routing into
delivery queues is SUBMIT with source ROUTING; Pickup is RECEIVE with source PICKUP.
"""

from __future__ import annotations

from mailgate.store import TrackingEvent

# Event IDs.
RECEIVE = "RECEIVE"
SUBMIT = "SUBMIT"
DELIVER = "DELIVER"
FAIL = "FAIL"
DSN = "DSN"
BADMAIL = "BADMAIL"
DEFER = "DEFER"
POISONMESSAGE = "POISONMESSAGE"  # put into or removed from the Poison queue
RESUBMIT = "RESUBMIT"            # sent back to the categorizer (Retry-Queue -Resubmit, Replay)
DROP = "DROP"                    # removed without an NDR (Remove-Message -WithNDR $false)
SEND = "SEND"                    # handed to the next hop over SMTP (a Send connector)

# Every event id mailgate writes (for validating searches).
EVENT_IDS = (RECEIVE, SUBMIT, DELIVER, FAIL, DSN, BADMAIL, DEFER, POISONMESSAGE, RESUBMIT,
             DROP, SEND)

# Sources.
PICKUP = "PICKUP"
ROUTING = "ROUTING"
STOREDRIVER = "STOREDRIVER"
GATEWAY = "GATEWAY"
SOURCE_DSN = "DSN"
QUEUE = "QUEUE"
AGENT = "AGENT"      # a delivery agent (Delivery Agent connector)
ADMIN = "ADMIN"      # an administrator's queue or message command
REPLAY = "REPLAY"
SMTP = "SMTP"        # SMTP send (Send connectors) and receive
SMTP = "SMTP"        # an SMTP Receive connector


def event(event_id: str, source: str, **fields: object) -> TrackingEvent:
    return TrackingEvent(event_id=event_id, source=source, **fields)  # type: ignore[arg-type]
