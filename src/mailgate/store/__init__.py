"""The persistence port: what the node, the categorizer and the admin services need from a
store, independent of the database behind it.

The embedded default is SQLite (`store.sqlite`). A PostgreSQL adapter for several nodes
sharing one database implements the same `Store` protocol; only claims, leases and
wake-ups differ per dialect. Every write method returns once its transaction is durably
committed: callers acknowledge nothing (delete a Pickup file, report delivered) before that.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol


class StoreError(Exception):
    """The store could not complete an operation (I/O error, full disk, corruption)."""


class DuplicateKeyError(StoreError):
    """A directory object would reuse a unique key (a name, a domain, a proxy address)."""

    def __init__(self, key: str, owner: str) -> None:
        super().__init__(key)
        self.key = key
        self.owner = owner


class NotFoundError(StoreError):
    pass


@dataclass
class DirectoryObject:
    """One configuration object, as Exchange keeps objects in Active Directory."""

    guid: str
    kind: str
    name: str
    data: dict[str, Any]
    created: float = 0.0
    changed: float = 0.0


@dataclass(frozen=True)
class QueueKey:
    """Exchange's NextHopSolutionKey: one delivery queue per unique key."""

    delivery_type: str
    next_hop_domain: str
    next_hop_connector: str = "00000000-0000-0000-0000-000000000000"


# The persistent queues that are not next hops (reference §4.2, DeliveryType table).
ZERO_GUID = "00000000-0000-0000-0000-000000000000"
UNREACHABLE_QUEUE = QueueKey("Unreachable", "Unreachable Domain", ZERO_GUID)
SUBMISSION_QUEUE = QueueKey("Undefined", "Submission", ZERO_GUID)
POISON_QUEUE = QueueKey("Undefined", "Poison Message", ZERO_GUID)


@dataclass
class TrackingEvent:
    """One message-tracking record; field names follow Exchange's tracking log."""

    event_id: str
    source: str
    timestamp: float = 0.0
    message_id: str | None = None            # Internet Message-ID
    internal_message_id: int | None = None
    recipients: list[str] = field(default_factory=list)
    recipient_status: list[str] = field(default_factory=list)
    sender: str | None = None
    return_path: str | None = None
    subject: str | None = None
    total_bytes: int | None = None
    source_context: str | None = None
    connector_id: str | None = None
    server_hostname: str | None = None
    reference: str | None = None
    related_recipient_address: str | None = None
    message_info: str | None = None
    directionality: str | None = None


@dataclass
class NewRecipient:
    address: str                 # resolved envelope recipient: SMTP address or TYPE:value
    original: str | None = None  # as received when it was rewritten (IMCEA form, proxy)
    orcpt: str | None = None
    notify: str | None = None
    mailbox: str | None = None   # mailbox GUID for local delivery


@dataclass
class NewDelivery:
    queue: QueueKey
    recipients: list[NewRecipient]


@dataclass
class NewMessage:
    """A message to persist with its routed deliveries, in one transaction.

    `content` is called inside the transaction and must yield the message bytes in
    chunks (never the whole of a large message at once). Tracking events whose
    `total_bytes` is None get the stored size, and `internal_message_id` the new id.
    With `source_key` set, a message whose key was already stored is not stored again
    (the submit result for it is None): this is how a Pickup file that survived a crash
    after its commit is recognised. A message without deliveries stores only its key and
    tracking events (result 0). `related` messages (e.g. its NDR) are stored in the same
    transaction.
    """

    from_address: str                     # '' is the null reverse-path <>
    content: Callable[[], Iterable[bytes]]
    deliveries: list[NewDelivery]
    tracking: list[TrackingEvent] = field(default_factory=list)
    internet_message_id: str | None = None
    subject: str | None = None
    date_received: float = 0.0
    expiration_time: float | None = None
    source: str = "PICKUP"
    source_context: str | None = None
    ret: str | None = None
    envid: str | None = None
    is_dsn: bool = False
    source_key: str | None = None
    related: list["NewMessage"] = field(default_factory=list)

    def queue_keys(self) -> set[QueueKey]:
        """The queues this message (with its related messages) gives work to."""
        keys = {d.queue for d in self.deliveries}
        for m in self.related:
            keys |= m.queue_keys()
        return keys


