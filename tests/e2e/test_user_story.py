"""Issue #2's user story, end to end, with the real `mailgate serve` process, the real CLI
and real folders."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tests.conftest import MailgateEnv, drop_file, wait_for

HELLO = b"From: bob@fabrikam.test\nTo: alice@contoso.test\nSubject: hello\n\nHello Alice.\n"
FAX = (b"From: bob@fabrikam.test\nTo: IMCEAFAX-+2B15551234@contoso.test\nSubject: fax\n\n"
       b"Page one.\n")
DROP_NAME = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{32}\.eml$")


def eml_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.eml")) if folder.exists() else []


def test_demo_node_delivers_to_mailbox_and_drop_directory(env: MailgateEnv) -> None:
    """`init --demo` + `serve`: a file for alice reaches her Maildir, an IMCEAFAX file the
    Fax Drop directory in the published format, and a malformed file becomes .bad."""
    env.cli("init", str(env.root), "--demo")
    env.start()
    drop_file(env.pickup, "hello.eml", HELLO)
    drop_file(env.pickup, "fax.eml", FAX)
    drop_file(env.pickup, "broken.eml", b"this is not a message\n")

    new = env.maildir("alice@contoso.test") / "new"
    [mail] = wait_for(lambda: list(new.glob("*")) if new.exists() else [], timeout=5,
                      what="alice's message")  # type: ignore[misc]
    data = mail.read_bytes()
    assert data.startswith(b"Return-Path: <bob@fabrikam.test>\nDelivered-To: alice@contoso.test\n"
                           b"Received: from localhost by ")
    assert b"\nSubject: hello\n" in data and data.endswith(b"\n\nHello Alice.\n")

    fax_dir = env.drop / "Fax"
    [fax] = wait_for(lambda: eml_files(fax_dir), timeout=5, what="the fax drop file")  # type: ignore[misc]
    assert DROP_NAME.match(fax.name)
    text = fax.read_bytes()
    lines = text.split(b"\r\n")
    assert lines[0] == b"X-Sender: <bob@fabrikam.test>"
    assert lines[1] == (b"X-Receiver: <FAX:+15551234> "
                        b"ORCPT=rfc822;IMCEAFAX-+2B2B15551234@contoso.test")
    assert lines[2] == f"X-EndOfInjectedXHeaders: {len(lines[0]) + len(lines[1]) + 4}".encode()
    assert lines[3].startswith(b"Received: from localhost by ")
    assert b"\r\nTo: IMCEAFAX-+2B15551234@contoso.test\r\n" in text
    assert text.endswith(b"\r\n\r\nPage one.\r\n")
    assert not [p for p in fax_dir.iterdir() if not DROP_NAME.match(p.name)]

    wait_for(lambda: (env.pickup / "broken.bad.reason").exists(), timeout=5, what=".bad")
    assert (env.pickup / "broken.bad").read_bytes() == b"this is not a message\n"
    assert "not a header field" in (env.pickup / "broken.bad.reason").read_text()
    wait_for(lambda: sorted(p.name for p in env.pickup.iterdir()) ==
             ["broken.bad", "broken.bad.reason"], timeout=5, what="an empty Pickup folder")

    queues = json.loads(env.cli("queue", "get", "--json").stdout)
    by_type = {q["DeliveryType"]: q for q in queues}
    assert by_type["NonSmtpGatewayDelivery"]["NextHopDomain"] == "FAX"
    assert all(q["MessageCount"] == 0 for q in queues)


def test_organization_managed_with_the_cli_while_the_node_runs(env: MailgateEnv,
                                                                tmp_path: Path) -> None:
    """The issue's commands, run against a running node, take effect without a restart."""
    env.start()
    env.cli("accepted-domain", "new", "--domain-name", "contoso.test", "--default")
    env.cli("mailbox", "new", "--name", "alice", "--primary-smtp-address",
            "alice@contoso.test", "--email-addresses", "FAX:+15550001")
    env.cli("foreign-connector", "new", "--name", "Fax", "--address-spaces", "FAX:*;1")
    out_dir = tmp_path / "srv" / "fax" / "out"
    out_dir.mkdir(parents=True)
    env.cli("foreign-connector", "set", "Fax", "--drop-directory", str(out_dir),
            "--drop-directory-quota", "100MB", "--max-message-size", "10MB")
    [fc] = json.loads(env.cli("foreign-connector", "get", "--json").stdout)
    assert (fc["DropDirectory"], fc["DropDirectoryQuota"], fc["MaxMessageSize"]) == (
        str(out_dir), 100 * 1024 * 1024, 10 * 1024 * 1024)
    pickup = tmp_path / "srv" / "pickup"
    env.cli("transport-service", "set", "--pickup-directory-path", str(pickup),
            "--pickup-directory-max-recipients-per-message", "100")
    assert pickup.is_dir()  # created, as Exchange does

    # A message to alice's FAX proxy address reaches her mailbox; a fax number that is no
    # proxy goes to the connector's absolute Drop directory.
    drop_file(pickup, "a.eml", b"From: bob@fabrikam.test\nTo: IMCEAFAX-+2B15550001@contoso.test"
                               b"\nSubject: to alice's fax\n\nx\n")
    drop_file(pickup, "b.eml", FAX)
    new = env.maildir("alice@contoso.test") / "new"
    wait_for(lambda: new.exists() and list(new.glob("*")), timeout=5, what="alice's message")
    [fax] = wait_for(lambda: eml_files(out_dir), timeout=5, what="the drop file")  # type: ignore[misc]
    assert b"X-Receiver: <FAX:+15551234>" in fax.read_bytes()
    # The old Pickup folder is no longer watched (the node polls every second).
    drop_file(env.pickup, "old.eml", HELLO)
    time.sleep(2.0)
    assert (env.pickup / "old.eml").exists()
