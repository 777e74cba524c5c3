"""The administration CLI, end to end: every command runs the real `python -m mailgate`
subprocess against a temp node folder (PRODUCT §4.1-4.4, README "Managing the
organization" and "Node configuration", reference §1.2-1.4, §2.10, §4.7).

Contract checked throughout: a `get` prints a table by default and JSON with `--json`;
a refused command prints one clear line on stderr, exits non-zero, and never shows a
Python traceback.
"""

from __future__ import annotations

import email
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


from tests.conftest import NODE, MailgateEnv, NodeThread, drop_file, wait_for

# -- helpers ----------------------------------------------------------------------------


def run_mailgate(*args: str, cwd: Path, extra_env: dict[str, str] | None = None,
                 drop_env: tuple[str, ...] = ("MAILGATE_CONFIG",)
                 ) -> subprocess.CompletedProcess[str]:
    """Run `python -m mailgate ARGS` without the fixture's `-c` (for init and config lookup)."""
    environ = {k: v for k, v in os.environ.items() if k not in drop_env}
    environ.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "mailgate", *args], capture_output=True,
                          text=True, cwd=cwd, env=environ, timeout=60)


def cli_each(env: MailgateEnv, *argsets: tuple[str, ...]
             ) -> list[subprocess.CompletedProcess[str]]:
    """Run independent, read-only CLI commands (refusals, gets) a few at a time, to keep
    the file fast; results are in the order given. The store must already exist."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: env.cli(*args, check=False), argsets))


def all_refused(env: MailgateEnv, cases: list[tuple[tuple[str, ...], tuple[str, ...]]]
                ) -> None:
    """Each (args, needles) is refused as `refused` checks; every failure is reported."""
    failures = []
    for (args, needles), proc in zip(cases, cli_each(env, *(args for args, _ in cases))):
        try:
            refused(proc, *needles)
        except AssertionError as exc:
            failures.append(f"mailgate {' '.join(args)}: {exc}")
    assert not failures, "\n".join(failures)


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout


def stderr_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def refused(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """An administrator error: exit 1, one `mailgate: error:` line naming the problem."""
    no_traceback(proc)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("mailgate: error: "), line
    for needle in needles:
        assert needle.lower() in line.lower(), (needle, line)
    assert proc.stdout == "", proc.stdout
    return line


def rejected(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Refused while parsing options: non-zero exit, the option named, no traceback.
    (One line and exit 1 are checked separately, see test_option_value_errors_are_one_line.)"""
    no_traceback(proc)
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    for needle in needles:
        assert needle.lower() in proc.stderr.lower(), (needle, proc.stderr)
    assert proc.stdout == "", proc.stdout


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    no_traceback(proc)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    ok(proc)
    return json.loads(proc.stdout)


def get_json(env: MailgateEnv, noun: str, *identity: str) -> Any:
    return as_json(env.cli(noun, "get", *identity, "--json"))