@dataclass
class ClaimedRecipient:
    id: int
    address: str
    original: str | None
    orcpt: str | None
    notify: str | None
    mailbox: str | None


@dataclass
class ClaimedDelivery:
    """A message in a delivery queue, claimed by one node under a lease."""

    id: int
    message_id: int
    queue_id: int
    token: str
    created: float
    retry_count: int
    recovering: bool
    from_address: str
    internet_message_id: str | None
    subject: str | None
    size: int
    date_received: float
    ret: str | None
    envid: str | None
    is_dsn: bool
    recipients: list[ClaimedRecipient]
    content: bytes | None = None   # the whole message when it is small (one chunk)
    crash_count: int = 0           # failures counted toward the poison threshold so far


@dataclass
class DeliveryResult:
    """The outcome of one claimed delivery, per recipient.

    Delivered and failed recipients are final. When `deferred` is non-empty the delivery
    returns to the queue in Retry until `next_attempt`. `new_messages` (NDRs) are stored in
    the same transaction, so a failure is never recorded without its notification.
    """

    delivery_id: int
    message_id: int
    delivered: list[int] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    deferred: list[tuple[int, str]] = field(default_factory=list)
    next_attempt: float | None = None
    tracking: list[TrackingEvent] = field(default_factory=list)
    new_messages: list[NewMessage] = field(default_factory=list)
    failures: int = 0      # deferred by an agent's exception or timeout: toward poison
    poison: bool = False   # deferred and at the poison threshold: to the Poison queue
    # Handed off, the outcome awaits the gateway's confirmation (PRODUCT §4.6): the
    # delivery stays queued as AwaitingConfirmation until this time, `note` its LastError.
    awaiting_until: float | None = None
    note: str | None = None


@dataclass
class QueueInfo:
    id: int
    node: str
    delivery_type: str
    next_hop_domain: str
    next_hop_connector: str
    status: str
    message_count: int
    last_error: str | None
    retry_count: int
    first_retry_time: float | None
    last_retry_time: float | None
    next_retry_time: float | None


@dataclass
class QueueState:
    """The mutable scheduling state of a queue (Status, LastError and retry times)."""

    status: str
    last_error: str | None = None
    retry_count: int = 0
    first_retry_time: float | None = None
    last_retry_time: float | None = None
    next_retry_time: float | None = None


@dataclass
class RecipientInfo:
    """One recipient of a queued message, with its own status (Get-Message -IncludeRecipientInfo)."""

    id: int
    address: str
    status: str                  # Ready, Retry, Delivered, Failed
    last_error: str | None = None
    original: str | None = None
    orcpt: str | None = None
    notify: str | None = None


# Message statuses as Exchange shows them (reference §4.3), and AwaitingConfirmation: handed
# off to a Drop directory whose gateway confirms delivery (PRODUCT §4.6).
AWAITING_CONFIRMATION = "AwaitingConfirmation"
MESSAGE_STATUSES = ("Active", "Ready", "Retry", "Suspended", "PendingSuspend", "PendingRemove",
                    AWAITING_CONFIRMATION)


@dataclass
class MessageInfo:
    """A message in one queue, as Get-Message shows it (one delivery of the message: a
    message split over several next hops is in several queues with the same message id)."""

    delivery_id: int
    message_id: int
    queue_id: int
    status: str                  # one of MESSAGE_STATUSES
    from_address: str
    internet_message_id: str | None
    subject: str | None
    size: int
    date_received: float
    last_error: str | None
    retry_count: int
    next_attempt: float
    source: str
    ret: str | None
    envid: str | None
    is_dsn: bool
    delay_notified: bool
    pending: str | None = None   # Suspend / Remove / RemoveWithNdr, waiting for an attempt
    recipients: list[RecipientInfo] = field(default_factory=list)
    queue_identity: str = ""     # <node>\<queue id>, <node>\Unreachable, <node>\Poison


@dataclass
class MessageQuery:
    """Which queued messages to list. Every given criterion must hold."""

    queue_ids: list[int] | None = None      # None: every queue of this node
    message_ids: list[int] | None = None
    delivery_ids: list[int] | None = None
    statuses: list[str] | None = None       # MESSAGE_STATUSES
    received_before: float | None = None
    delay_notified: bool | None = None
    filter: Any = None                      # a core.opath Filter over MESSAGE_PROPERTIES
    expiration_timeout: float = 0.0         # for the ExpirationTime property
    limit: int | None = 1000


