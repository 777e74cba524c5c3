"""SMTP reply codes and RFC 3463 enhanced status codes: the one place they are defined.

Every NDR, LastError and (later) SMTP reply takes its code and text from here, so the
wording an administrator sees in ``queue get`` is the wording in the DSN.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Status:
    """An SMTP reply code with its enhanced status code and text."""

    code: int
    enhanced: str
    text: str

    @property
    def permanent(self) -> bool:
        return self.enhanced.startswith("5")

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def with_text(self, text: str) -> Status:
        return Status(self.code, self.enhanced, text)

    @classmethod
    def parse(cls, reply: str) -> Status:
        """A reply as written by `str(status)`: `550 5.5.3 text`."""
        code, enhanced, text = reply.split(" ", 2)
        return cls(int(code), enhanced, text)


# Recipient resolution and routing (reference §1.6, §5.2).
S550_UNKNOWN_RECIPIENT = Status(550, "5.1.1", "RESOLVER.ADR.RecipNotFound; not found")
S550_NO_CONNECTOR = Status(
    550, "5.1.2", "ROUTING.NoConnectorForAddressType; no connector for the address type"
)
S550_IMCEA_TYPE_REFUSED = Status(
    550, "5.1.1", "RESOLVER.ADR.InvalidAddress; encapsulated SMTP and X500 addresses are refused"
)
S552_TOO_LARGE = Status(552, "5.3.4", "ROUTING.SizeLimit; message too big for every connector")
S550_TOO_MANY_RECIPIENTS = Status(550, "5.5.3", "too many recipients")

# Delivery outcomes.
S250_DELIVERED = Status(250, "2.0.0", "OK")
S250_RELAYED = Status(250, "2.0.0", "written to the Drop directory")
S451_LOCAL_ERROR = Status(451, "4.3.0", "Local error in processing")
S451_DROP_MISSING = Status(451, "4.4.1", "Drop directory does not exist")
S452_DROP_QUOTA = Status(452, "4.3.1", "Drop directory quota exceeded")
S451_DROP_IO = Status(451, "4.3.0", "I/O error writing to the Drop directory")
