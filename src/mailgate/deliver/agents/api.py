"""The delivery agent plugin contract (PRODUCT §4.7): what a Delivery Agent connector's
agent implements, and the read-only view of a message it is given.

An agent is a class registered under its protocol name in the entry-point group
`mailgate.delivery_agents`. For each queue session mailgate calls
`agent.open_connection(next_hop)`; on the connection, `deliver(item)` once per message (up to
MaxMessagesPerConnection) and then `close()`. `deliver` returns one `RecipientResult` per
recipient of the item:

- `delivered(address)`: done;
- `deferred(address, reason, retry_at=None)`: tried again later (at `retry_at` if given);
- `failed(address, "5.1.1", text)`: permanent, the sender gets an NDR.

An exception from `deliver` (or a timeout) defers the whole item and counts toward the
poison threshold; an exception from `open_connection` puts the queue in Retry with the
exception's text as LastError. Agents written as plain (sync) methods are run in a worker
thread, so no agent can block the node's event loop.

Settings: an agent declares its settings (`Setting`), which are checked when a connector is
created or changed. A `secret` setting is never stored: the connector stores the name of an
environment variable (`<name>-env=VARIABLE`) and the agent receives the variable's value.
"""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, Awaitable, Callable, ClassVar, Iterator, Literal, Protocol

SettingType = Literal["string", "int", "bool", "url", "path"]


@dataclass(frozen=True)
class Setting:
    """A setting an agent takes from its connector (`--setting name=value`)."""

    name: str
    type: SettingType = "string"
    required: bool = False
    secret: bool = False
    default: str | None = None
    help: str = ""


@dataclass(frozen=True)
class RecipientResult:
    """The outcome for one recipient of an item."""

    address: str
    outcome: Literal["delivered", "deferred", "failed"]
    status: str                      # "250 2.0.0 text", "451 4.4.0 text", "550 5.1.1 text"
    retry_at: float | None = None    # deferred: not before this time (epoch seconds)


def delivered(address: str, text: str = "delivered by the agent") -> RecipientResult:
    return RecipientResult(address, "delivered", f"250 2.0.0 {text}")


def deferred(address: str, reason: str, retry_at: float | None = None,
             enhanced: str = "4.0.0") -> RecipientResult:
    if not enhanced.startswith("4."):
        raise ValueError(f"a deferral needs a 4.x.x status, not {enhanced}")
    return RecipientResult(address, "deferred", f"451 {enhanced} {reason}", retry_at)


def failed(address: str, enhanced: str, text: str) -> RecipientResult:
    if not enhanced.startswith("5."):
        raise ValueError(f"a failure needs a 5.x.x status, not {enhanced}")
    return RecipientResult(address, "failed", f"550 {enhanced} {text}")


@dataclass(frozen=True)
class ItemRecipient:
    address: str                     # SMTP address or TYPE:value (FAX:+15551234)
    notify: str | None = None        # RFC 3461 NOTIFY, e.g. "SUCCESS,FAILURE"
    orcpt: str | None = None         # RFC 3461 ORCPT, addr-type;xtext


@dataclass(frozen=True)
class Item:
    """One message for one connection: a read-only view of its envelope and bytes."""

    message_id: int                  # the queue's message number
    internet_message_id: str | None
    sender: str                      # '' is the null reverse-path <>
    recipients: tuple[ItemRecipient, ...]
    envid: str | None
    size: int
    received: float                  # epoch seconds
    _content: Callable[[], Iterator[bytes]] = field(repr=False, compare=False)

    def chunks(self) -> Iterator[bytes]:
        """The message bytes (CRLF line endings), in chunks of up to 1 MiB: a large
        message is never whole in memory unless the agent joins the chunks."""
        return self._content()

    def headers(self) -> Message:
        """The message header, parsed on demand (the body is not read)."""
        head = b""
        for chunk in self.chunks():
            head += chunk
            if b"\r\n\r\n" in head:
                break
        return email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
            head.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")


@dataclass(frozen=True)
class NextHop:
    """The connector a session delivers for, with its settings resolved (secrets read from
    their environment variables)."""

    connector: str
    address_space: str               # the space the queue's recipients matched, e.g. SMS
    settings: dict[str, Any]


class Connection(Protocol):
    def deliver(self, item: Item) -> Awaitable[list[RecipientResult]] | list[RecipientResult]:
        ...

    def close(self) -> Awaitable[None] | None: ...


class DeliveryAgent(Protocol):
    """What an entry point in `mailgate.delivery_agents` names."""

    settings: ClassVar[tuple[Setting, ...]]
    recipient_limit: ClassVar[int | None]   # recipients per item (fax: 1); None: any

    def open_connection(self, next_hop: NextHop) -> Awaitable[Connection] | Connection: ...
