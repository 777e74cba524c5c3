"""The in-process node fixture delivers a Pickup file to a mailbox (fixture self-check)."""

from __future__ import annotations

from tests.conftest import MailgateEnv, NodeThread, drop_file, wait_for


def test_pickup_file_reaches_alice(demo_env: MailgateEnv, node: NodeThread) -> None:
    # A plain Pickup file for alice ends up in her Maildir and the Pickup folder is empty.
    drop_file(demo_env.pickup, "hello.eml",
              b"From: bob@fabrikam.test\nTo: alice@contoso.test\nSubject: hi\n\nHello.\n")
    new = demo_env.maildir("alice@contoso.test") / "new"
    files = wait_for(lambda: list(new.glob("*")) if new.exists() else [], what="delivery")
    assert b"Subject: hi\n" in files[0].read_bytes()  # type: ignore[index]
    assert list(demo_env.pickup.iterdir()) == []
