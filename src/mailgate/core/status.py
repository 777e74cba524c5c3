"""SMTP reply codes and RFC 3463 enhanced status codes: the one place they are defined.

Every NDR, LastError and (later) SMTP reply takes its code and text from here, so the
wording an administrator sees in ``queue get`` is the wording in the DSN.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LEADING_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


def leading_enhanced(text: str, klass: int) -> tuple[str | None, str]:
    """A reply line's own enhanced status code (RFC 2034: it opens the text) when it is of
    the reply's class (2, 4 or 5), and the text after it; (None, text) otherwise."""
    m = _LEADING_ENHANCED.match(text)
    if m is None or int(m.group(1)) != klass:
        return None, text
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}", text[m.end():]


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

# SMTP receive (Receive connectors): replies mailgate's SMTP server gives.
S250_QUEUED = Status(250, "2.6.0", "Queued mail for delivery")
S354_START = Status(354, "", "Start mail input; end with <CRLF>.<CRLF>")
S421_TOO_MANY_CONNECTIONS = Status(
    421, "4.3.2", "The maximum number of concurrent connections has exceeded a limit, closing "
                  "transmission channel")
S421_TIMEOUT = Status(421, "4.4.1", "Connection timed out, closing transmission channel")
S421_SHUTDOWN = Status(421, "4.3.2", "Service not available, closing transmission channel")
S421_LOGON_FAILURES = Status(421, "4.7.0", "Too many failed logons, closing transmission channel")
S451_STORE_ERROR = Status(451, "4.3.0", "Temporary failure storing the message; try again later")
S452_STORE_FULL = Status(452, "4.3.1", "Insufficient system storage")
S452_TOO_MANY_RCPTS = Status(452, "4.5.3", "Too many recipients")
S500_BARE_EOL = Status(500, "5.5.2", "Syntax error: a command line must end with CRLF and "
                                     "contain no other CR or LF")
S501_SYNTAX = Status(501, "5.5.4", "Syntax error in parameters or arguments")
S503_SEQUENCE = Status(503, "5.5.1", "Bad sequence of commands")
S550_NO_RELAY = Status(550, "5.7.54", "SMTP; Unable to relay recipient in non-accepted domain")
S550_BARE_EOL_DATA = Status(550, "5.6.0", "Message contains a bare CR or LF; lines must end with "
                                          "CRLF (SMTP smuggling protection)")
S550_NUL = Status(550, "5.6.0", "Message contains NUL characters")
# RFC 6531 3.5: a non-ASCII address without SMTPUTF8 on MAIL FROM is 550, on RCPT TO 553.
S550_NON_ASCII_SENDER = Status(550, "5.6.7", "Non-ASCII addresses not permitted for that "
                                             "sender without SMTPUTF8")
S553_NON_ASCII_RECIPIENT = Status(553, "5.6.7", "Non-ASCII addresses not permitted for that "
                                                "recipient without SMTPUTF8")
S552_SIZE = Status(552, "5.3.4", "Message size exceeds fixed maximum message size")
S552_HEADER_SIZE = Status(552, "5.3.4", "Header size exceeds fixed maximum size")
S554_HOPS = Status(554, "5.4.0", "Hop count exceeded - possible mail loop")
S554_NO_CONNECTOR = Status(554, "5.7.1", "No service for your address")
S554_LINE_TOO_LONG = Status(554, "5.6.0", "A line of the message is longer than 1000 octets "
                                          "(RFC 5321 4.5.3.1.6)")
S555_PARAMS = Status(555, "5.5.4", "MAIL FROM/RCPT TO parameters not recognized or not "
                                   "implemented")
