"""`mailgate receive-connector new|get|set|remove` and `mailbox set-password`, end to end
through the real CLI (issue #4, README "Managing the organization").

Contract checked: Exchange's names, defaults and ranges; every refused value is one
`mailgate: error:` line, exit 1, and changes nothing; a password is never taken from the
command line, never printed, and never stored in clear.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import pty
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mailgate.admin.passwords import verify_password
from mailgate.directory import load_organization
from mailgate.organization import Organization
from mailgate.settings import load_settings
from mailgate.store import open_store
from tests.conftest import NODE, MailgateEnv
from tests.e2e.test_cli import (
    all_refused,
    as_json,
    get_json,
    ok,
    refused,
    table_header,
    warnings_of,
)

RC = "receive-connector"
MB = 1024 * 1024


def cli_input(env: MailgateEnv, *args: str, stdin: bytes) -> subprocess.CompletedProcess[str]:
    """The CLI with `stdin` as raw bytes (which need not be valid UTF-8)."""
    proc = subprocess.run([sys.executable, "-m", "mailgate", "-c", str(env.config), *args],
                          capture_output=True, input=stdin, cwd=env.root, timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode,
                                       proc.stdout.decode("utf-8", "replace"),
                                       proc.stderr.decode("utf-8", "replace"))


def cli_in_process(env: MailgateEnv, capsys: pytest.CaptureFixture[str],
                   *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI's entry point called in this process: the same code as `python -m mailgate`
    (argument parsing, error handling, output) without the start-up cost, for the long
    lists of refused values. The CLI subprocess tests cover the same contract."""
    from mailgate.cli.main import main

    argv = ["mailgate", "-c", str(env.config), *args]
    old_argv, sys.argv = sys.argv, argv
    code: Any = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = old_argv
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code if isinstance(code, int) else 1, out, err)


def all_refused_in_process(env: MailgateEnv, capsys: pytest.CaptureFixture[str],
                           cases: list[tuple[tuple[str, ...], tuple[str, ...]]]) -> None:
    failures = []
    for args, needles in cases:
        try:
            refused(cli_in_process(env, capsys, *args), *needles)
        except AssertionError as exc:
            failures.append(f"mailgate {' '.join(args)}: {exc}")
    assert not failures, "\n".join(failures)


def new(env: MailgateEnv, *args: str) -> Any:
    return as_json(env.cli(RC, "new", *args, "--json"))


def organization(env: MailgateEnv) -> Organization:
    settings = load_settings(str(env.config))

    async def run() -> Organization:
        store = open_store(settings.store_url, settings.node_name)
        try:
            return await load_organization(store, settings.node_name)
        finally:
            await store.close()
    return asyncio.run(run())


