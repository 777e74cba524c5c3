"""Helpers shared by the built-in delivery agents' tests."""

from __future__ import annotations

from typing import Any

from mailgate.deliver.agents.api import Item, RecipientResult


async def deliver_once(conn: Any, item: Item) -> list[RecipientResult]:
    """One item on an opened connection, which is closed afterwards."""
    try:
        return await conn.deliver(item)  # type: ignore[no-any-return]
    finally:
        await conn.close()


def outcomes(results: list[RecipientResult]) -> list[tuple[str, str, str]]:
    """(address, outcome, enhanced status) per result."""
    return [(r.address, r.outcome, r.status.split()[1]) for r in results]
