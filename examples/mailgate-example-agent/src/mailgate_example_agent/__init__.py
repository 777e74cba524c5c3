"""An example delivery agent: each message becomes `<message number>-<n>.eml` in a folder,
its envelope in a `.json` file beside it. A recipient whose address contains `reject` is
failed (5.1.1), one containing `later` is deferred, one containing `explode` makes
`deliver` raise and one containing `hang` makes it take far longer than its `timeout`
(either way mailgate defers the item and counts it toward the poison threshold), and one
containing `crash` ends the whole process at once, as a crashing native library would (the
node's poison detection then takes over), so the agent can show every outcome.

It uses the plain (sync) form of the contract: mailgate runs it in a worker thread. An
async agent defines the same methods with `async def`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import ClassVar

from mailgate.deliver.agents.api import (
    Item,
    NextHop,
    RecipientResult,
    Setting,
    deferred,
    delivered,
    failed,
)

__version__ = "0.1.0"


class FolderConnection:
    def __init__(self, folder: Path, timeout: int) -> None:
        self.folder = folder
        self.timeout = timeout
        self.count = 0

    def deliver(self, item: Item) -> list[RecipientResult]:
        results: list[RecipientResult] = []
        take = []
        if any("explode" in r.address for r in item.recipients):
            raise RuntimeError("the example agent was told to explode")
        if any("crash" in r.address for r in item.recipients):
            os._exit(137)
        if any("hang" in r.address for r in item.recipients):
            time.sleep(self.timeout + 10)   # mailgate gives up on it after timeout + 5 s
        for r in item.recipients:
            if "reject" in r.address:
                results.append(failed(r.address, "5.1.1", "no such recipient here"))
            elif "later" in r.address:
                results.append(deferred(r.address, "come back later"))
            else:
                take.append(r)
        if take:
            self.count += 1
            name = f"{item.message_id}-{self.count}"
            tmp = self.folder / f".{name}.tmp"
            with open(tmp, "wb") as f:
                for chunk in item.chunks():
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            (self.folder / f"{name}.json").write_text(json.dumps({
                "sender": item.sender, "recipients": [r.address for r in take],
                "subject": item.headers()["Subject"], "size": item.size}))
            os.rename(tmp, self.folder / f"{name}.eml")
            results += [delivered(r.address, f"written as {name}.eml") for r in take]
        return results

    def close(self) -> None:
        pass


class FolderAgent:
    settings: ClassVar[tuple[Setting, ...]] = (
        Setting("folder", "path", required=True, help="Where the messages are written."),
        Setting("token", "string", secret=True, help="An example secret (unused)."),
        # An int setting named `timeout` is also mailgate's limit for one delivery (plus
        # a short grace); without one, mailgate allows 300 s.
        Setting("timeout", "int", default="60",
                help="Seconds one delivery may take."),
    )
    recipient_limit: ClassVar[int | None] = None

    def open_connection(self, next_hop: NextHop) -> FolderConnection:
        folder = Path(next_hop.settings["folder"])
        if not folder.is_dir():
            # Raising here puts the connector's queue in Retry with this text as LastError.
            raise OSError(f"folder {folder} does not exist")
        return FolderConnection(folder, int(next_hop.settings.get("timeout", 60)))
