"""A Receive connector's TLS (receive/tls.py, receive/tls_contexts.py) against real
handshakes over loopback sockets: TLS 1.3, and TLS 1.2 only with the forward-secret AEAD
suites of Mozilla's intermediate profile; the generated self-signed certificate lives a year
and is made again a month before its end; a renewed certificate is served after a refresh,
a broken renewal keeps the certificate in use, and one near its end is warned of."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import ssl
import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from mailgate.clock import FakeClock
from mailgate.receive.tls import RENEW_BEFORE, SELF_SIGNED_DAYS, self_signed, server_context
from mailgate.receive.tls_contexts import Pair, TlsContexts
from tests.smtp import client_tls

DAY = 86400.0
SELF: set[Pair] = {(None, None)}   # the pair of the self-signed certificate


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[str, str]:
    """One handshake over a loopback socket pair: the (version, cipher) both agreed on.
    Raises the client's ssl.SSLError when the server refuses."""
    version, cipher, _ = served(server, client)
    return version, cipher


def served(server: ssl.SSLContext, client: ssl.SSLContext | None = None
           ) -> tuple[str, str, bytes]:
    """One handshake: version, cipher and the server's certificate (DER)."""
    client = client or client_tls()
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    server_error: list[BaseException] = []

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as s:
                s.recv(1)   # until the client closes
        except (ssl.SSLError, OSError) as exc:
            server_error.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client.wrap_socket(b, server_hostname="localhost") as c:
            version, cipher = c.version(), c.cipher()
            der = c.getpeercert(binary_form=True)
            assert version is not None and cipher is not None and der is not None
            return version, cipher[0], der
    finally:
        b.close()
        t.join(10)
        a.close()