class Store(Protocol):
    """The persistence port. All methods may raise StoreError."""

    node: str

    # Directory (configuration).
    async def config_version(self) -> int: ...
    async def list_objects(self, kind: str | None = None) -> list[DirectoryObject]: ...
    async def put_object(self, obj: DirectoryObject, keys: list[str]) -> DirectoryObject: ...
    async def put_objects(self, items: list[tuple[DirectoryObject, list[str]]]
                          ) -> list[DirectoryObject]: ...
    async def delete_object(self, guid: str) -> None: ...

    # Messages and queues.
    async def submit(self, messages: list[NewMessage]) -> list[int | None]: ...
    def submit_futures(self, messages: list[NewMessage]) -> list[Future[int | None]]: ...
    def submit_batch(self, messages: list[NewMessage]
                     ) -> Future[list[int | None | BaseException]]: ...
    async def ready_queues(self, now: float) -> list[int]: ...
    async def claim(self, queue_id: int, limit: int, owner: str, lease: float,
                    now: float) -> list[ClaimedDelivery]:
        """Up to `limit` due deliveries of the queue (none while it is Suspended), Active
        under `owner`'s lease until now + lease."""
    async def complete(self, results: list[DeliveryResult]) -> None: ...
    async def reroute(self, delivery_id: int, message_id: int, deliveries: list[NewDelivery],
                      tracking: list[TrackingEvent], related: list[NewMessage],
                      only_idle: bool = False) -> bool: ...
    async def release(self, delivery_ids: list[int], last_error: str | None = None
                      ) -> None: ...
    async def renew(self, delivery_ids: list[int], owner: str, until: float) -> int: ...
    async def recover(self, node: str) -> list[tuple[int, int]]: ...
    async def set_queue_state(self, queue_id: int, state: QueueState,
                              force: bool = False) -> bool: ...
    async def queue(self, queue_id: int) -> QueueInfo: ...
    async def list_queues(self, node: str | None = None) -> list[QueueInfo]: ...
    def iter_content(self, message_id: int) -> Iterator[bytes]: ...

    # Queue and message management (the queue engine and the admin commands).
    async def list_messages(self, query: MessageQuery) -> list[MessageInfo]: ...
    async def suspend_deliveries(self, ids: list[int]) -> dict[int, str]: ...
    async def resume_deliveries(self, ids: list[int], now: float) -> dict[int, str]: ...
    async def finish_idle(self, results: list[DeliveryResult],
                          pending_if_active: str | None = None) -> list[int]: ...
    async def mark_delay_notified(self, ids: list[int], new_messages: list[NewMessage],
                                  tracking: list[TrackingEvent]) -> None: ...
    async def poison(self, ids: list[int], tracking: list[TrackingEvent]) -> None: ...

    # Confirmed hand-off (Foreign connectors with DeliveryConfirmation).
    async def awaiting_queues(self) -> dict[int, float]: ...
    async def awaiting(self, queue_ids: list[int]
                       ) -> list[tuple[ClaimedDelivery, float]]: ...
    async def confirm(self, results: list[DeliveryResult]) -> list[int]: ...

    async def forget_pickup_keys(self, older_than: float) -> int: ...

    # Tracking.
    async def add_tracking(self, events: list[TrackingEvent]) -> None: ...
    async def search_tracking(self, **criteria: Any) -> list[TrackingEvent]: ...

    async def close(self) -> None: ...

    # Tracking log: events by increasing id, to be read once each (mailgate.tracking_log).
    async def tracking_log_lines(self, after_id: int, limit: int, subjects: bool,
                                 version: str) -> list[tuple[int, str]]: ...


def open_store(url: str, node: str, clock: Any = None) -> Store:
    """Open the store named by `url` (`sqlite:///path`), creating and migrating it."""
    if url.startswith("sqlite:///"):
        from mailgate.store.sqlite import SqliteStore

        return SqliteStore(Path(url[len("sqlite:///"):]), node=node, clock=clock)
    raise StoreError(f"unsupported store URL {url!r} (only sqlite:///path is available)")
