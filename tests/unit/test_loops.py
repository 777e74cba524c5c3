"""Routing loops: which next hops are this node itself (deliver/loops.py)."""

from __future__ import annotations

from mailgate.deliver.loops import before_self, is_local_address, is_self
from mailgate.deliver.mx import Target


def t(address: str, port: int = 25) -> Target:
    return Target(f"h-{address}", address, port)


def test_an_exact_binding_or_a_wildcard_on_a_local_address_is_self() -> None:
    assert is_self(t("192.0.2.7"), [("192.0.2.7", 25)])
    assert not is_self(t("192.0.2.7", 587), [("192.0.2.7", 25)])
    assert is_self(t("127.0.0.9"), [("0.0.0.0", 25)])      # all of 127/8 is this machine
    assert not is_self(t("192.0.2.7"), [("0.0.0.0", 25)])  # TEST-NET: not ours
    assert not is_self(t("127.0.0.9"), [("::", 25)])       # an IPv6 wildcard is IPv6 only
    assert is_self(t("::1"), [("::", 25)]) == is_local_address("::1")


def test_only_next_hops_preferred_over_this_node_are_kept() -> None:
    me = [("127.0.0.1", 25)]
    better, worse = t("192.0.2.1"), t("192.0.2.2")
    assert before_self([better, t("127.0.0.1"), worse], me) == ([better], t("127.0.0.1"))
    assert before_self([t("127.0.0.1"), worse], me) == ([], t("127.0.0.1"))
    assert before_self([better, worse], me) == ([better, worse], None)
