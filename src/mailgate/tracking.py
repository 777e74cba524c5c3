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

# Sources.
PICKUP = "PICKUP"
ROUTING = "ROUTING"
STOREDRIVER = "STOREDRIVER"
GATEWAY = "GATEWAY"
SOURCE_DSN = "DSN"
QUEUE = "QUEUE"


def event(event_id: str, source: str, **fields: object) -> TrackingEvent:
    return TrackingEvent(event_id=event_id, source=source, **fields)  # type: ignore[arg-type]
