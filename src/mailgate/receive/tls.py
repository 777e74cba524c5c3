"""TLS for Receive connectors: a server SSLContext with Mozilla's "intermediate" profile
(TLS 1.2 and 1.3 only, forward-secret AEAD suites), from the connector's certificate or,
when it has none, from a self-signed one mailgate generates under `<data>/tls/` (valid for
a year, as the profile wants at most, and made again a month before its end).
"""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path
from typing import NamedTuple

# Mozilla Server Side TLS 5.7, intermediate configuration: the TLS 1.2 suites (TLS 1.3's
# are fixed by OpenSSL and all acceptable).
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-CHACHA20-POLY1305",
))


def server_context(certificate: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(certificate, key)
    return ctx


SELF_SIGNED_DAYS = 365          # Mozilla's profiles: a certificate lives at most 366 days
RENEW_BEFORE = 30 * 86400.0     # a self-signed certificate is made again this long before


class SelfSigned(NamedTuple):
    certificate: Path
    key: Path
    not_after: float    # epoch seconds

    @property
    def renew_at(self) -> float:
        return self.not_after - RENEW_BEFORE


def not_after(certificate: Path) -> float:
    """When the (first) certificate in a PEM file ends, in epoch seconds."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    return cert.not_valid_after_utc.timestamp()


def self_signed(folder: Path, hostname: str, now: float) -> SelfSigned:
    """The node's self-signed certificate and key (key mode 0600): the ones in `folder`
    while they are readable and more than RENEW_BEFORE from their end, else new ones."""
    cert, key = folder / "selfsigned.pem", folder / "selfsigned.key"
    if cert.exists() and key.exists():
        try:
            ends = not_after(cert)
        except ValueError:
            ends = 0.0   # unreadable: made again
        if now < ends - RENEW_BEFORE:
            return SelfSigned(cert, key, ends)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    start = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    end = start + datetime.timedelta(days=SELF_SIGNED_DAYS)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start - datetime.timedelta(hours=1))
                   .not_valid_after(end)
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]),
                                  critical=False)
                   .sign(private, hashes.SHA256()))
    tmp_key = key.with_suffix(".key.tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    tmp_cert = cert.with_suffix(".pem.tmp")
    tmp_cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    # Key first: a crash between the two leaves a new key beside the old certificate, which
    # is still due (missing, or near its end), so the pair is made again at the next load.
    os.replace(tmp_key, key)
    os.replace(tmp_cert, cert)
    return SelfSigned(cert, key, end.timestamp())