def client(version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    ctx = client_tls()
    ctx.minimum_version = ctx.maximum_version = version
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def rsa_certificate(folder: Path, days: float = 90, name: str = "rsa",
                    now: float | None = None) -> tuple[Path, Path]:
    """A new RSA certificate and key, written (each by a rename, as certbot's tools do) to
    `<name>.pem` and `<name>.key`. With an RSA key a server could offer the static-RSA
    suites, so refusing them is the cipher policy's doing, not the key type's."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    start = datetime.datetime.fromtimestamp(time.time() if now is None else now,
                                            datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start - datetime.timedelta(days=1))
            .not_valid_after(start + datetime.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    replace(key_path, key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    replace(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def der(pem: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(
        serialization.Encoding.DER)


def test_tls_1_3_and_1_2_with_forward_secret_aead_suites_are_accepted(tmp_path: Path) -> None:
    made = self_signed(tmp_path / "tls", "localhost", time.time())
    server = server_context(made.certificate, made.key)
    version, _ = handshake(server, client(ssl.TLSVersion.TLSv1_3))
    assert version == "TLSv1.3"
    version, cipher = handshake(server, client(ssl.TLSVersion.TLSv1_2))
    # The server chooses (OP_CIPHER_SERVER_PREFERENCE): the profile's first suite.
    assert (version, cipher) == ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")
    rsa_server = server_context(*rsa_certificate(tmp_path))
    version, cipher = handshake(rsa_server, client(ssl.TLSVersion.TLSv1_2,
                                                   "ECDHE-RSA-CHACHA20-POLY1305"))
    assert (version, cipher) == ("TLSv1.2", "ECDHE-RSA-CHACHA20-POLY1305")


@pytest.mark.parametrize("suite", [
    "AES128-GCM-SHA256",               # static RSA key exchange: no forward secrecy
    "AES256-SHA256",                   # static RSA and CBC
    "ECDHE-RSA-AES128-SHA256",         # forward secret, but CBC
    "ECDHE-RSA-AES256-SHA",            # CBC with SHA-1
])
def test_tls_1_2_suites_outside_the_intermediate_profile_are_refused(
        tmp_path: Path, suite: str) -> None:
    server = server_context(*rsa_certificate(tmp_path))
    weak = client(ssl.TLSVersion.TLSv1_2, f"{suite}:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        handshake(server, weak)


def test_the_self_signed_certificate_lives_a_year_and_is_made_again_a_month_before_its_end(
        tmp_path: Path) -> None:
    folder, start = tmp_path / "tls", 1_800_000_000.0
    made = self_signed(folder, "mx.contoso.test", start)
    assert stat.S_IMODE(made.key.stat().st_mode) == 0o600
    assert made.not_after == start + SELF_SIGNED_DAYS * DAY
    cert = x509.load_pem_x509_certificate(made.certificate.read_bytes())
    assert cert.not_valid_after_utc.timestamp() == made.not_after
    lifespan = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifespan <= datetime.timedelta(days=366)   # Mozilla's profiles: at most 366 days
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mx.contoso.test"]
    first = made.certificate.read_bytes(), made.key.read_bytes()

    # Kept while more than a month from its end...
    later = start + SELF_SIGNED_DAYS * DAY - RENEW_BEFORE - 1
    assert self_signed(folder, "mx.contoso.test", later) == made
    assert (made.certificate.read_bytes(), made.key.read_bytes()) == first
    # ...then made again for another year, for the same key (a DANE `3 1 1` record that
    # pins the key stays true).
    due = later + 2
    again = self_signed(folder, "mx.contoso.test", due)
    assert again.not_after == due + SELF_SIGNED_DAYS * DAY
    assert again.certificate.read_bytes() != first[0] and again.key.read_bytes() == first[1]
    server_context(again.certificate, again.key)   # they belong together
    assert sorted(p.name for p in folder.iterdir()) == ["selfsigned.key", "selfsigned.pem"]


def test_a_self_signed_certificate_of_an_earlier_version_is_made_again_for_its_key(
        tmp_path: Path) -> None:
    """Before 2026-12-01 mailgate made it for ten years; now at most 366 days."""
    folder, now = tmp_path / "tls", 1_800_000_000.0
    made = self_signed(folder, "mx.contoso.test", now)
    key = serialization.load_pem_private_key(made.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.contoso.test")])
    start = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    ten_years = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                 .public_key(key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=3650))
                 .sign(key, hashes.SHA256()))
    made.certificate.write_bytes(ten_years.public_bytes(serialization.Encoding.PEM))
    again = self_signed(folder, "mx.contoso.test", now + DAY)
    assert again.not_after == now + DAY + SELF_SIGNED_DAYS * DAY
    assert again.key.read_bytes() == made.key.read_bytes()


def test_a_key_without_its_certificate_gets_one(tmp_path: Path) -> None:
    """What a crash between writing the key and the certificate leaves."""
    folder = tmp_path / "tls"
    made = self_signed(folder, "mx.contoso.test", 1_800_000_000.0)
    key = made.key.read_bytes()
    made.certificate.unlink()
    again = self_signed(folder, "mx.contoso.test", 1_800_000_000.0)
    assert again.key.read_bytes() == key
    server_context(again.certificate, again.key)


def test_an_unreadable_self_signed_certificate_or_key_is_made_again(tmp_path: Path) -> None:
    folder = tmp_path / "tls"
    made = self_signed(folder, "mx.contoso.test", 1_800_000_000.0)
    made.certificate.write_bytes(b"not a certificate")
    again = self_signed(folder, "mx.contoso.test", 1_800_000_000.0)
    server_context(again.certificate, again.key)   # a pair that loads
    assert again.certificate.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    made.key.write_bytes(b"not a key")
    third = self_signed(folder, "mx.contoso.test", 1_800_000_000.0)
    server_context(third.certificate, third.key)
    assert stat.S_IMODE(third.key.stat().st_mode) == 0o600


def test_a_renewed_certificate_is_served_after_a_refresh_without_a_restart(
        tmp_path: Path) -> None:
    cert, key = rsa_certificate(tmp_path)
    first = der(cert)
    contexts = TlsContexts(tmp_path / "tls", "localhost", FakeClock(time.time()))
    pair = (str(cert), str(key))
    ctx = contexts.get(pair, "Default")
    assert ctx is not None and served(ctx)[2] == first
    contexts.refresh({pair})   # nothing changed: the same context
    assert contexts.get(pair, "Default") is ctx

    rsa_certificate(tmp_path)   # renewed in place, same paths
    renewed = der(cert)
    assert renewed != first
    assert contexts.get(pair, "Default") is ctx   # not before the refresh
    contexts.refresh({pair})
    ctx2 = contexts.get(pair, "Default")
    assert ctx2 is not None and served(ctx2)[2] == renewed


def test_a_broken_renewal_keeps_the_certificate_in_use_and_is_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = rsa_certificate(tmp_path)
    first = der(cert)
    contexts = TlsContexts(tmp_path / "tls", "localhost", FakeClock(time.time()))
    pair = (str(cert), str(key))
    ctx = contexts.get(pair, "Default")
    replace(cert, b"-----BEGIN CERTIFICATE-----\nhalf a certificate\n")
    with caplog.at_level(logging.INFO, logger="mailgate.receive.tls_contexts"):
        contexts.refresh({pair})
        contexts.refresh({pair})
        still = contexts.get(pair, "Default")
        assert still is not None and still is ctx and served(still)[2] == first
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and str(cert) in errors[0].getMessage()
        assert "stays in use" in errors[0].getMessage()

        rsa_certificate(tmp_path)   # fixed
        contexts.refresh({pair})
        fixed = contexts.get(pair, "Default")
        assert fixed is not None and served(fixed)[2] == der(cert) != first
        assert any("loaded the certificate" in r.getMessage() for r in caplog.records)


def test_the_self_signed_certificate_is_made_again_by_a_refresh_when_due(
        tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    contexts = TlsContexts(tmp_path / "tls", "localhost", clock)
    ctx = contexts.get((None, None), "Default")
    assert ctx is not None
    first = served(ctx)[2]
    clock.advance(SELF_SIGNED_DAYS * DAY - RENEW_BEFORE - 60)
    contexts.refresh(SELF)
    assert contexts.get((None, None), "Default") is ctx
    clock.advance(120)
    contexts.refresh(SELF)
    renewed = contexts.get((None, None), "Default")
    assert renewed is not None and renewed is not ctx
    assert served(renewed)[2] == der(tmp_path / "tls" / "selfsigned.pem") != first


def test_a_configured_certificate_near_its_end_is_warned_of_once_a_day(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = int(time.time()) + 0.5   # the certificate's end, in whole seconds: 9.99 days on
    clock = FakeClock(now)
    cert, key = rsa_certificate(tmp_path, days=10, now=now)
    pair = (str(cert), str(key))
    contexts = TlsContexts(tmp_path / "tls", "localhost", clock)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    with caplog.at_level(logging.WARNING, logger="mailgate.receive.tls_contexts"):
        assert contexts.get(pair, "Default") is not None
        assert len(warnings()) == 1 and "in 9 days" in warnings()[0]
        clock.advance(3600)
        contexts.refresh({pair})
        assert len(warnings()) == 1
        clock.advance(DAY)
        contexts.refresh({pair})
        assert len(warnings()) == 2
        clock.advance(10 * DAY)
        contexts.refresh({pair})
        assert len(warnings()) == 3 and "ended" in warnings()[-1]


def test_a_pair_that_cannot_load_gives_no_tls_and_is_retried_later(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    contexts = TlsContexts(tmp_path / "tls", "localhost", FakeClock(time.time()))
    pair = (str(tmp_path / "missing.pem"), str(tmp_path / "missing.key"))
    with caplog.at_level(logging.ERROR, logger="mailgate.receive.tls_contexts"):
        assert contexts.get(pair, "Default") is None
        assert contexts.get(pair, "Default") is None   # not tried (nor logged) again at once
    assert len(caplog.records) == 1 and "no TLS for the Default connector" in caplog.text
    rsa_certificate(tmp_path, name="missing")
    contexts.forget_failures()   # what a configuration change does
    assert contexts.get(pair, "Default") is not None


def test_a_deleted_self_signed_certificate_is_made_again_by_a_refresh(tmp_path: Path) -> None:
    contexts = TlsContexts(tmp_path / "tls", "localhost", FakeClock(time.time()))
    ctx = contexts.get((None, None), "Default")
    assert ctx is not None
    first = served(ctx)[2]
    for p in (tmp_path / "tls").iterdir():
        p.unlink()
    contexts.refresh(SELF)
    renewed = contexts.get((None, None), "Default")
    assert renewed is not None and served(renewed)[2] == der(tmp_path / "tls" / "selfsigned.pem")
    assert served(renewed)[2] != first


def test_a_pair_no_longer_in_use_is_forgotten_not_reloaded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A connector moved to new files: the old ones may be deleted without an error."""
    cert, key = rsa_certificate(tmp_path, name="old")
    old = (str(cert), str(key))
    contexts = TlsContexts(tmp_path / "tls", "localhost", FakeClock(time.time()))
    assert contexts.get(old, "Default") is not None
    cert.unlink()
    key.unlink()
    with caplog.at_level(logging.ERROR, logger="mailgate.receive.tls_contexts"):
        contexts.refresh(SELF)
    assert caplog.records == [] and not contexts.has(old)