def table_header(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return ok(proc).stdout.splitlines()[0].split()


def warnings_of(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in stderr_lines(proc) if line.startswith("WARNING:")]


FAX_MAIL = (b"From: alice@contoso.test\nTo: IMCEAFAX-+2B15551234@contoso.test\n"
            b"Subject: %s\n\nA fax.\n")


# -- init -------------------------------------------------------------------------------


def test_init_demo_on_empty_folder_writes_config_folders_and_demo_objects(
        tmp_path: Path) -> None:
    """`init DIR --demo` on an empty folder writes the config, the folders and the demo objects."""
    site = tmp_path / "site"
    site.mkdir()
    proc = ok(run_mailgate("init", str(site), "--demo", cwd=tmp_path))
    config = site / "mailgate.toml"
    assert config.is_file(), proc.stdout
    assert "data_dir" in config.read_text()
    for sub in ("pickup", "replay", "drop", "drop/Fax", "mailboxes"):
        assert (site / "var" / sub).is_dir(), sub
    assert str(site / "var" / "pickup") in proc.stdout

    def get(noun: str) -> Any:
        return as_json(run_mailgate("-c", str(config), noun, "get", "--json", cwd=tmp_path))
    domains = get("accepted-domain")
    assert [(d["DomainName"], d["DomainType"], d["Default"]) for d in domains] == [
        ("contoso.test", "Authoritative", True)]
    mailboxes = get("mailbox")
    assert [(m["Name"], m["EmailAddresses"]) for m in mailboxes] == [
        ("alice", ["SMTP:alice@contoso.test", "FAX:+15550001"])]
    connectors = get("foreign-connector")
    assert [(c["Name"], c["AddressSpaces"], c["Enabled"]) for c in connectors] == [
        ("Fax", ["FAX:*;1"], True)]


def test_init_demo_again_changes_nothing(demo_env: MailgateEnv) -> None:
    """Running `init --demo` again succeeds and changes neither the config nor any object."""
    config_before = demo_env.config.read_text()
    nouns = ("accepted-domain", "mailbox", "foreign-connector")
    before = {n: get_json(demo_env, n) for n in nouns}
    proc = ok(demo_env.cli("init", str(demo_env.root), "--demo"))
    assert "Created" not in proc.stdout
    assert demo_env.config.read_text() == config_before
    assert {n: get_json(demo_env, n) for n in nouns} == before


def test_init_without_demo_creates_folders_but_no_objects(env: MailgateEnv) -> None:
    """`init` without --demo creates the data folders but no domain, mailbox or connector."""
    ok(env.cli("init", str(env.root)))
    for sub in ("pickup", "replay", "drop", "mailboxes"):
        assert (env.data / sub).is_dir(), sub
    assert not (env.data / "drop" / "Fax").exists()
    for noun in ("accepted-domain", "mailbox", "foreign-connector"):
        assert get_json(env, noun) == [], noun


# -- accepted domains -------------------------------------------------------------------


def test_first_accepted_domain_becomes_default(env: MailgateEnv) -> None:
    """The first accepted domain becomes the default without --default; later ones do not."""
    first = as_json(env.cli("accepted-domain", "new", "--domain-name", "contoso.test",
                            "--json"))
    assert first["Default"] is True
    second = as_json(env.cli("accepted-domain", "new", "--domain-name", "fabrikam.test",
                             "--json"))
    assert second["Default"] is False
    assert {d["DomainName"]: d["Default"] for d in get_json(env, "accepted-domain")} == {
        "contoso.test": True, "fabrikam.test": False}


def test_default_flag_moves_the_default_domain(env: MailgateEnv) -> None:
    """`new --default` and `set --default true` move the default; only one domain is default."""
    env.cli("accepted-domain", "new", "--domain-name", "contoso.test")
    env.cli("accepted-domain", "new", "--domain-name", "fabrikam.test", "--default")
    assert {d["DomainName"]: d["Default"] for d in get_json(env, "accepted-domain")} == {
        "contoso.test": False, "fabrikam.test": True}
    env.cli("accepted-domain", "set", "contoso.test", "--default", "true")
    assert {d["DomainName"]: d["Default"] for d in get_json(env, "accepted-domain")} == {
        "contoso.test": True, "fabrikam.test": False}


def test_default_domain_cannot_be_removed_while_others_exist(env: MailgateEnv) -> None:
    """The default domain cannot be removed while other domains exist (one clear error line)."""
    env.cli("accepted-domain", "new", "--domain-name", "contoso.test")
    env.cli("accepted-domain", "new", "--domain-name", "fabrikam.test")
    refused(env.cli("accepted-domain", "remove", "contoso.test", check=False),
            "contoso.test", "default")
    ok(env.cli("accepted-domain", "remove", "fabrikam.test"))
    ok(env.cli("accepted-domain", "remove", "contoso.test"))
    assert get_json(env, "accepted-domain") == []


def test_invalid_domain_names_refused(env: MailgateEnv) -> None:
    """Invalid domain names are refused with one stderr line and exit 1; nothing is created."""
    assert get_json(env, "accepted-domain") == []
    names = ["bad_domain.test", "-bad.test", "a..b", "", "*.contoso.test", "a" * 64 + ".test"]
    all_refused(env, [(("accepted-domain", "new", "--domain-name", n),
                       ("not a valid domain name",)) for n in names])
    assert get_json(env, "accepted-domain") == []


def test_unknown_domain_type_refused(env: MailgateEnv) -> None:
    """`--domain-type` other than authoritative|internal-relay is refused on new and set."""
    refused(env.cli("accepted-domain", "new", "--domain-name", "contoso.test",
                    "--domain-type", "external-relay", check=False), "--domain-type")
    d = as_json(env.cli("accepted-domain", "new", "--domain-name", "contoso.test",
                        "--domain-type", "internal-relay", "--json"))
    assert d["DomainType"] == "InternalRelay"
    refused(env.cli("accepted-domain", "set", "contoso.test", "--domain-type", "bogus",
                    check=False), "--domain-type")
    assert get_json(env, "accepted-domain", "contoso.test")[0]["DomainType"] == "InternalRelay"


def test_duplicate_domain_refused(env: MailgateEnv) -> None:
    """A domain that is already accepted (any case, any name) is refused with one line."""
    env.cli("accepted-domain", "new", "--domain-name", "contoso.test")
    refused(env.cli("accepted-domain", "new", "--domain-name", "contoso.test", check=False),
            "already exists")
    refused(env.cli("accepted-domain", "new", "--domain-name", "CONTOSO.test",
                    "--name", "other", check=False), "contoso.test", "already exists")
    assert len(get_json(env, "accepted-domain")) == 1


def test_accepted_domain_get_uses_exchange_property_names(env: MailgateEnv) -> None:
    """`accepted-domain get` uses Name, DomainName, DomainType, Default in table and JSON."""
    env.cli("accepted-domain", "new", "--domain-name", "contoso.test", "--name", "Contoso")
    env.cli("accepted-domain", "new", "--domain-name", "fabrikam.test")
    assert table_header(env.cli("accepted-domain", "get")) == [
        "Name", "DomainName", "DomainType", "Default"]
    rows = get_json(env, "accepted-domain", "Contoso")
    assert len(rows) == 1
    assert {k: rows[0][k] for k in ("Name", "DomainName", "DomainType", "Default")} == {
        "Name": "Contoso", "DomainName": "contoso.test", "DomainType": "Authoritative",
        "Default": True}
    assert get_json(env, "accepted-domain", "contoso.test")[0]["Name"] == "Contoso"
    refused(env.cli("accepted-domain", "get", "nosuch.test", check=False), "nosuch.test",
            "not found")


# -- mailboxes --------------------------------------------------------------------------


def test_mailbox_addresses_must_be_in_an_accepted_domain(demo_env: MailgateEnv) -> None:
    """Mailbox SMTP addresses outside the accepted domains (or malformed) are refused."""
    env = demo_env
    refused(env.cli("mailbox", "new", "--name", "bob", "--primary-smtp-address",
                    "bob@fabrikam.test", check=False), "bob@fabrikam.test", "accepted domain")
    refused(env.cli("mailbox", "new", "--name", "bob", "--primary-smtp-address", "bob",
                    check=False), "--primary-smtp-address")
    refused(env.cli("mailbox", "new", "--name", "bob", "--primary-smtp-address",
                    "bob@contoso.test", "--email-addresses", "smtp:bob@fabrikam.test",
                    check=False), "bob@fabrikam.test", "accepted domain")
    refused(env.cli("mailbox", "set", "alice", "--primary-smtp-address", "al@fabrikam.test",
                    check=False), "al@fabrikam.test", "accepted domain")
    mailboxes = get_json(env, "mailbox")
    assert [(m["Name"], m["PrimarySmtpAddress"]) for m in mailboxes] == [
        ("alice", "alice@contoso.test")]


def test_proxy_address_belongs_to_one_mailbox_only(demo_env: MailgateEnv) -> None:
    """A proxy address of any type (case-insensitive) can belong to one mailbox only."""
    env = demo_env
    for addrs in (["--email-addresses", "fax:+15550001"],
                  ["--email-addresses", "smtp:Alice@Contoso.TEST"]):
        refused(env.cli("mailbox", "new", "--name", "bob", "--primary-smtp-address",
                        "bob@contoso.test", *addrs, check=False), "already used", "alice")
    refused(env.cli("mailbox", "new", "--name", "bob", "--primary-smtp-address",
                    "ALICE@contoso.test", check=False), "already used")
    env.cli("mailbox", "new", "--name", "bob", "--primary-smtp-address", "bob@contoso.test",
            "--email-addresses", "X400:c=US;a=Fabrikam;p=Bob")
    refused(env.cli("mailbox", "set", "alice", "--add-email-addresses",
                    "x400:c=US;a=Fabrikam;p=Bob", check=False), "already used", "bob")
    refused(env.cli("mailbox", "set", "alice", "--primary-smtp-address", "Bob@contoso.test",
                    check=False), "already used", "bob")
    assert get_json(env, "mailbox", "alice")[0]["EmailAddresses"] == [
        "SMTP:alice@contoso.test", "FAX:+15550001"]


def test_mailbox_email_addresses_shown_the_exchange_way(demo_env: MailgateEnv) -> None:
    """EmailAddresses shows `SMTP:` primary, `smtp:` secondaries and `TYPE:value` others."""
    m = as_json(demo_env.cli("mailbox", "new", "--name", "bob", "--primary-smtp-address",
                             "bob@contoso.test", "--email-addresses", "FAX:+15551234",
                             "--email-addresses", "robert@contoso.test", "--json"))
    assert m["PrimarySmtpAddress"] == "bob@contoso.test"
    assert m["EmailAddresses"] == ["SMTP:bob@contoso.test", "FAX:+15551234",
                                   "smtp:robert@contoso.test"]
    table = ok(demo_env.cli("mailbox", "get", "bob")).stdout
    assert table.splitlines()[0].split()[:3] == ["Name", "PrimarySmtpAddress", "EmailAddresses"]
    assert "SMTP:bob@contoso.test" in table and "FAX:+15551234" in table
    assert "smtp:robert@contoso.test" in table


def test_set_primary_smtp_address_keeps_old_primary_as_secondary(
        demo_env: MailgateEnv) -> None:
    """`set --primary-smtp-address` keeps the old primary as an `smtp:` secondary address."""
    m = as_json(demo_env.cli("mailbox", "set", "alice", "--primary-smtp-address",
                             "alice.smith@contoso.test", "--json"))
    assert m["PrimarySmtpAddress"] == "alice.smith@contoso.test"
    assert m["EmailAddresses"][0] == "SMTP:alice.smith@contoso.test"
    assert sorted(m["EmailAddresses"][1:]) == ["FAX:+15550001", "smtp:alice@contoso.test"]
    assert get_json(demo_env, "mailbox", "alice@contoso.test")[0]["Name"] == "alice"


def test_add_and_remove_email_addresses(demo_env: MailgateEnv) -> None:
    """Add/remove edit the proxy list; removing an absent address is an error changing nothing."""
    m = as_json(demo_env.cli("mailbox", "set", "alice", "--add-email-addresses",
                             "SMS:+15550002", "--add-email-addresses", "al@contoso.test",
                             "--remove-email-addresses", "fax:+15550001", "--json"))
    assert m["EmailAddresses"] == ["SMTP:alice@contoso.test", "SMS:+15550002",
                                   "smtp:al@contoso.test"]
    refused(demo_env.cli("mailbox", "set", "alice", "--remove-email-addresses",
                         "FAX:+19999999", check=False), "FAX:+19999999")
    refused(demo_env.cli("mailbox", "set", "alice", "--add-email-addresses", "FAX:+15550003",
                         "--remove-email-addresses", "FAX:+19999999", check=False))
    assert get_json(demo_env, "mailbox", "alice")[0]["EmailAddresses"] == m["EmailAddresses"]
    # `--email-addresses` on set replaces the secondaries; the primary stays.
    m = as_json(demo_env.cli("mailbox", "set", "alice", "--email-addresses", "FAX:+15550009",
                             "--json"))
    assert m["EmailAddresses"] == ["SMTP:alice@contoso.test", "FAX:+15550009"]


def test_mailbox_identity_by_name_guid_or_any_proxy_address(demo_env: MailgateEnv) -> None:
    """A mailbox identity is its name, GUID or any proxy address; unknown ones are errors."""
    env = demo_env
    guid = get_json(env, "mailbox", "alice")[0]["Guid"]
    idents = (guid, "ALICE", "smtp:Alice@Contoso.Test", "fax:+15550001")
    for ident, proc in zip(idents, cli_each(env, *(("mailbox", "get", i, "--json")
                                                   for i in idents))):
        assert [r["Guid"] for r in as_json(proc)] == [guid], ident
    refused(env.cli("mailbox", "get", "bob@contoso.test", check=False), "not found")
    ok(env.cli("mailbox", "remove", "fax:+15550001"))
    assert get_json(env, "mailbox") == []
    refused(env.cli("mailbox", "remove", "alice", check=False), "not found")
    # The removed mailbox's addresses can be used again.
    ok(env.cli("mailbox", "new", "--name", "al", "--primary-smtp-address",
               "alice@contoso.test", "--email-addresses", "FAX:+15550001"))


# -- Foreign connectors -----------------------------------------------------------------


def test_foreign_connector_new_has_exchange_defaults(env: MailgateEnv) -> None:
    """A new Foreign connector gets Exchange's defaults for every parameter."""
    c = as_json(env.cli("foreign-connector", "new", "--name", "Fax", "--address-spaces",
                        "FAX:*;1", "--json"))
    assert {k: c[k] for k in ("Name", "AddressSpaces", "DropDirectory", "DropDirectoryQuota",
                              "MaxMessageSize", "Enabled", "RelayDsnRequired",
                              "IsScopedConnector", "Comment", "SourceTransportServers")} == {
        "Name": "Fax", "AddressSpaces": ["FAX:*;1"], "DropDirectory": "Fax",
        "DropDirectoryQuota": None, "MaxMessageSize": None, "Enabled": True,
        "RelayDsnRequired": False, "IsScopedConnector": False, "Comment": None,
        "SourceTransportServers": [NODE]}
    assert Path(c["DropDirectoryPath"]) == env.data / "drop" / "Fax"
    assert get_json(env, "foreign-connector") == [c]
    table = ok(env.cli("foreign-connector", "get"))
    assert table_header(table) == ["Name", "AddressSpaces", "Enabled", "DropDirectoryPath",
                                   "DropDirectoryQuota", "MaxMessageSize"]
    row = table.stdout.splitlines()[1].split()
    assert row[:3] == ["Fax", "{FAX:*;1}", "True"]
    assert row[-2:] == ["unlimited", "unlimited"]


def test_foreign_connector_set_every_parameter(env: MailgateEnv) -> None:
    """`foreign-connector set` changes every parameter and `get` shows the new values."""
    guid = as_json(env.cli("foreign-connector", "new", "--name", "Fax", "--address-spaces",
                           "FAX:*", "--json"))["Guid"]
    absolute = env.root / "faxout"
    c = as_json(env.cli(
        "foreign-connector", "set", "Fax", "--name", "Fax2", "--address-spaces", "FAX:+1*;2",
        "--address-spaces", "SMS:*;3", "--source-transport-servers", NODE,
        "--source-transport-servers", "gw2", "--drop-directory", str(absolute),
        "--drop-directory-quota", "100MB", "--max-message-size", "64KB",
        "--relay-dsn-required", "true", "--enabled", "false", "--comment", "fax gateway",
        "--json"))
    expected = {"Guid": guid, "Name": "Fax2", "AddressSpaces": ["FAX:+1*;2", "SMS:*;3"],
                "SourceTransportServers": [NODE, "gw2"], "DropDirectory": str(absolute),
                "DropDirectoryPath": str(absolute), "DropDirectoryQuota": 100 * 1024 * 1024,
                "MaxMessageSize": 64 * 1024, "RelayDsnRequired": True, "Enabled": False,
                "Comment": "fax gateway"}
    assert {k: c[k] for k in expected} == expected
    got = get_json(env, "foreign-connector", "Fax2")[0]
    assert {k: got[k] for k in expected} == expected
    refused(env.cli("foreign-connector", "get", "Fax", check=False), "not found")
    # A relative DropDirectory is joined to RootDropDirectoryPath.
    c = as_json(env.cli("foreign-connector", "set", "Fax2", "--drop-directory", "out",
                        "--json"))
    assert (c["DropDirectory"], Path(c["DropDirectoryPath"])) == ("out", env.drop / "out")


def test_foreign_connector_size_forms(env: MailgateEnv) -> None:
    """Connector sizes take 100MB, 64KB, bytes, unlimited and `10 MB (10,485,760 bytes)`."""
    env.cli("foreign-connector", "new", "--name", "Fax", "--address-spaces", "FAX:*",
            "--drop-directory-quota", "100MB", "--max-message-size", "64KB")
    c = get_json(env, "foreign-connector", "Fax")[0]
    assert (c["DropDirectoryQuota"], c["MaxMessageSize"]) == (104857600, 65536)
    c = as_json(env.cli("foreign-connector", "set", "Fax", "--max-message-size",
                        "10 MB (10,485,760 bytes)", "--drop-directory-quota", "unlimited",
                        "--json"))
    assert (c["DropDirectoryQuota"], c["MaxMessageSize"]) == (None, 10485760)
    table = ok(env.cli("foreign-connector", "get", "Fax")).stdout
    assert "10 MB (10,485,760 bytes)" in table
    assert "unlimited" in table
    c = as_json(env.cli("foreign-connector", "set", "Fax", "--drop-directory-quota", "1234",
                        "--max-message-size", "unlimited", "--json"))
    assert (c["DropDirectoryQuota"], c["MaxMessageSize"]) == (1234, None)


def test_drop_directory_quota_range(env: MailgateEnv) -> None:
    """DropDirectoryQuota takes 1 B to 2147483647 B or unlimited; one past is refused."""
    c = as_json(env.cli("foreign-connector", "new", "--name", "Fax", "--address-spaces",
                        "FAX:*", "--drop-directory-quota", "1", "--json"))
    assert c["DropDirectoryQuota"] == 1
    c = as_json(env.cli("foreign-connector", "set", "Fax", "--drop-directory-quota",
                        "2147483647", "--json"))
    assert c["DropDirectoryQuota"] == 2147483647
    for bad in ("0", "2147483648"):
        refused(env.cli("foreign-connector", "set", "Fax", "--drop-directory-quota", bad,
                        check=False), "--drop-directory-quota")
    refused(env.cli("foreign-connector", "new", "--name", "Sms", "--address-spaces", "SMS:*",
                    "--drop-directory-quota", "0", check=False), "--drop-directory-quota")
    assert [(c["Name"], c["DropDirectoryQuota"]) for c in get_json(env, "foreign-connector")
            ] == [("Fax", 2147483647)]


def test_max_message_size_range(env: MailgateEnv) -> None:
    """Connector MaxMessageSize takes 0 to 2147483647 KB or unlimited; one past is refused."""
    c = as_json(env.cli("foreign-connector", "new", "--name", "Fax", "--address-spaces",
                        "FAX:*", "--max-message-size", "0", "--enabled", "false", "--json"))
    assert c["MaxMessageSize"] == 0
    c = as_json(env.cli("foreign-connector", "set", "Fax", "--max-message-size",
                        "2147483647KB", "--json"))
    assert c["MaxMessageSize"] == 2147483647 * 1024
    refused(env.cli("foreign-connector", "set", "Fax", "--max-message-size", "2147483648KB",
                    check=False), "--max-message-size")
    assert get_json(env, "foreign-connector", "Fax")[0]["MaxMessageSize"] == 2147483647 * 1024


def test_address_space_forms_accepted(env: MailgateEnv) -> None:
    """FAX, X400 (with cost), `contoso.com` and `*.contoso.com` address spaces are accepted."""
    c = as_json(env.cli("foreign-connector", "new", "--name", "Gw",
                        "--address-spaces", "FAX:*;1",
                        "--address-spaces", "X400:c=US;a=Fabrikam;P=Contoso;5",
                        "--address-spaces", "contoso.com",
                        "--address-spaces", "*.contoso.com", "--json"))
    assert c["AddressSpaces"] == ["FAX:*;1", "X400:c=US;a=Fabrikam;P=Contoso;5",
                                  "SMTP:contoso.com;1", "SMTP:*.contoso.com;1"]
    c = as_json(env.cli("foreign-connector", "new", "--name", "Gw2", "--address-spaces",
                        "SMS:*;100", "--address-spaces", "*", "--json"))
    assert c["AddressSpaces"] == ["SMS:*;100", "SMTP:*;1"]


INVALID_SPACES = [
    ("*contoso.com", "*contoso.com"),
    ("FAX:*;0", "cost"),
    ("FAX:*;101", "cost"),
    ("X400:c=US;a=Fabrikam", "cost"),     # a non-SMTP space with ';' must give the cost
    ("FAX:a;b", "cost"),
    ("FAX:+1*5", "*"),
    ("", "empty"),
]


def test_invalid_address_spaces_refused_on_new(env: MailgateEnv) -> None:
    """Invalid address spaces are each refused on `new` with one clear line."""
    assert get_json(env, "foreign-connector") == []
    all_refused(env, [(("foreign-connector", "new", "--name", "Gw", "--address-spaces", space),
                       (needle,)) for space, needle in INVALID_SPACES])
    assert get_json(env, "foreign-connector") == []


def test_invalid_address_spaces_refused_on_set(env: MailgateEnv) -> None:
    """An invalid address space on `set` is refused and the connector keeps its spaces."""
    env.cli("foreign-connector", "new", "--name", "Gw", "--address-spaces", "FAX:*")
    refused(env.cli("foreign-connector", "set", "Gw", "--add-address-spaces", "FAX:+1*;101",
                    check=False), "cost")
    refused(env.cli("foreign-connector", "set", "Gw", "--address-spaces", "*contoso.com",
                    check=False), "*contoso.com")
    assert get_json(env, "foreign-connector", "Gw")[0]["AddressSpaces"] == ["FAX:*;1"]


def test_add_and_remove_address_spaces(env: MailgateEnv) -> None:
    """Add/remove edit address spaces; removing an absent or the last space is an error."""
    env.cli("foreign-connector", "new", "--name", "Gw", "--address-spaces", "FAX:*")
    c = as_json(env.cli("foreign-connector", "set", "Gw", "--add-address-spaces", "SMS:+44*;2",
                        "--add-address-spaces", "contoso.com", "--json"))
    assert c["AddressSpaces"] == ["FAX:*;1", "SMS:+44*;2", "SMTP:contoso.com;1"]
    c = as_json(env.cli("foreign-connector", "set", "Gw", "--remove-address-spaces",
                        "sms:+44*", "--remove-address-spaces", "SMTP:CONTOSO.COM;1", "--json"))
    assert c["AddressSpaces"] == ["FAX:*;1"]
    refused(env.cli("foreign-connector", "set", "Gw", "--remove-address-spaces", "SMS:+44*",
                    check=False), "SMS:+44*")
    refused(env.cli("foreign-connector", "set", "Gw", "--remove-address-spaces", "FAX:*",
                    check=False), "address space")
    assert get_json(env, "foreign-connector", "Gw")[0]["AddressSpaces"] == ["FAX:*;1"]


def test_adding_an_existing_space_with_another_cost_is_not_silently_ignored(
        env: MailgateEnv) -> None:
    """`--add-address-spaces FAX:*;3` on a connector with FAX:*;1 changes the cost or fails."""
    env.cli("foreign-connector", "new", "--name", "Gw", "--address-spaces", "FAX:*")
    proc = env.cli("foreign-connector", "set", "Gw", "--add-address-spaces", "FAX:*;3",
                   "--json", check=False)
    no_traceback(proc)
    if proc.returncode == 0:
        assert json.loads(proc.stdout)["AddressSpaces"] == ["FAX:*;3"]
    else:
        refused(proc, "FAX:*")


def test_empty_name_on_set_refused(env: MailgateEnv) -> None:
    """`foreign-connector set Gw --name ''` is refused with one line (names cannot be empty)."""
    env.cli("foreign-connector", "new", "--name", "Gw", "--address-spaces", "FAX:*")
    refused(env.cli("foreign-connector", "set", "Gw", "--name", "", check=False), "name")


def test_missing_drop_directory_warns_but_succeeds(env: MailgateEnv) -> None:
    """A missing Drop directory gives a WARNING on stderr with exit 0 and is not created."""
    proc = ok(env.cli("foreign-connector", "new", "--name", "Fax", "--address-spaces",
                      "FAX:*"))
    missing = env.drop / "Fax"
    [warning] = warnings_of(proc)
    assert str(missing) in warning and "does not exist" in warning
    assert not missing.exists()
    missing.mkdir(parents=True)
    proc = ok(env.cli("foreign-connector", "set", "Fax", "--comment", "x"))
    assert stderr_lines(proc) == []
    elsewhere = env.root / "gateway" / "out"
    proc = ok(env.cli("foreign-connector", "set", "Fax", "--drop-directory", str(elsewhere)))
    [warning] = warnings_of(proc)
    assert str(elsewhere) in warning
    assert not elsewhere.exists()


def test_zero_max_message_size_on_enabled_connector_warns(env: MailgateEnv) -> None:
    """MaxMessageSize 0 warns (exit 0) while the connector is enabled, not when disabled."""
    (env.drop / "Fax").mkdir(parents=True)
    env.cli("foreign-connector", "new", "--name", "Fax", "--address-spaces", "FAX:*")
    proc = ok(env.cli("foreign-connector", "set", "Fax", "--max-message-size", "0"))
    [warning] = warnings_of(proc)
    assert "MaxMessageSize" in warning
    assert get_json(env, "foreign-connector", "Fax")[0]["MaxMessageSize"] == 0
    proc = ok(env.cli("foreign-connector", "set", "Fax", "--enabled", "false"))
    assert stderr_lines(proc) == []
    proc = ok(env.cli("foreign-connector", "new", "--name", "Sms", "--address-spaces", "SMS:*",
                      "--max-message-size", "0"))
    assert any("MaxMessageSize" in w for w in warnings_of(proc))


def test_connector_identity_forms(env: MailgateEnv) -> None:
    """A connector identity is its name, GUID or `Node\\Name`; unknown ones are one-line errors."""
    guid = as_json(env.cli("foreign-connector", "new", "--name", "Fax", "--address-spaces",
                           "FAX:*", "--json"))["Guid"]
    idents = ("fax", guid.upper(), f"{NODE.upper()}\\fax")
    for ident, proc in zip(idents, cli_each(env, *(("foreign-connector", "get", i, "--json")
                                                   for i in idents))):
        assert [c["Guid"] for c in as_json(proc)] == [guid], ident
    all_refused(env, [
        (("foreign-connector", "get", "Nope"), ("Nope", "not found")),
        (("foreign-connector", "set", "Nope", "--comment", "x"), ("Nope", "not found")),
        (("foreign-connector", "remove", "Nope"), ("Nope", "not found")),
        (("foreign-connector", "get", "othernode\\Fax"), ("not found",)),
    ])
    c = as_json(env.cli("foreign-connector", "set", f"{NODE}\\Fax", "--comment", "by node",
                        "--json"))
    assert c["Comment"] == "by node"
    ok(env.cli("foreign-connector", "remove", guid))
    assert get_json(env, "foreign-connector") == []


def test_not_found_error_shows_the_identity_as_typed(env: MailgateEnv) -> None:
    """A not-found error names a `Node\\Name` identity exactly as the administrator typed it."""
    line = refused(env.cli("foreign-connector", "get", f"{NODE}\\Nope", check=False),
                   "not found")
    assert f"'{NODE}\\Nope'" in line


def test_duplicate_connector_name_refused(env: MailgateEnv) -> None:
    """A second connector with the same name (any case) is refused with one line."""
    env.cli("foreign-connector", "new", "--name", "Fax", "--address-spaces", "FAX:*")
    refused(env.cli("foreign-connector", "new", "--name", "FAX", "--address-spaces", "SMS:*",
                    check=False), "already exists")
    assert len(get_json(env, "foreign-connector")) == 1


def test_connector_booleans_take_true_or_false(env: MailgateEnv) -> None:
    """Connector booleans take true|false; `maybe` is refused without a traceback."""
    env.cli("foreign-connector", "new", "--name", "Fax", "--address-spaces", "FAX:*")
    c = as_json(env.cli("foreign-connector", "set", "Fax", "--enabled", "false",
                        "--relay-dsn-required", "true", "--json"))
    assert (c["Enabled"], c["RelayDsnRequired"]) == (False, True)
    c = as_json(env.cli("foreign-connector", "set", "Fax", "--enabled", "true",
                        "--relay-dsn-required", "false", "--json"))
    assert (c["Enabled"], c["RelayDsnRequired"]) == (True, False)
    rejected(env.cli("foreign-connector", "set", "Fax", "--enabled", "maybe", check=False),
             "--enabled")
    rejected(env.cli("foreign-connector", "new", "--name", "Sms", "--address-spaces", "SMS:*",
                     "--relay-dsn-required", "maybe", check=False), "--relay-dsn-required")
    assert [c["Name"] for c in get_json(env, "foreign-connector")] == ["Fax"]


def test_connector_booleans_refuse_other_spellings(env: MailgateEnv) -> None:
    """Booleans take only true|false: `yes`, `no`, `1` and `0` are refused."""
    env.cli("foreign-connector", "new", "--name", "Fax", "--address-spaces", "FAX:*")
    for value in ("yes", "no", "1", "0"):
        rejected(env.cli("foreign-connector", "set", "Fax", "--relay-dsn-required", value,
                         check=False), "--relay-dsn-required")
    assert get_json(env, "foreign-connector", "Fax")[0]["RelayDsnRequired"] is False


def test_empty_source_transport_server_refused(env: MailgateEnv) -> None:
    """An empty `--source-transport-servers` value is refused with one line."""
    refused(env.cli("foreign-connector", "new", "--name", "Fax", "--address-spaces", "FAX:*",
                    "--source-transport-servers", "", check=False),
            "--source-transport-servers")


# -- transport service ------------------------------------------------------------------

TS_DEFAULTS = {
    "Identity": NODE,
    "PickupDirectoryMaxMessagesPerMinute": None,
    "PickupDirectoryMaxHeaderSize": 65536,
    "PickupDirectoryMaxRecipientsPerMessage": 100,
    "MessageExpirationTimeout": "2.00:00:00",
    "DelayNotificationTimeout": "04:00:00",
    "TransientFailureRetryInterval": "00:05:00",
    "TransientFailureRetryCount": 6,
    "OutboundConnectionFailureRetryInterval": "00:10:00",
    "MessageRetryInterval": "00:15:00",
    "PoisonThreshold": 2,
    "MaxMessageSize": None,
}


def ts(env: MailgateEnv) -> dict[str, Any]:
    return as_json(env.cli("transport-service", "get", "--json"))  # type: ignore[no-any-return]


def test_transport_service_get_shows_the_defaults(env: MailgateEnv) -> None:
    """`transport-service get` shows the defaults documented in the README table."""
    got = ts(env)
    assert {k: got[k] for k in TS_DEFAULTS} == TS_DEFAULTS
    assert Path(got["PickupDirectoryPath"]) == env.data / "pickup"
    assert Path(got["ReplayDirectoryPath"]) == env.data / "replay"
    assert Path(got["RootDropDirectoryPath"]) == env.data / "drop"
    listing = ok(env.cli("transport-service", "get")).stdout
    fields = {k.strip(): v.strip() for k, _, v in
              (line.partition(" : ") for line in listing.splitlines())}
    assert fields["PickupDirectoryMaxHeaderSize"] == "64 KB (65,536 bytes)"
    assert fields["PickupDirectoryMaxMessagesPerMinute"] == "unlimited"
    assert fields["MaxMessageSize"] == "unlimited"
    assert fields["MessageExpirationTimeout"] == "2.00:00:00"
    assert fields["PickupDirectoryPath"] == str(env.data / "pickup")


def test_transport_service_lower_bounds_accepted(env: MailgateEnv) -> None:
    """Every numeric transport setting accepts its lowest valid value."""
    got = as_json(env.cli(
        "transport-service", "set", "--json",
        "--pickup-directory-max-messages-per-minute", "1",
        "--pickup-directory-max-header-size", "32KB",
        "--pickup-directory-max-recipients-per-message", "1",
        "--message-expiration-timeout", "00:00:05",
        "--delay-notification-timeout", "00:00:01",
        "--transient-failure-retry-interval", "00:00:01",
        "--transient-failure-retry-count", "0",
        "--outbound-connection-failure-retry-interval", "1s",
        "--message-retry-interval", "00:00:01",
        "--poison-threshold", "1",
        "--max-message-size", "64KB"))
    expected = {
        "PickupDirectoryMaxMessagesPerMinute": 1, "PickupDirectoryMaxHeaderSize": 32768,
        "PickupDirectoryMaxRecipientsPerMessage": 1, "MessageExpirationTimeout": "00:00:05",
        "DelayNotificationTimeout": "00:00:01", "TransientFailureRetryInterval": "00:00:01",
        "TransientFailureRetryCount": 0, "OutboundConnectionFailureRetryInterval": "00:00:01",
        "MessageRetryInterval": "00:00:01", "PoisonThreshold": 1, "MaxMessageSize": 65536}
    assert {k: got[k] for k in expected} == expected
    got = ts(env)
    assert {k: got[k] for k in expected} == expected


def test_transport_service_upper_bounds_accepted(env: MailgateEnv) -> None:
    """Every numeric transport setting accepts its highest valid value (or unlimited)."""
    got = as_json(env.cli(
        "transport-service", "set", "--json",
        "--pickup-directory-max-messages-per-minute", "20000",
        "--pickup-directory-max-header-size", "2147483647",
        "--pickup-directory-max-recipients-per-message", "10000",
        "--message-expiration-timeout", "90.00:00:00",
        "--delay-notification-timeout", "30d",
        "--transient-failure-retry-interval", "12:00:00",
        "--transient-failure-retry-count", "15",
        "--outbound-connection-failure-retry-interval", "20.00:00:00",
        "--message-retry-interval", "1.00:00:00",
        "--poison-threshold", "10",
        "--max-message-size", "2147483647"))
    expected = {
        "PickupDirectoryMaxMessagesPerMinute": 20000,
        "PickupDirectoryMaxHeaderSize": 2147483647,
        "PickupDirectoryMaxRecipientsPerMessage": 10000,
        "MessageExpirationTimeout": "90.00:00:00", "DelayNotificationTimeout": "30.00:00:00",
        "TransientFailureRetryInterval": "12:00:00", "TransientFailureRetryCount": 15,
        "OutboundConnectionFailureRetryInterval": "20.00:00:00",
        "MessageRetryInterval": "1.00:00:00", "PoisonThreshold": 10,
        "MaxMessageSize": 2147483647}
    assert {k: got[k] for k in expected} == expected
    got = as_json(env.cli("transport-service", "set", "--json", "--max-message-size",
                          "unlimited", "--pickup-directory-max-messages-per-minute",
                          "unlimited"))
    assert (got["MaxMessageSize"], got["PickupDirectoryMaxMessagesPerMinute"]) == (None, None)


TS_OUT_OF_RANGE = [
    ("--pickup-directory-max-messages-per-minute", "0", "20001"),
    ("--pickup-directory-max-header-size", "32767", "2147483648"),
    ("--pickup-directory-max-recipients-per-message", "0", "10001"),
    ("--message-expiration-timeout", "00:00:04", "90.00:00:01"),
    ("--delay-notification-timeout", "00:00:00", "30.00:00:01"),
    ("--transient-failure-retry-interval", "0s", "12:00:01"),
    ("--transient-failure-retry-count", "-1", "16"),
    ("--outbound-connection-failure-retry-interval", "0s", "20.00:00:01"),
    ("--message-retry-interval", "0s", "1.00:00:01"),
    ("--poison-threshold", "0", "11"),
    ("--max-message-size", "65535", "2147483648"),
]


def test_transport_service_one_past_each_bound_refused(env: MailgateEnv) -> None:
    """One past either bound of every numeric transport setting is refused with one line."""
    before = ts(env)
    all_refused(env, [(("transport-service", "set", option, value), (option, "between"))
                      for option, below, above in TS_OUT_OF_RANGE for value in (below, above)])
    assert ts(env) == before


def test_refused_transport_service_set_changes_nothing(env: MailgateEnv) -> None:
    """A `transport-service set` with one out-of-range option changes nothing at all."""
    refused(env.cli("transport-service", "set", "--poison-threshold", "5",
                    "--message-retry-interval", "1.00:00:01", check=False),
            "--message-retry-interval")
    got = ts(env)
    assert (got["PoisonThreshold"], got["MessageRetryInterval"]) == (2, "00:15:00")


def test_transport_service_duration_forms(env: MailgateEnv) -> None:
    """Durations take d.hh:mm:ss, hh:mm:ss, 30s, 5m, 4h and 2d; `get` shows Exchange's form."""
    got = as_json(env.cli(
        "transport-service", "set", "--json",
        "--message-expiration-timeout", "2d",
        "--delay-notification-timeout", "4h",
        "--transient-failure-retry-interval", "30s",
        "--outbound-connection-failure-retry-interval", "5m",
        "--message-retry-interval", "1.00:00:00"))
    assert {k: got[k] for k in ("MessageExpirationTimeout", "DelayNotificationTimeout",
                                "TransientFailureRetryInterval",
                                "OutboundConnectionFailureRetryInterval",
                                "MessageRetryInterval")} == {
        "MessageExpirationTimeout": "2.00:00:00", "DelayNotificationTimeout": "04:00:00",
        "TransientFailureRetryInterval": "00:00:30",
        "OutboundConnectionFailureRetryInterval": "00:05:00",
        "MessageRetryInterval": "1.00:00:00"}
    got = as_json(env.cli("transport-service", "set", "--json",
                          "--message-retry-interval", "00:00:01"))
    assert got["MessageRetryInterval"] == "00:00:01"
    rejected(env.cli("transport-service", "set", "--message-retry-interval", "soon",
                     check=False), "--message-retry-interval")
    rejected(env.cli("transport-service", "set", "--message-expiration-timeout", "25:00:00",
                     check=False), "--message-expiration-timeout")
    assert ts(env)["MessageRetryInterval"] == "00:00:01"


def test_pickup_directory_null_disables_pickup(env: MailgateEnv) -> None:
    """`--pickup-directory-path '$null'` disables Pickup and `get` shows it disabled."""
    got = as_json(env.cli("transport-service", "set", "--pickup-directory-path", "$null",
                          "--json"))
    assert got["PickupDirectoryPath"] is None
    assert ts(env)["PickupDirectoryPath"] is None
    listing = ok(env.cli("transport-service", "get")).stdout
    line = next(x for x in listing.splitlines() if x.startswith("PickupDirectoryPath "))
    assert line.partition(" : ")[2].strip() in ("", "$null")
    got = as_json(env.cli("transport-service", "set", "--pickup-directory-path", "pickup",
                          "--json"))
    assert Path(got["PickupDirectoryPath"]) == env.data / "pickup"


def test_pickup_path_equal_to_replay_path_refused(env: MailgateEnv) -> None:
    """A Pickup path equal to the Replay path (however written) is refused."""
    replay = env.data / "replay"
    for args in (("--pickup-directory-path", "replay"),
                 ("--pickup-directory-path", str(replay) + "/"),
                 ("--replay-directory-path", "pickup"),
                 ("--pickup-directory-path", "same", "--replay-directory-path", "same")):
        refused(env.cli("transport-service", "set", *args, check=False), "Pickup", "Replay")
    got = ts(env)
    assert Path(got["PickupDirectoryPath"]) == env.data / "pickup"
    assert Path(got["ReplayDirectoryPath"]) == replay
    assert not (env.data / "same").exists()


def test_setting_pickup_or_replay_path_creates_the_folder(env: MailgateEnv) -> None:
    """Setting a Pickup or Replay path creates the folder."""
    absolute = env.root / "elsewhere" / "pickup"
    got = as_json(env.cli("transport-service", "set", "--pickup-directory-path", str(absolute),
                          "--replay-directory-path", "in/replay", "--json"))
    assert Path(got["PickupDirectoryPath"]) == absolute and absolute.is_dir()
    assert Path(got["ReplayDirectoryPath"]) == env.data / "in" / "replay"
    assert (env.data / "in" / "replay").is_dir()


def test_transport_service_set_without_option_is_a_usage_error(env: MailgateEnv) -> None:
    """`transport-service set` without any option is a usage error and changes nothing."""
    for args in ((), ("--json",)):
        rejected(env.cli("transport-service", "set", *args, check=False), "nothing to set")
    got = ts(env)
    assert {k: got[k] for k in TS_DEFAULTS} == TS_DEFAULTS


def test_unlimited_refused_where_not_allowed(env: MailgateEnv) -> None:
    """`unlimited` and `$null` are refused for settings that do not allow them."""
    for option in ("--pickup-directory-max-header-size", "--poison-threshold"):
        rejected(env.cli("transport-service", "set", option, "unlimited", check=False), option)
    refused(env.cli("transport-service", "set", "--root-drop-directory-path", "$null",
                    check=False), "--root-drop-directory-path")
    got = ts(env)
    assert {k: got[k] for k in TS_DEFAULTS} == TS_DEFAULTS


# -- queues -----------------------------------------------------------------------------

QUEUE_COLUMNS = ["Identity", "DeliveryType", "Status", "MessageCount", "NextHopDomain",
                 "NextRetryTime", "LastError"]


def test_queue_get_table_and_json(env: MailgateEnv) -> None:
    """`queue get` prints the Get-Queue columns as a table, and JSON with `--json`."""
    proc = ok(env.cli("queue", "get"))
    assert table_header(proc) == QUEUE_COLUMNS
    assert proc.stdout.splitlines()[1].split()[:5] == [
        f"{NODE}\\Submission", "Undefined", "Ready", "0", "Submission"]
    [q] = as_json(env.cli("queue", "get", "--json"))
    assert set(QUEUE_COLUMNS) | {"NextRetryTime", "LastRetryTime", "FirstRetryTime"} <= set(q)
    assert (q["Identity"], q["MessageCount"], q["LastError"]) == (
        f"{NODE}\\Submission", 0, None)


def test_queue_identity_forms(demo_env: MailgateEnv, node: NodeThread) -> None:
    """`queue get` takes node\\Submission, a number or a NextHopDomain; unknown is an error."""
    env = demo_env
    drop_file(env.pickup, "q.eml", FAX_MAIL % b"queue")
    wait_for(lambda: list((env.drop / "Fax").glob("*.eml")), what="a Drop file")
    queues = wait_for(lambda: [q for q in get_json(env, "queue")
                               if q["DeliveryType"] == "NonSmtpGatewayDelivery"],
                      what="the Fax queue")
    [fax] = queues  # type: ignore[misc]
    number = fax["Identity"].split("\\", 1)[1]
    assert number.isdigit(), fax
    idents = (fax["Identity"], number, fax["NextHopDomain"], f"{NODE}\\Submission")
    found = [[q["Identity"] for q in as_json(p)]
             for p in cli_each(env, *(("queue", "get", i, "--json") for i in idents))]
    assert found == [[fax["Identity"]]] * 3 + [[f"{NODE}\\Submission"]]
    all_refused(env, [(("queue", "get", bad), ("not found",))
                      for bad in ("nosuch.test", f"{NODE}\\9999", f"othernode\\{number}")])


# -- errors and configuration -----------------------------------------------------------


def test_missing_config_file_is_a_one_line_error(env: MailgateEnv) -> None:
    """A `-c` config file that does not exist gives one error line and exit 1."""
    missing = env.root / "nope.toml"
    for args in (("accepted-domain", "get"), ("serve",)):
        proc = run_mailgate("-c", str(missing), *args, cwd=env.root)
        refused(proc, str(missing), "does not exist")


def test_mailgate_config_env_is_used_without_c(env: MailgateEnv, tmp_path: Path) -> None:
    """`$MAILGATE_CONFIG` selects the config when `-c` is absent; `-c` wins over it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    conf = {"MAILGATE_CONFIG": str(env.config)}
    ok(run_mailgate("accepted-domain", "new", "--domain-name", "env.test", cwd=elsewhere,
                    extra_env=conf))
    assert [d["DomainName"] for d in get_json(env, "accepted-domain")] == ["env.test"]
    assert as_json(run_mailgate("transport-service", "get", "--json", cwd=elsewhere,
                                extra_env=conf))["Identity"] == NODE
    assert not (elsewhere / "var").exists()
    missing = {"MAILGATE_CONFIG": str(elsewhere / "nope.toml")}
    refused(run_mailgate("accepted-domain", "get", cwd=elsewhere, extra_env=missing),
            "nope.toml", "MAILGATE_CONFIG")
    rows = as_json(run_mailgate("-c", str(env.config), "accepted-domain", "get", "--json",
                                cwd=elsewhere, extra_env=missing))
    assert [d["DomainName"] for d in rows] == ["env.test"]


def test_unreadable_config_is_a_one_line_error(env: MailgateEnv) -> None:
    """A config file that is not valid TOML or has a wrong key type is one error line."""
    env.config.write_text("[node\nname = \n")
    refused(env.cli("accepted-domain", "get", check=False), str(env.config))
    env.config.write_text("[node]\nname = 5\n")
    refused(env.cli("accepted-domain", "get", check=False), "name")


def test_bad_input_never_shows_a_traceback(demo_env: MailgateEnv) -> None:
    """Odd input (control characters, separators, quotes) gives one error line, no traceback."""
    env = demo_env
    cases = [
        ("mailbox", "new", "--name", "a\\b", "--primary-smtp-address", "ab@contoso.test"),
        ("mailbox", "new", "--name", "ab", "--primary-smtp-address", "a b@contoso.test"),
        ("accepted-domain", "new", "--domain-name", "b\u00fccher\x01.test"),
        ("foreign-connector", "new", "--name", "a\tb", "--address-spaces", "FAX:*"),
        ("foreign-connector", "new", "--name", "Gw", "--address-spaces", "FAX:a\x01b"),
        ("foreign-connector", "new", "--name", "Gw", "--address-spaces", '"FAX:*;1'),
        ("queue", "get", "a\\b\\c"),
    ]
    all_refused(env, [(args, ()) for args in cases])


def test_option_value_errors_are_one_line(env: MailgateEnv) -> None:
    """A malformed boolean, size, duration or number is one error line with exit 1."""
    for args in (("foreign-connector", "set", "Fax", "--enabled", "maybe"),
                 ("foreign-connector", "set", "Fax", "--max-message-size", "lots"),
                 ("transport-service", "set", "--message-retry-interval", "soon"),
                 ("transport-service", "set", "--poison-threshold", "abc")):
        refused(env.cli(*args, check=False), args[-2])


# -- a running node sees CLI changes without a restart ---------------------------------

# The README promises that a running node picks changes up within a quarter of a second
# (its organization cache re-reads the configuration version at most every 0.25 s). A
# Pickup file dropped sooner may still be routed with the old configuration.
CONFIG_PICKUP_DELAY = 0.5


def test_mailbox_added_while_node_runs_receives_mail(demo_env: MailgateEnv,
                                                     node: NodeThread) -> None:
    """A mailbox added with the CLI while a node runs receives Pickup mail without a restart."""
    ok(demo_env.cli("mailbox", "new", "--name", "bob", "--primary-smtp-address",
                    "bob@contoso.test"))
    time.sleep(CONFIG_PICKUP_DELAY)
    drop_file(demo_env.pickup, "bob.eml",
              b"From: alice@contoso.test\nTo: bob@contoso.test\nSubject: for bob\n\nHi Bob.\n")
    new = demo_env.maildir("bob@contoso.test") / "new"
    files = wait_for(lambda: list(new.glob("*")) if new.is_dir() else [], timeout=5,
                     what="delivery to bob's Maildir")
    assert b"Subject: for bob" in files[0].read_bytes()  # type: ignore[index]


def test_disabled_fax_connector_gives_ndr_instead_of_drop_file(demo_env: MailgateEnv,
                                                               node: NodeThread) -> None:
    """Disabling Fax while a node runs turns IMCEAFAX mail into NDR 5.1.2 instead of a Drop file."""
    env = demo_env
    fax_dir = env.drop / "Fax"
    drop_file(env.pickup, "before.eml", FAX_MAIL % b"before")
    wait_for(lambda: list(fax_dir.glob("*.eml")), timeout=5, what="a Drop file while enabled")
    for f in fax_dir.glob("*.eml"):
        f.unlink()
    ok(env.cli("foreign-connector", "set", "Fax", "--enabled", "false"))
    time.sleep(CONFIG_PICKUP_DELAY)
    drop_file(env.pickup, "after.eml", FAX_MAIL % b"after")
    new = env.maildir("alice@contoso.test") / "new"

    def ndr() -> list[bytes]:
        return [p.read_bytes() for p in new.glob("*")] if new.is_dir() else []
    [report] = wait_for(ndr, timeout=5, what="an NDR in alice's Maildir")  # type: ignore[misc]
    parsed = email.message_from_bytes(report)
    assert parsed["Subject"] == "Undeliverable: after"
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    statuses = [part for part in parsed.walk()
                if part.get_content_type() == "message/delivery-status"]
    assert len(statuses) == 1
    assert b"Status: 5.1.2" in report
    time.sleep(0.3)
    assert list(fax_dir.glob("*.eml")) == []
