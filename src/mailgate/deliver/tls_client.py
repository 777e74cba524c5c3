"""The TLS side of Send connectors (Exchange's TlsAuthLevel, TlsDomain; PRODUCT §5).

- `client_context(level, ca_file)`: TLS 1.2 or later. EncryptionOnly takes any
  certificate (Postfix's `may`/`encrypt`, what most MTA-to-MTA TLS is). CertificateValidation
  and DomainValidation need a chain to a trusted CA: the PEM certificates of `ca_file`
  when given, else the system's store. Names are not checked by OpenSSL here:
- `certificate_matches(cert, expected)` is DomainValidation's check, after the handshake:
  `expected` is TlsDomain (`contoso.com`, or `*.contoso.com` for any host under it) or, when
  the connector has none, the host name connected to (the MX host or smart host). A
  certificate's names are its DNS subjectAltNames (its common name only when it has
  none); a certificate name `*.x` covers one label, as RFC 6125 says.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from mailgate.smtp_connectors import ENCRYPTION_ONLY

_CONTEXTS: dict[tuple[bool, str | None, int | None], ssl.SSLContext] = {}


def client_context(level: str, ca_file: str | None = None) -> ssl.SSLContext:
    """The context for `level`, made once: loading a CA store takes milliseconds, and a
    client is made for every delivery batch. A changed CA file (renewed: a new
    modification time) is loaded again, so it needs no restart."""
    validate = level != ENCRYPTION_ONLY
    ca = ca_file if validate else None
    key = (validate, ca, os.stat(ca).st_mtime_ns if ca else None)
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        # A file given replaces the system's store (create_default_context loads one or
        # the other).
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED if validate else ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if len(_CONTEXTS) >= 32:   # CA files renewed many times: keep only the current
            _CONTEXTS.clear()
        _CONTEXTS[key] = ctx
    return ctx


def certificate_names(cert: dict[str, Any] | None) -> list[str]:
    if not cert:
        return []
    sans = [str(v).lower() for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    if sans:
        return sans
    return [str(v).lower() for rdn in cert.get("subject", ()) for k, v in rdn
            if k == "commonName"]


def certificate_matches(cert: dict[str, Any] | None, expected: str) -> bool:
    want = expected.lower().rstrip(".")
    names = certificate_names(cert)
    if want.startswith("*."):
        base = want[2:]
        return any(n == want or n.endswith("." + base) for n in names)
    parent = want.split(".", 1)[1] if "." in want else None
    return any(n == want or (n.startswith("*.") and parent is not None and n[2:] == parent)
               for n in names)
