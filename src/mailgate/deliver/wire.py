"""Message bytes onto the wire of an SMTP or LMTP DATA phase (RFC 5321 4.5.2), chunk by chunk:
every CR or LF that is not part of a CRLF becomes CRLF (no bare line end ever leaves
mailgate, reliability T18), lines starting with "." are dot-stuffed, and `end()` gives the
final line break and ".". A CRLF or a leading dot cut between two chunks is handled.
"""

from __future__ import annotations


class WireData:
    """Stored message bytes → SMTP DATA bytes (CRLF lines, dot-stuffed), chunk by chunk."""

    def __init__(self) -> None:
        self._cr = False     # the last chunk ended in CR: it may be the first half of CRLF
        self._bol = True     # the output so far ends at the start of a line

    def feed(self, chunk: bytes) -> bytes:
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._cr = True
        if not chunk:
            return b""
        # Three C-speed passes: every line ending to LF, then LF to CRLF.
        out = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        out = out.replace(b"\r\n.", b"\r\n..")
        if self._bol and out.startswith(b"."):
            out = b"." + out
        self._bol = out.endswith(b"\r\n")
        return out

    def end(self) -> bytes:
        """What ends the data: a held-back CR as CRLF, a final line break, and ".\r\n"."""
        tail = b"\r\n" if self._cr or not self._bol else b""
        self._cr = False
        self._bol = True
        return tail + b".\r\n"
