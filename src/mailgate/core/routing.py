"""Connector selection (PRODUCT §4.4, reference §1.6): which connector, if any, takes a
recipient. Pure: takes connectors and a recipient, returns a decision.

Order: connectors that are disabled or not hosted on this node are ignored; of those whose
address spaces match, the ones too small for the message are dropped; then the most specific
match wins, then the lowest address-space cost, then the lowest name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from mailgate.core.address import RecipientAddress
from mailgate.core.address_space import AddressSpace


class Connector(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def address_spaces(self) -> tuple[AddressSpace, ...]: ...
    @property
    def enabled(self) -> bool: ...
    @property
    def max_message_size(self) -> int | None: ...

    def hosted_on(self, node: str) -> bool: ...


@dataclass(frozen=True)
class ConnectorChoice:
    connector: Connector
    space: AddressSpace


@dataclass(frozen=True)
class NoConnector:
    """No connector matched the address at all."""


@dataclass(frozen=True)
class TooLarge:
    """Connectors matched, but the message is larger than every one of them accepts."""


def select_connector(connectors: Sequence[Connector], address: RecipientAddress, size: int,
                     node: str) -> ConnectorChoice | NoConnector | TooLarge:
    candidates: list[tuple[tuple[int, int], int, str, Connector, AddressSpace]] = []
    too_large = False
    for conn in connectors:
        if not conn.enabled or not conn.hosted_on(node):
            continue
        best: tuple[tuple[int, int], AddressSpace] | None = None
        for space in conn.address_spaces:
            score = space.match(address)
            if score is None:
                continue
            # Within one connector the most specific space counts, then its cost.
            if best is None or (score, -space.cost) > (best[0], -best[1].cost):
                best = (score, space)
        if best is None:
            continue
        limit = conn.max_message_size
        if limit is not None and size > limit:
            too_large = True
            continue
        candidates.append((best[0], best[1].cost, conn.name.casefold(), conn, best[1]))
    if not candidates:
        return TooLarge() if too_large else NoConnector()
    # Most specific first (descending score), then cost and name ascending.
    candidates.sort(key=lambda c: (-c[0][0], -c[0][1], c[1], c[2]))
    _, _, _, conn, space = candidates[0]
    return ConnectorChoice(conn, space)
