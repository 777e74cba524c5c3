"""kill -9 of the node while 1,000 Pickup files are being processed, then restart: every
file's message is delivered exactly once, to a mailbox or a Drop directory (issue #2)."""

from __future__ import annotations

import os
import re
import time
from collections import Counter

import pytest

from tests.conftest import MailgateEnv, wait_for

N = 1000
TEST_ID = re.compile(rb"\nX-Test-Id: (\d+)\r?\n")


def message(i: int) -> bytes:
    # Every third message goes to alice's mailbox, the others to the Fax connector.
    to = "alice@contoso.test" if i % 3 == 0 else f"IMCEAFAX-+2B1777{i:06d}@contoso.test"
    return (f"From: crash@fabrikam.test\nTo: {to}\nSubject: crash {i}\n"
            f"X-Test-Id: {i}\n\n" + f"line {i}\n" * 40).encode()


def delivered(env: MailgateEnv) -> Counter[int]:
    ids: Counter[int] = Counter()
    folders = [env.drop / "Fax", env.maildir("alice@contoso.test") / "new"]
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith("."):
                continue
            m = TEST_ID.search(p.read_bytes())
            assert m is not None, p
            ids[int(m.group(1))] += 1
    return ids


def test_kill_9_during_1000_pickup_files_delivers_each_exactly_once(env: MailgateEnv) -> None:
    env.cli("init", str(env.root), "--demo")
    stage = env.root / "stage"
    stage.mkdir()
    for i in range(N):
        (stage / f"m{i:04d}.eml").write_bytes(message(i))
    env.start()
    for i in range(N):
        os.rename(stage / f"m{i:04d}.eml", env.pickup / f"m{i:04d}.eml")
    # Kill twice mid-stream, at different depths, restarting each time.
    for threshold in (150, 550):
        wait_for(lambda: sum(delivered(env).values()) >= threshold, timeout=60,
                 what=f"{threshold} deliveries")
        env.kill()
        killed_at = sum(delivered(env).values())
        assert killed_at < N, "the node finished before it could be killed; raise N"
        env.start()
    wait_for(lambda: sum(delivered(env).values()) >= N and not list(env.pickup.iterdir()),
             timeout=120, what="all messages delivered and the Pickup folder empty")
    time.sleep(1.0)  # anything late (a duplicate) would show up now
    ids = delivered(env)
    missing = sorted(set(range(N)) - set(ids))
    duplicates = sorted(i for i, n in ids.items() if n > 1)
    assert not missing, f"lost: {missing[:20]}"
    assert not duplicates, f"duplicated: {duplicates[:20]}"
    leftovers = [p for p in (env.drop / "Fax").iterdir() if p.name.startswith(".")]
    assert leftovers == [] or all(p.name.endswith(".tmp") for p in leftovers)
    out = env.cli("queue", "get").stdout
    assert re.search(r"NonSmtpGatewayDelivery\s+\w+\s+0\s", out), out


@pytest.mark.parametrize("point", ["pickup-after-claim", "pickup-after-commit",
                                   "drop-after-rename", "maildir-after-rename"])
def test_crash_at_a_named_point_loses_and_duplicates_nothing(env: MailgateEnv,
                                                             point: str) -> None:
    """The node dies (exit 137, as kill -9) at a named point of the hand-off chain; after a
    restart every message is delivered exactly once (T03, T39)."""
    env.cli("init", str(env.root), "--demo")
    n = 30
    stage = env.root / "stage"
    stage.mkdir()
    for i in range(n):
        (stage / f"m{i:04d}.eml").write_bytes(message(i))
    proc = env.start(env={"MAILGATE_CRASH_AT": f"{point}:5"})
    for i in range(n):
        os.rename(stage / f"m{i:04d}.eml", env.pickup / f"m{i:04d}.eml")
    assert proc.wait(timeout=30) == 137, f"the node did not crash at {point}"
    env.start()
    wait_for(lambda: sum(delivered(env).values()) >= n and not list(env.pickup.iterdir()),
             timeout=30, what="all messages delivered")
    time.sleep(1.0)
    ids = delivered(env)
    assert sorted(ids) == list(range(n))
    assert [i for i, c in ids.items() if c > 1] == []
