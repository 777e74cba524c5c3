"""The TLS of a running node's Receive connector (issue #4): scanned by sslyze against
Mozilla's intermediate profile (reliability T25), and a renewed certificate taken without a
restart. Real node, STARTTLS over loopback."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mailgate.receive import smtp_listener
from mailgate.receive.tls import INTERMEDIATE_CIPHERS
from tests.conftest import MailgateEnv, NodeThread
from tests.integration.test_receive_tls import der, rsa_certificate
from tests.peers import free_port, sslyze
from tests.smtp import add_connector, chat, client_tls, read_reply, wait_listening


def compliance_findings(output: str) -> dict[str, str]:
    """sslyze's findings against the Mozilla profile: check name -> its message."""
    _, _, part = output.partition("COMPLIANCE AGAINST")
    assert part, output
    return dict(re.findall(r"^\s+\* (\w+): (.*)$", part, re.M))


def test_t25_tls_scan_finds_only_tls_1_2_and_1_3_with_the_profiles_suites(
        demo_env: MailgateEnv, tmp_path: Path) -> None:
    """T25: sslyze over STARTTLS. Only TLS 1.2 and 1.3; every TLS 1.2 suite in Mozilla's
    intermediate list (so no CBC, RC4, 3DES, NULL or export suite); no compression, no
    Heartbleed or CCS injection. Against the profile, the scan finds only that the
    self-signed test certificate is not trusted, and the curves X448 and secp521r1 besides
    the profile's X25519, P-256 and P-384 (Python 3.11 can set one curve or the library's
    list; Postfix offers the same list)."""
    port = free_port()
    add_connector(demo_env, port)
    node = NodeThread(demo_env)
    try:
        wait_listening(port)
        out = tmp_path / "scan.json"
        scan = subprocess.run(
            [sslyze(), "--starttls", "smtp", "--mozilla_config", "intermediate",
             "--json_out", str(out), f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=240)
    finally:
        node.stop()
    result = json.loads(out.read_text())["server_scan_results"][0]
    assert result["scan_status"] == "COMPLETED", scan.stdout
    scanned = result["scan_result"]

    def accepted(kind: str) -> set[str]:
        assert scanned[kind]["status"] == "COMPLETED", scanned[kind]
        return {c["cipher_suite"]["openssl_name"]
                for c in scanned[kind]["result"]["accepted_cipher_suites"]}

    for old in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        assert accepted(f"{old}_cipher_suites") == set(), old
    tls12 = accepted("tls_1_2_cipher_suites")
    assert tls12 and tls12 <= set(INTERMEDIATE_CIPHERS.split(":"))
    assert accepted("tls_1_3_cipher_suites")
    assert scanned["tls_compression"]["result"]["supports_compression"] is False
    assert scanned["heartbleed"]["result"]["is_vulnerable_to_heartbleed"] is False
    assert scanned["openssl_ccs_injection"]["result"][
        "is_vulnerable_to_ccs_injection"] is False
    curves = {c["name"] for c in scanned["elliptic_curves"]["result"]["supported_curves"]}
    assert {"X25519", "secp256r1", "secp384r1"} <= curves

    findings = compliance_findings(scan.stdout)
    assert set(findings) == {"certificate_path_validation", "tls_curves"}, scan.stdout
    assert re.findall(r"'(\w+)'", findings["tls_curves"]) in (
        ["X448", "secp521r1"], ["secp521r1", "X448"]), findings["tls_curves"]


def starttls_certificate(port: int) -> bytes:
    """The certificate (DER) the connector presents after STARTTLS."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        read_reply(s)
        chat(s, b"EHLO client.test")
        assert chat(s, b"STARTTLS").startswith(b"220")
        with client_tls().wrap_socket(s, server_hostname="localhost") as tls:
            cert = tls.getpeercert(binary_form=True)
            assert cert is not None
            return cert
    finally:
        s.close()


def test_a_renewed_certificate_is_presented_without_a_restart(
        demo_env: MailgateEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connector's certificate files replaced in place (as certbot renews) are presented
    to new sessions once the node has checked them (every 60 s; 0.2 s here)."""
    monkeypatch.setattr(smtp_listener, "TLS_RECHECK", 0.2)
    cert, key = rsa_certificate(tmp_path, name="mx")
    first = der(cert)
    port = free_port()
    add_connector(demo_env, port, "--tls-certificate", str(cert), "--tls-key", str(key))
    node = NodeThread(demo_env)
    try:
        wait_listening(port)
        assert starttls_certificate(port) == first
        rsa_certificate(tmp_path, name="mx")
        renewed = der(cert)
        assert renewed != first
        deadline = time.monotonic() + 10
        while (seen := starttls_certificate(port)) != renewed and time.monotonic() < deadline:
            assert seen == first
            time.sleep(0.1)
        assert seen == renewed
    finally:
        node.stop()
