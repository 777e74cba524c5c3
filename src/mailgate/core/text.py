"""Text from outside (a command's output, a gateway's answer) made safe to record: one line
of printable ASCII, for LastError, NDR texts and tracking."""

from __future__ import annotations

import re

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def one_line(raw: bytes) -> str:
    """`raw` as one line of printable ASCII: whitespace runs become one space, any other
    control or non-ASCII character `_` (as Postfix does for pipe(8) output)."""
    text = " ".join(raw.decode("utf-8", "replace").split())
    return _UNPRINTABLE.sub("_", text)
