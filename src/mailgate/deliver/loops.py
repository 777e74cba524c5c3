"""Next hops that are this node itself: mail sent there would come straight back.

An MX record or a smart host that points at one of this node's own Receive connectors
(a domain missing from the accepted domains, a smart host set to the node's own name) is
a routing loop. As Postfix does, only the next hops preferred over the node itself are
tried; when the node is the first of them, the recipients fail with 554 5.4.6 (an NDR)
instead of the message circling until its hop count runs out.
"""

from __future__ import annotations

import functools
import socket
from typing import Iterable

from mailgate.core.status import Status
from mailgate.deliver.mx import Target
from mailgate.organization import Organization

WILDCARDS = ("0.0.0.0", "::", "")


def own_endpoints(org: Organization, node: str) -> list[tuple[str, int]]:
    """Where this node's enabled Receive connectors listen."""
    return [e for c in org.receive_connectors if c.enabled and c.hosted_on(node)
            for e in c.endpoints()]


@functools.lru_cache(maxsize=256)
def is_local_address(address: str) -> bool:
    """Whether `address` is one of this machine's own (it can bind a socket to it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def is_self(target: Target, endpoints: Iterable[tuple[str, int]]) -> bool:
    for address, port in endpoints:
        if port != target.port:
            continue
        if address == target.address:
            return True
        if address in WILDCARDS and (":" in target.address) == (address == "::") \
                and is_local_address(target.address):
            return True
    return False


def before_self(targets: list[Target], endpoints: list[tuple[str, int]]
                ) -> tuple[list[Target], Target | None]:
    """The targets preferred over this node (all of them when it is not among them), and
    the first target that is this node, if any."""
    for i, t in enumerate(targets):
        if is_self(t, endpoints):
            return targets[:i], t
    return targets, None


def loop_status(next_hop: str, target: Target) -> Status:
    return Status(554, "5.4.6", f"Routing loop detected: mail for {next_hop} would come back "
                                f"to this node ({target})")
