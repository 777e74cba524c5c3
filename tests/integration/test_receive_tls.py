"""A Receive connector's TLS (receive/tls.py) against real handshakes over loopback sockets:
TLS 1.3, and TLS 1.2 only with the forward-secret AEAD suites of Mozilla's intermediate
profile; the generated self-signed certificate is made once, with a private key file."""

from __future__ import annotations

import datetime
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from mailgate.receive.tls import server_context, self_signed


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[str, str]:
    """One handshake over a loopback socket pair: the (version, cipher) both agreed on.
    Raises the client's ssl.SSLError when the server refuses."""
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
            assert version is not None and cipher is not None
            return version, cipher[0]
    finally:
        b.close()
        t.join(10)
        a.close()


def client(version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = version
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def rsa_certificate(folder: Path) -> tuple[Path, Path]:
    """An RSA certificate: with it a server could offer the static-RSA suites, so refusing
    them is the cipher policy's doing, not the key type's."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "rsa.pem", folder / "rsa.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_1_3_and_1_2_with_forward_secret_aead_suites_are_accepted(tmp_path: Path) -> None:
    server = server_context(*self_signed(tmp_path / "tls", "localhost"))
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


def test_the_self_signed_certificate_is_made_once_with_a_private_key_file(
        tmp_path: Path) -> None:
    folder = tmp_path / "tls"
    cert, key = self_signed(folder, "mx.contoso.test")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = cert.read_bytes(), key.read_bytes()
    again = self_signed(folder, "mx.contoso.test")
    assert again == (cert, key)
    assert (cert.read_bytes(), key.read_bytes()) == first
    loaded = x509.load_pem_x509_certificate(first[0])
    names = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mx.contoso.test"]
    assert sorted(p.name for p in folder.iterdir()) == ["selfsigned.key", "selfsigned.pem"]
