"""Application services: the one layer that the CLI (and later the REST API and the web UI)
call to read and change the organization and the queues. Validation lives here, so a
command, an API call and a button cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, TypeVar

from mailgate.core.hosts import is_host_name
from mailgate.core.units import UnitError, check_range


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


class Named(Protocol):
    @property
    def guid(self) -> str: ...
    @property
    def name(self) -> str: ...

    def hosted_on(self, node: str) -> bool: ...


N = TypeVar("N", bound=Named)


def find_by_identity(kind: str, identity: str, objects: Iterable[N]) -> N:
    """The one object that `identity` names, as Exchange shows identities: its GUID, its
    name, or `Node\\Name` (the name on a node that hosts it)."""
    ident = identity.strip()
    server, _, name = ident.rpartition("\\")
    return pick_one(kind, identity, (
        c for c in objects
        if ident.lower() == c.guid or (name.casefold() == c.name.casefold() and (
            not server or c.hosted_on(server)))))


def within(option: str, value: Any, low: Any, high: Any,
           shown: Callable[[Any], str] = str) -> Any:
    """`value` when low <= value <= high, else AdminError `--option must be between low and
    high (got value)`, each shown by `shown` (format_size, seconds_shown, ...)."""
    try:
        return check_range(option, value, low, high, shown)
    except UnitError as exc:
        raise AdminError(str(exc)) from None


def list_values(values: Iterable[str]) -> list[str]:
    """The values of a multi-valued option: it may repeat, and each value may be a
    comma-separated list (Exchange's syntax); blanks are dropped."""
    return [p.strip() for v in values for p in str(v).split(",") if p.strip()]


def fqdn_value(value: str) -> str | None:
    """A connector's --fqdn (its EHLO or banner name): a host name, lower case, without a
    trailing dot; empty or $null clears it (None)."""
    name = value.strip().rstrip(".").lower()
    if name in ("", "$null"):
        return None
    if not is_host_name(name):
        raise AdminError(f"--fqdn: {value.strip()[:80]!r} is not a valid host name")
    return name


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
