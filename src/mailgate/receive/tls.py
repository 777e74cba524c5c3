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
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:   # cryptography is imported when a certificate is made, not at start-up
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

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


def not_after(certificate: Path) -> float:
    """When the (first) certificate in a PEM file ends, in epoch seconds."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    return cert.not_valid_after_utc.timestamp()


def self_signed(folder: Path, hostname: str, now: float) -> SelfSigned:
    """The node's self-signed certificate and key (key mode 0600) in `folder`: the ones there
    while they belong together, live at most 366 days and are more than RENEW_BEFORE from
    their end; else a new certificate, valid for SELF_SIGNED_DAYS, for the key already there
    when it loads (so a DANE record that pins the key, `3 1 1`, stays true) or a new key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert, key = folder / "selfsigned.pem", folder / "selfsigned.key"
    private = _read_key(key)
    if private is not None and cert.exists():
        try:
            current: x509.Certificate | None = x509.load_pem_x509_certificate(
                cert.read_bytes())
        except ValueError:
            current = None   # unreadable: made again
        if current is not None and _public(current.public_key()) == _public(
                private.public_key()):
            ends = current.not_valid_after_utc.timestamp()
            lifespan = current.not_valid_after_utc - current.not_valid_before_utc
            if now < ends - RENEW_BEFORE and lifespan <= datetime.timedelta(days=366):
                return SelfSigned(cert, key, ends)

    folder.mkdir(parents=True, exist_ok=True)
    if private is None:
        private = ec.generate_private_key(ec.SECP256R1())
        tmp_key = key.with_suffix(".key.tmp")
        fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        # A crash before the certificate is written leaves a key that the old certificate
        # does not match: the next call makes the certificate for it.
        os.replace(tmp_key, key)
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
    tmp_cert = cert.with_suffix(".pem.tmp")
    tmp_cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_cert, cert)
    return SelfSigned(cert, key, end.timestamp())


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None:
    """The private key in `path`, or None when there is none or it does not load (it is
    then replaced). A key that cannot be read (permissions) raises OSError."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return None
    if isinstance(private, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        return private
    return None


def _public(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))