def make_cert(folder: Path, name: str, *, passphrase: bytes | None = None,
              key_mode: int = 0o600) -> tuple[Path, Path]:
    """A self-signed certificate and its key as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name}.contoso.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    encryption: Any = (serialization.BestAvailableEncryption(passphrase) if passphrase
                       else serialization.NoEncryption())
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8, encryption))
    key_path.chmod(key_mode)
    return cert_path, key_path


# -- new / get / set / remove ---------------------------------------------------------------


def test_new_has_exchange_defaults_and_get_shows_table_and_json(env: MailgateEnv) -> None:
    c = new(env, "--name", "Default", "--bindings", "0.0.0.0:25")
    expected = {
        "Name": "Default", "Bindings": ["0.0.0.0:25"], "RemoteIPRanges": ["0.0.0.0/0", "::/0"],
        "PermissionGroups": ["AnonymousUsers"], "AuthMechanism": ["Tls"], "Banner": None,
        "Fqdn": None, "MaxMessageSize": 36 * MB, "MaxRecipientsPerMessage": 200,
        "MaxInboundConnection": 5000, "MaxInboundConnectionPerSource": 20,
        "ConnectionTimeout": 600.0, "ConnectionInactivityTimeout": 300.0, "MaxHopCount": 60,
        "MaxHeaderSize": 256 * 1024, "MaxLogonFailures": 3, "TarpitInterval": 5.0,
        "MaxProtocolErrors": 5, "RequireTLS": False, "TlsCertificate": None, "TlsKey": None,
        "SmtpUtf8Enabled": True, "SourceTransportServers": [NODE], "Enabled": True,
        "Comment": None}
    assert {k: c[k] for k in expected} == expected
    assert set(c) == set(expected) | {"Identity", "Guid"}
    assert get_json(env, RC) == [c]
    assert get_json(env, RC, "default") == [c]
    assert get_json(env, RC, c["Guid"]) == [c]
    assert get_json(env, RC, f"{NODE}\\Default") == [c]
    table = ok(env.cli(RC, "get"))
    assert table_header(table) == ["Name", "Bindings", "RemoteIPRanges", "PermissionGroups",
                                   "AuthMechanism", "Enabled"]
    assert table.stdout.splitlines()[1].split() == [
        "Default", "{0.0.0.0:25}", "{0.0.0.0/0,", "::/0}", "{AnonymousUsers}", "{Tls}", "True"]


def test_round_trip_every_option(env: MailgateEnv, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "mail")
    c = new(env, "--name", "Client", "--bindings", "0.0.0.0:587,[::]:587",
            "--remote-ip-ranges", "10.1.2.3/8", "--remote-ip-ranges",
            "192.168.1.10-192.168.1.20,2001:DB8::/32",
            "--permission-groups", "exchangeusers", "--auth-mechanism",
            "tls,BASICAUTHREQUIRETLS", "--banner", "220 Contoso submission",
            "--fqdn", "Mail.Contoso.TEST", "--max-message-size", "50MB",
            "--max-recipients-per-message", "5000", "--max-inbound-connection", "100",
            "--max-inbound-connection-per-source", "10", "--connection-timeout", "00:20:00",
            "--connection-inactivity-timeout", "2m", "--max-hop-count", "30",
            "--max-header-size", "64KB", "--max-logon-failures", "0",
            "--tarpit-interval", "0s", "--max-protocol-errors", "10", "--require-tls", "true",
            "--tls-certificate", str(cert), "--tls-key", str(key),
            "--smtp-utf8-enabled", "false", "--source-transport-servers", f"{NODE},node2",
            "--enabled", "false", "--comment", "for Outlook")
    expected = {
        "Name": "Client", "Bindings": ["0.0.0.0:587", "[::]:587"],
        "RemoteIPRanges": ["10.0.0.0/8", "192.168.1.10-192.168.1.20", "2001:db8::/32"],
        "PermissionGroups": ["ExchangeUsers"], "AuthMechanism": ["Tls", "BasicAuthRequireTLS"],
        "Banner": "Contoso submission", "Fqdn": "mail.contoso.test",
        "MaxMessageSize": 50 * MB, "MaxRecipientsPerMessage": 5000,
        "MaxInboundConnection": 100, "MaxInboundConnectionPerSource": 10,
        "ConnectionTimeout": 1200.0, "ConnectionInactivityTimeout": 120.0, "MaxHopCount": 30,
        "MaxHeaderSize": 65536, "MaxLogonFailures": 0, "TarpitInterval": 0.0,
        "MaxProtocolErrors": 10, "RequireTLS": True, "TlsCertificate": str(cert),
        "TlsKey": str(key), "SmtpUtf8Enabled": False,
        "SourceTransportServers": [NODE, "node2"], "Enabled": False, "Comment": "for Outlook"}
    assert {k: c[k] for k in expected} == expected
    assert get_json(env, RC, "Client")[0] == c

    # set changes each of them, and get shows the new values
    changed = as_json(env.cli(
        RC, "set", "Client", "--name", "Submission", "--bindings", "127.0.0.1:2587",
        "--remote-ip-ranges", "127.0.0.1", "--permission-groups",
        "AnonymousUsers,ExchangeUsers,Partners", "--auth-mechanism", "Tls,BasicAuth",
        "--banner", "Hello", "--fqdn", "$null", "--max-message-size", "64KB",
        "--max-recipients-per-message", "1", "--max-inbound-connection", "1",
        "--max-inbound-connection-per-source", "10000", "--connection-timeout", "1.00:00:00",
        "--connection-inactivity-timeout", "23:59:59", "--max-hop-count", "500",
        "--max-header-size", "1", "--max-logon-failures", "10", "--tarpit-interval", "10m",
        "--max-protocol-errors", "0", "--require-tls", "false", "--tls-certificate", "$null",
        "--tls-key", "", "--smtp-utf8-enabled", "true", "--source-transport-servers", NODE,
        "--enabled", "true", "--comment", "", "--json"))
    assert changed["Guid"] == c["Guid"]
    assert {k: changed[k] for k in expected} == {
        "Name": "Submission", "Bindings": ["127.0.0.1:2587"], "RemoteIPRanges": ["127.0.0.1"],
        "PermissionGroups": ["AnonymousUsers", "ExchangeUsers", "Partners"],
        "AuthMechanism": ["Tls", "BasicAuth"], "Banner": "Hello", "Fqdn": None,
        "MaxMessageSize": 65536, "MaxRecipientsPerMessage": 1, "MaxInboundConnection": 1,
        "MaxInboundConnectionPerSource": 10000, "ConnectionTimeout": 86400.0,
        "ConnectionInactivityTimeout": 86399.0, "MaxHopCount": 500, "MaxHeaderSize": 1,
        "MaxLogonFailures": 10, "TarpitInterval": 600.0, "MaxProtocolErrors": 0,
        "RequireTLS": False, "TlsCertificate": None, "TlsKey": None, "SmtpUtf8Enabled": True,
        "SourceTransportServers": [NODE], "Enabled": True, "Comment": None}
    assert get_json(env, RC) == [changed]
    # The node reads the same values from the directory.
    [stored] = organization(env).receive_connectors
    assert (stored.name, stored.bindings, stored.connection_timeout) == (
        "Submission", ("127.0.0.1:2587",), 86400.0)

    refused(env.cli(RC, "get", "Client", check=False), "not found")
    ok(env.cli(RC, "remove", "Submission"))
    assert get_json(env, RC) == []
    refused(env.cli(RC, "remove", "Submission", check=False), "Submission", "not found")


def test_add_and_remove_bindings_and_remote_ranges(env: MailgateEnv) -> None:
    new(env, "--name", "Relay", "--bindings", "0.0.0.0:25", "--remote-ip-ranges", "10.0.0.0/8")
    c = as_json(env.cli(RC, "set", "Relay", "--add-remote-ip-ranges", "192.168.0.0/16",
                        "--remove-remote-ip-ranges", "10.0.0.0/8", "--add-bindings",
                        "[::]:25", "--json"))
    assert (c["Bindings"], c["RemoteIPRanges"]) == (["0.0.0.0:25", "[::]:25"],
                                                    ["192.168.0.0/16"])
    before = get_json(env, RC)
    all_refused(env, [
        ((RC, "set", "Relay", "--remove-remote-ip-ranges", "172.16.0.0/12"), ("172.16.0.0/12",)),
        ((RC, "set", "Relay", "--remove-remote-ip-ranges", "192.168.0.0/16"),
         ("--remote-ip-ranges", "at least one")),
        ((RC, "set", "Relay", "--remove-bindings", "0.0.0.0:25", "--remove-bindings",
          "[::]:25"), ("--bindings", "at least one")),
        ((RC, "set", "Relay"), ("at least one setting",)),
    ])
    assert get_json(env, RC) == before


def test_defaults_when_only_some_options_are_given_to_set(env: MailgateEnv) -> None:
    c = new(env, "--name", "Lan", "--bindings", "10.0.0.1:25", "--remote-ip-ranges",
            "10.0.0.0/8", "--banner", "Welcome")
    c2 = as_json(env.cli(RC, "set", "Lan", "--comment", "internal", "--json"))
    assert {**c, "Comment": "internal"} == c2


# -- refusals -----------------------------------------------------------------------------


BAD_VALUES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("--bindings", "0.0.0.0"), ("--bindings", "port")),
    (("--bindings", "0.0.0.0:0"), ("--bindings", "1-65535")),
    (("--bindings", "0.0.0.0:65536"), ("--bindings", "1-65535")),
    (("--bindings", "300.0.0.1:25"), ("--bindings", "not an IP address")),
    (("--bindings", "::1:25"), ("--bindings", "brackets")),
    (("--bindings", "mail.contoso.test:25"), ("--bindings",)),
    (("--bindings", ","), ("--bindings", "at least one")),
    (("--remote-ip-ranges", "10.0.0.0/33"), ("--remote-ip-ranges", "CIDR")),
    (("--remote-ip-ranges", "10.0.0.9-10.0.0.1"), ("--remote-ip-ranges", "comes after")),
    (("--remote-ip-ranges", "10.0.0.1-::1"), ("--remote-ip-ranges", "mixes")),
    (("--remote-ip-ranges", "everyone"), ("--remote-ip-ranges",)),
    (("--permission-groups", "Everyone"), ("--permission-groups", "Everyone",
                                           "AnonymousUsers")),
    (("--permission-groups", "AnonymousUsers,Bogus"), ("--permission-groups", "Bogus")),
    (("--auth-mechanism", "Kerberos"), ("--auth-mechanism", "Kerberos")),
    (("--auth-mechanism", "None,Tls"), ("--auth-mechanism", "None")),
    (("--auth-mechanism", "BasicAuth"), ("BasicAuth", "needs Tls")),
    (("--auth-mechanism", "None", "--require-tls", "true"), ("--require-tls",)),
    (("--banner", "two\nlines"), ("--banner", "CR, LF")),
    (("--banner", "nul\x01x"), ("--banner", "printable")),
    (("--banner", "x" * 201), ("--banner", "200")),
    (("--banner", "421 go away"), ("--banner", "reply code")),
    (("--banner", "220"), ("--banner",)),
    (("--banner", "b\u00e4nner"), ("--banner", "ASCII")),
    (("--fqdn", "bad_host.test"), ("--fqdn", "host name")),
    (("--fqdn", "-x.test"), ("--fqdn",)),
    (("--fqdn", "a..b"), ("--fqdn",)),
    (("--max-message-size", "1KB"), ("--max-message-size", "65,536 bytes")),
    (("--max-message-size", "3GB"), ("--max-message-size",)),
    (("--max-message-size", "unlimited"), ("--max-message-size", "unlimited")),
    (("--max-message-size", "lots"), ("--max-message-size",)),
    (("--max-recipients-per-message", "0"), ("--max-recipients-per-message", "1 and 5000")),
    (("--max-recipients-per-message", "5001"), ("--max-recipients-per-message",)),
    (("--max-recipients-per-message", "many"), ("--max-recipients-per-message",)),
    (("--max-inbound-connection", "0"), ("--max-inbound-connection",)),
    (("--max-inbound-connection", "unlimited"), ("--max-inbound-connection", "unlimited")),
    (("--max-inbound-connection-per-source", "10001"),
     ("--max-inbound-connection-per-source", "10000")),
    (("--connection-timeout", "0s"), ("--connection-timeout",)),
    (("--connection-timeout", "2d"), ("--connection-timeout",)),
    (("--connection-timeout", "soon"), ("--connection-timeout",)),
    (("--connection-inactivity-timeout", "10m"),
     ("--connection-inactivity-timeout", "less than --connection-timeout")),
    (("--connection-timeout", "1m"), ("--connection-inactivity-timeout", "less than")),
    (("--max-hop-count", "0"), ("--max-hop-count", "1 and 500")),
    (("--max-hop-count", "501"), ("--max-hop-count",)),
    (("--max-header-size", "0"), ("--max-header-size",)),
    (("--max-logon-failures", "11"), ("--max-logon-failures", "0 and 10")),
    (("--max-logon-failures", "-1"), ("--max-logon-failures",)),
    (("--tarpit-interval", "11m"), ("--tarpit-interval", "00:10:00")),
    (("--max-protocol-errors", "-1"), ("--max-protocol-errors",)),
    (("--require-tls", "maybe"), ("--require-tls",)),
    (("--enabled", "yes"), ("--enabled",)),
    (("--source-transport-servers", "a/b"), ("--source-transport-servers",)),
    (("--comment", "x" * 1025), ("--comment",)),
]


def test_bad_values_on_new_are_one_line_and_create_nothing(
        env: MailgateEnv, capsys: pytest.CaptureFixture[str]) -> None:
    assert get_json(env, RC) == []

    def base(args: tuple[str, ...]) -> tuple[str, ...]:
        return ("--name", "Bad") + (() if args[0] == "--bindings" else ("--bindings",
                                                                         "0.0.0.0:2525"))
    all_refused_in_process(env, capsys, [((RC, "new", *base(args), *args), needles)
                                         for args, needles in BAD_VALUES]
                + [((RC, "new", "--name", "", "--bindings", "0.0.0.0:25"), ("name",)),
                   ((RC, "new", "--name", "a\\b", "--bindings", "0.0.0.0:25"), ("name",)),
                   ((RC, "new", "--name", "NoBinding"), ("--bindings",))])
    assert get_json(env, RC) == []


def test_bad_values_on_set_are_one_line_and_change_nothing(
        env: MailgateEnv, capsys: pytest.CaptureFixture[str]) -> None:
    new(env, "--name", "Good", "--bindings", "0.0.0.0:2525", "--remote-ip-ranges",
        "10.0.0.0/8")
    before = get_json(env, RC)
    all_refused_in_process(
        env, capsys, [((RC, "set", "Good", *args), needles) for args, needles in BAD_VALUES]
        + [((RC, "set", "Nosuch", "--enabled", "true"), ("Nosuch", "not found"))])
    assert get_json(env, RC) == before


def test_bad_values_in_a_real_process(env: MailgateEnv) -> None:
    """A sample of the refusals above through `python -m mailgate` itself."""
    new(env, "--name", "Good", "--bindings", "0.0.0.0:2525")
    before = get_json(env, RC)
    sample = [BAD_VALUES[i] for i in (0, 8, 11, 15, 17, 26, 32, 39, 46, 48)]
    all_refused(env, [((RC, "set", "Good", *args), needles) for args, needles in sample]
                + [((RC, "new", "--name", "X", "--bindings", "0.0.0.0:1", *args), needles)
                   for args, needles in sample[:4]])
    assert get_json(env, RC) == before


def test_duplicate_name_refused(env: MailgateEnv) -> None:
    new(env, "--name", "Default", "--bindings", "0.0.0.0:25")
    new(env, "--name", "Other", "--bindings", "0.0.0.0:587")
    all_refused(env, [
        ((RC, "new", "--name", "DEFAULT", "--bindings", "0.0.0.0:2525"), ("already exists",)),
        ((RC, "set", "Other", "--name", "default"), ("already exists",)),
    ])
    assert [c["Name"] for c in get_json(env, RC)] == ["Default", "Other"]


def test_connectors_sharing_a_binding_must_differ_in_remote_ranges(env: MailgateEnv) -> None:
    new(env, "--name", "Default", "--bindings", "0.0.0.0:25", "--remote-ip-ranges",
        "0.0.0.0/0")
    before = get_json(env, RC)
    all_refused(env, [
        # Same binding, same ranges.
        ((RC, "new", "--name", "Copy", "--bindings", "0.0.0.0:25", "--remote-ip-ranges",
          "0.0.0.0/0"), ("Default", "--remote-ip-ranges")),
        # A specific address on the port overlaps the wildcard; the same addresses
        # written another way are the same ranges.
        ((RC, "new", "--name", "Copy", "--bindings", "10.0.0.1:25", "--remote-ip-ranges",
          "0.0.0.0-255.255.255.255"), ("Default",)),
        # The default ranges include ::/0, which no IPv4 client uses.
        ((RC, "new", "--name", "Copy", "--bindings", "0.0.0.0:25"), ("Default",)),
    ])
    assert get_json(env, RC) == before
    # Different ranges, another port, another node, or disabled: allowed.
    new(env, "--name", "Relay", "--bindings", "0.0.0.0:25", "--remote-ip-ranges", "10.0.0.0/8")
    new(env, "--name", "Submission", "--bindings", "0.0.0.0:587")
    new(env, "--name", "V6", "--bindings", "[::]:25")
    new(env, "--name", "Elsewhere", "--bindings", "0.0.0.0:25", "--source-transport-servers",
        "node2")
    new(env, "--name", "Spare", "--bindings", "0.0.0.0:25", "--enabled", "false")
    all_refused(env, [
        ((RC, "set", "Spare", "--enabled", "true"), ("Default",)),
        ((RC, "set", "Relay", "--remote-ip-ranges", "0.0.0.0/0"), ("Default",)),
        ((RC, "set", "Elsewhere", "--source-transport-servers", NODE), ("Default",)),
    ])
    assert get_json(env, RC, "Spare")[0]["Enabled"] is False


def test_tls_certificate_and_key(env: MailgateEnv, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "good")
    other_cert, other_key = make_cert(tmp_path, "other")
    _, locked_key = make_cert(tmp_path, "locked", passphrase=b"secret-phrase")
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello\n")
    new(env, "--name", "Tls", "--bindings", "0.0.0.0:587")
    before = get_json(env, RC)
    set_ = (RC, "set", "Tls")
    all_refused(env, [
        ((*set_, "--tls-certificate", str(cert)), ("--tls-certificate", "--tls-key", "both")),
        ((*set_, "--tls-key", str(key)), ("--tls-key", "both")),
        ((*set_, "--tls-certificate", str(tmp_path / "missing.crt"), "--tls-key", str(key)),
         ("missing.crt", "does not exist")),
        ((*set_, "--tls-certificate", str(tmp_path), "--tls-key", str(key)), ("not a file",)),
        ((*set_, "--tls-certificate", str(cert), "--tls-key", str(other_key)),
         ("does not belong",)),
        ((*set_, "--tls-certificate", str(cert), "--tls-key", str(locked_key)),
         ("passphrase",)),
        ((*set_, "--tls-certificate", str(not_pem), "--tls-key", str(key)), ("PEM",)),
    ])
    assert get_json(env, RC) == before
    # A relative path is taken from where the command runs and stored absolute.
    rel = os.path.relpath(cert, env.root)
    c = as_json(env.cli(*set_, "--tls-certificate", rel, "--tls-key", str(key), "--json"))
    assert (c["TlsCertificate"], c["TlsKey"]) == (str(cert), str(key))
    # Changing one of the pair checks the new pair.
    refused(env.cli(*set_, "--tls-key", str(other_key), check=False), "does not belong")
    c = as_json(env.cli(*set_, "--tls-certificate", str(other_cert), "--tls-key",
                        str(other_key), "--json"))
    assert c["TlsCertificate"] == str(other_cert)
    # '$null' for both goes back to the generated self-signed certificate.
    c = as_json(env.cli(*set_, "--tls-certificate", "$null", "--tls-key", "$null", "--json"))
    assert (c["TlsCertificate"], c["TlsKey"]) == (None, None)


def test_warnings_for_readable_key_and_users_without_auth(env: MailgateEnv,
                                                          tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "open", key_mode=0o644)
    proc = ok(env.cli(RC, "new", "--name", "Sub", "--bindings", "0.0.0.0:587",
                      "--permission-groups", "ExchangeUsers", "--tls-certificate", str(cert),
                      "--tls-key", str(key)))
    warnings = warnings_of(proc)
    assert any("ExchangeUsers" in w and "BasicAuthRequireTLS" in w for w in warnings), warnings
    assert any(str(key) in w and "every user" in w for w in warnings), warnings
    proc = ok(env.cli(RC, "set", "Sub", "--auth-mechanism", "Tls,BasicAuthRequireTLS"))
    assert not any("ExchangeUsers" in w for w in warnings_of(proc))


# -- mailbox passwords ----------------------------------------------------------------------

PASSWORD = "Tr0ub4dor&3-horse"


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_set_password_from_stdin_is_hashed_and_never_shown(demo_env: MailgateEnv) -> None:
    env = demo_env
    assert get_json(env, "mailbox", "alice")[0]["HasPassword"] is False
    outputs = [ok(cli_input(env, "mailbox", "set-password", "alice", "--password-stdin",
                            stdin=(PASSWORD + "\n").encode()))]
    assert "alice" in outputs[0].stdout
    outputs += [ok(env.cli("mailbox", "get")), ok(env.cli("mailbox", "get", "--json")),
                ok(env.cli("mailbox", "get", "alice", "--json"))]
    assert get_json(env, "mailbox", "alice")[0]["HasPassword"] is True
    assert "HasPassword" in table_header(outputs[1])
    for proc in outputs:
        assert PASSWORD not in proc.stdout + proc.stderr
        assert "scrypt" not in proc.stdout + proc.stderr       # nor the hash
    # Not in the store's files (the directory data holds only the scrypt hash).
    for path in files_under(env.root):
        assert PASSWORD.encode() not in path.read_bytes(), path
    [alice] = organization(env).mailboxes
    assert alice.password_hash is not None and alice.password_hash.startswith("scrypt$")
    assert verify_password(PASSWORD, alice.password_hash)
    assert not verify_password(PASSWORD + "x", alice.password_hash)


def test_password_survives_other_mailbox_changes_and_can_be_cleared(
        demo_env: MailgateEnv) -> None:
    env = demo_env
    ok(cli_input(env, "mailbox", "set-password", "alice", "--password-stdin",
                 stdin=f"{PASSWORD}\r\n".encode()))
    ok(env.cli("mailbox", "set", "alice", "--name", "alice2", "--primary-smtp-address",
               "alice.smith@contoso.test"))
    [m] = organization(env).mailboxes
    assert m.password_hash is not None and verify_password(PASSWORD, m.password_hash)
    proc = ok(env.cli("mailbox", "set-password", "alice2", "--clear"))
    assert "removed" in proc.stdout
    assert get_json(env, "mailbox", "alice2")[0]["HasPassword"] is False
    assert organization(env).mailboxes[0].password_hash is None


def test_set_password_refusals(demo_env: MailgateEnv) -> None:
    env = demo_env
    sp = ("mailbox", "set-password")
    cases = [
        ((*sp, "alice", "--password-stdin"), b"short\n", ("at least 8",)),
        ((*sp, "alice", "--password-stdin"), b"x" * 300 + b"\n", ("at most 256",)),
        ((*sp, "alice", "--password-stdin"), b"\n", ("--password-stdin", "no password")),
        ((*sp, "alice", "--password-stdin"), b"", ("--password-stdin",)),
        ((*sp, "alice", "--password-stdin"), b"abc\x00defghij\n", ("NUL",)),
        ((*sp, "alice", "--password-stdin"), b"\xff\xfebad-utf8-pw\n", ("UTF-8",)),
        ((*sp, "alice"), PASSWORD.encode() + b"\n", ("not a terminal", "--password-stdin")),
        ((*sp, "alice", "--clear", "--password-stdin"), b"", ("--clear",)),
        ((*sp, "nosuch@contoso.test", "--password-stdin"), PASSWORD.encode() + b"\n",
         ("nosuch@contoso.test", "not found")),
        ((*sp, "nosuch", "--clear"), b"", ("nosuch", "not found")),
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = list(pool.map(lambda case: cli_input(env, *case[0], stdin=case[1]), cases))
    for (args, stdin, needles), proc in zip(cases, procs):
        line = refused(proc, *needles)
        assert "short" not in line and "x" * 20 not in line
    # A password as an argument is refused without printing it.
    proc = env.cli(*sp, "alice", PASSWORD, check=False)
    refused(proc, "command line")
    assert PASSWORD not in proc.stderr
    refused(env.cli(*sp, "alice", "--password", PASSWORD, check=False), "--password")
    assert get_json(env, "mailbox", "alice")[0]["HasPassword"] is False


def run_on_terminal(env: MailgateEnv, args: list[str], answers: list[str],
                    timeout: float = 30) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal (its controlling terminal, as in a shell), typing
    each answer after each prompt; returns the exit status and everything it showed."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.chdir(env.root)
            os.execv(sys.executable, [sys.executable, "-m", "mailgate", "-c",
                                      str(env.config), *args])
        finally:
            os._exit(127)
    out, seen, pending = b"", 0, list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 0.1)[0]:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:   # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if pending and out[seen:].rstrip().endswith(b":"):
                seen = len(out)
                os.write(fd, pending.pop(0).encode() + b"\n")
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a pseudo-terminal")
def test_set_password_prompts_twice_without_echo(demo_env: MailgateEnv) -> None:
    env = demo_env
    status, shown = run_on_terminal(env, ["mailbox", "set-password", "alice"], [
        "short",                                # refused by the policy: asked again
        PASSWORD, PASSWORD + "-typo",           # the two do not match: asked again
        PASSWORD, PASSWORD])
    assert status == 0, shown
    assert shown.count("New password for alice") == 3, shown
    assert "at least 8" in shown and "do not match" in shown, shown
    assert "password of mailbox alice was set" in shown
    assert PASSWORD not in shown and "short" not in shown, shown   # no echo
    [m] = organization(env).mailboxes
    assert m.password_hash is not None and verify_password(PASSWORD, m.password_hash)
