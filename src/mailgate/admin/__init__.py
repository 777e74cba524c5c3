"""Application services: the one layer that the CLI (and later the REST API and the web UI)
call to read and change the organization and the queues. Validation lives here, so a
command, an API call and a button cannot drift apart.
"""

from __future__ import annotations

from typing import Iterable, TypeVar


class AdminError(Exception):
    """A request that cannot be carried out; the message is one line for the administrator."""


T = TypeVar("T")


def pick_one(kind: str, identity: str, matches: Iterable[T]) -> T:
    found = list(matches)
    if not found:
        raise AdminError(f"{kind} '{identity}' was not found")
    if len(found) > 1:
        raise AdminError(f"{kind} '{identity}' matches {len(found)} objects; use a more "
                         f"specific identity (the GUID)")
    return found[0]


def check_name(kind: str, name: str, limit: int = 64) -> str:
    name = name.strip()
    if not name:
        raise AdminError(f"the {kind} name must not be empty")
    if len(name) > limit:
        raise AdminError(f"the {kind} name '{name[:20]}...' is longer than {limit} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 or ch in "\\/" for ch in name):
        raise AdminError(f"the {kind} name '{name}' must not contain control characters, "
                         f"'\\' or '/'")
    return name
