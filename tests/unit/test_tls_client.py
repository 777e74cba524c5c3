"""DomainValidation's name check (deliver/tls_client.py): TlsDomain or the host name
against a certificate's DNS names, wildcards on either side."""

from __future__ import annotations

from typing import Any

import pytest

from mailgate.deliver.tls_client import certificate_matches, certificate_names


def cert(*dns: str, cn: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"subject": ((("commonName", cn or "ignored.test"),),)}
    if dns:
        out["subjectAltName"] = tuple(("DNS", d) for d in dns)
    return out


@pytest.mark.parametrize("names,expected,ok", [
    (("mx.fabrikam.test",), "mx.fabrikam.test", True),
    (("MX.Fabrikam.TEST",), "mx.fabrikam.test.", True),          # case, trailing dot
    (("mx.fabrikam.test",), "mx2.fabrikam.test", False),
    (("*.fabrikam.test",), "mx.fabrikam.test", True),             # one label
    (("*.fabrikam.test",), "a.mx.fabrikam.test", False),          # not two
    (("*.fabrikam.test",), "fabrikam.test", False),
    (("mx.fabrikam.test",), "*.fabrikam.test", True),             # TlsDomain wildcard
    (("a.b.fabrikam.test",), "*.fabrikam.test", True),
    (("mx.fabrikam.test.evil.test",), "*.fabrikam.test", False),
    (("fabrikam.test.evil",), "fabrikam.test", False),
    ((), "mx.fabrikam.test", False),                             # CN only: see below
])
def test_names(names: tuple[str, ...], expected: str, ok: bool) -> None:
    assert certificate_matches(cert(*names), expected) is ok


def test_common_name_counts_only_without_subject_alt_names() -> None:
    assert certificate_names(cert(cn="mx.fabrikam.test")) == ["mx.fabrikam.test"]
    assert certificate_matches(cert(cn="mx.fabrikam.test"), "mx.fabrikam.test")
    assert not certificate_matches(cert("other.test", cn="mx.fabrikam.test"),
                                   "mx.fabrikam.test")
    assert not certificate_matches(None, "mx.fabrikam.test")
