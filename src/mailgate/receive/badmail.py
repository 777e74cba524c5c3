"""Badmail files of a submission directory (Pickup, Replay): `<name>.bad` + `<name>.bad.reason`.

Contract (PRODUCT §4.5, reference §2.7): a file that cannot be submitted is renamed, in its
own folder, from `<name>.eml` (or the claimed name) to `<name>.bad`, or `<name><datetime>.bad`
when that name or its reason file is taken, so nothing is ever overwritten. Beside it,
`<new name>.reason` holds why, as one line. The reason file is created with
`O_EXCL|O_NOFOLLOW`: a planted file or symbolic link of that name is never written through.
Only file-system work here: tracking and counters are the directory service's business.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def bad_target(folder: Path, name: str) -> Path:
    """`<name>.bad`, or `<name><datetime>.bad` when that name or its `.reason` file is
    taken."""
    base = name[:-4] if name.lower().endswith(".eml") else name
    target = folder / f"{base}.bad"
    while os.path.lexists(target) or os.path.lexists(f"{target}.reason"):
        stamp = dt.datetime.now().strftime("%Y%m%d%H%M%S%f")
        target = folder / f"{base}{stamp}.bad"
    return target


def one_line(reason: str) -> str:
    """The reason as it is written: white space (line breaks included) collapsed."""
    return " ".join(reason.split())


def move_to_badmail(folder: Path, current: Path, name: str, reason: str,
                    label: str) -> Path | None:
    """Rename `current` (a file of `folder` dropped as `name`) to its `.bad` name and write
    the reason file. Returns the `.bad` path, or None when the rename failed (the file is
    then left where it was and the failure logged). A reason file that cannot be written is
    logged; the `.bad` file stays."""
    target = bad_target(folder, name)
    try:
        os.rename(current, target)
    except OSError as exc:
        log.error("%s: cannot rename %s to %s: %s", label, current, target.name, exc)
        return None
    try:
        fd = os.open(f"{target}.reason",
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(one_line(reason) + "\n")
    except OSError as exc:
        log.error("%s: cannot write %s.reason: %s", label, target.name, exc)
    return target
