"""Back pressure on low disk space (PRODUCT §5, reliability T06/T07): when the file system of
the node's data folder is nearly full, new mail is refused before it is read (SMTP MAIL:
452 4.3.1) and the Pickup and Replay directories pause, so that what was already accepted
can still be delivered and nothing is half-written.

"Nearly full" means less than LOW_DISK free or 5 % of the file system, whichever is
smaller, would be left. The free space is read at most once a second.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

LOW_DISK = 64 * 1024 * 1024


class DiskSpace:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._checked = 0.0
        self._spare = 0

    def low(self, need: int = 0) -> bool:
        """Whether taking `need` more bytes would leave the file system nearly full."""
        now = time.monotonic()
        if now - self._checked > 1.0:
            self._checked = now
            try:
                usage = shutil.disk_usage(self.folder)
                self._spare = usage.free - min(LOW_DISK, usage.total // 20)
            except OSError:
                self._spare = 1 << 62   # cannot tell: do not refuse mail for it
        return self._spare <= need
