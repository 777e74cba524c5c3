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

import ssl
from typing import Any

ENCRYPTION_ONLY = "EncryptionOnly"
_ANY: ssl.SSLContext | None = None


def client_context(level: str, ca_file: str | None = None) -> ssl.SSLContext:
    global _ANY
    if level == ENCRYPTION_ONLY:
        if _ANY is None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            _ANY = ctx
        return _ANY
    # A file given replaces the system's store (create_default_context loads one or the
    # other); read for each client, so a renewed CA file needs no restart.
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
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
