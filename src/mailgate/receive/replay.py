"""The Replay directory (PRODUCT §4.5, reference §2.1, §2.5–2.8, §2.11–2.12).

Claiming, batching, crash recovery, badmail and the rate limit are the shared submission
directory's (`directory.py`), exactly as for Pickup; this module only turns a claimed Replay
file into a message:

- the folder is TransportService.ReplayDirectoryPath (default `replay` under the data
  directory; `$null` disables it). A path that is the Pickup directory's is refused (logged,
  Replay stays off) rather than letting two services claim each other's files;
- the envelope comes from the leading X-headers (`parse_replay`): X-Sender with RET, ENVID
  (kept with the message), BODY and AUTH (checked, not kept); one X-Receiver per recipient
  with NOTIFY and ORCPT (kept per recipient). From:/To:/Cc:/Bcc: play no part in it. A
  `TYPE:value` receiver (`FAX:+15551234`) is routed like any recipient;
- the message stored is the header after the X-headers, rewritten by
  `rewrite_replay_header` (our `Received: ... with mailgate Replay` first, Bcc removed,
  routing headers kept, Message-ID/Date repaired), then the body with CRLF line endings. A
  Drop file moved here is therefore delivered with its envelope and its message bytes after
  our Received line;
- X-MS-Exchange-Organization-*/Forest-* headers are kept only when the directory is trusted:
  the per-directory setting `replay_directory_trusted` (False when absent), never the
  X-CreatedBy string;
- a format error is badmail (`.bad` + `.bad.reason`, BADMAIL event); an invalid X-Receiver
  address, or a message over MaxMessageSize, with a valid non-null X-Sender is answered by an
  NDR to that sender and the file deleted (reference §2.7);
- tracking: RECEIVE with source REPLAY (source-context = the file name), then SUBMIT (and
  FAIL/DSN for recipients that cannot be routed) as for any submission; BADMAIL and FAIL
  with source REPLAY for a file that is refused.

Exchange documents no header limit for Replay (reference §2.2: Pickup's limits are Pickup's
only); mailgate reads at most MAX_HEADER_SIZE bytes of header so a hostile file cannot
exhaust memory.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mailgate import tracking
from mailgate.clock import utc
from mailgate.core import status
from mailgate.ids import message_id_uuid
from mailgate.organization import Organization, TransportService
from mailgate.receive import filecontent
from mailgate.receive.directory import Claimed, Prepared, SubmissionDirectory, strip_blank
from mailgate.receive.pickup_parse import (
    _MESSAGE_ID_RE,
    _SUBJECT_RE,
    PickupError,
    _tracking_subject,
    _unfold,
)
from mailgate.receive.replay_parse import _NAMES, ReplayError, parse_replay, rewrite_replay_header
from mailgate.receive.submit import Inbound, InboundRecipient

log = logging.getLogger(__name__)

MAX_HEADER_SIZE = 8 * 1024 * 1024
MAX_SOURCE_NAME = 64  # X-Source is shown as MessageSourceName; a display value, kept short
_LEADING_FIELD = re.compile(rb"([^:\r\n]*+):[^\n]*+\n(?:[ \t][^\n]*+\n)*+")
_END_MARKER = b"x-endofinjectedxheaders"
_REPLAY_NAMES = frozenset(n.encode() for n in _NAMES)


@dataclass
class ReplayDirectory(SubmissionDirectory):
    LABEL: ClassVar[str] = "Replay"
    SOURCE: ClassVar[str] = tracking.REPLAY
    CRASH: ClassVar[str] = "replay"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._conflict: tuple[tuple[Path | None, Path | None], bool] | None = None

    def _path_value(self, ts: TransportService) -> str | None:
        return ts.replay_directory_path

    def _folder(self, org: Organization) -> Path | None:
        path = super()._folder(org)
        pickup = org.transport.resolve(self.data_dir, org.transport.pickup_directory_path)
        key = (path, pickup)
        if self._conflict is None or self._conflict[0] != key:
            # Resolved (symbolic links followed) once per change of either setting.
            same = (path is not None and pickup is not None
                    and os.path.realpath(path) == os.path.realpath(pickup))
            if same:
                log.error("Replay directory %s is the Pickup directory; Replay is disabled "
                          "until ReplayDirectoryPath names another folder", path)
            self._conflict = (key, same)
        return None if self._conflict[1] else path

    def _prepare(self, org: Organization, c: Claimed) -> Prepared:
        ts = org.transport
        now = self.clock.now()
        try:
            head = filecontent.read_head(c.fd, c.st.st_size, MAX_HEADER_SIZE)
        except PickupError:
            # read_header_block names Pickup's setting; Replay's limit is no setting.
            raise ReplayError(f"header is larger than {MAX_HEADER_SIZE} bytes, the Replay "
                              "directory's limit") from None
        env = parse_replay(head.head)
        domain = org.default_domain.domain_name if org.default_domain else self.hostname
        header = rewrite_replay_header(
            head.head, env, received=self._received(now), trusted=ts.replay_directory_trusted,
            now=utc(int(now)), make_message_id=lambda: f"<{message_id_uuid()}@{domain}>")
        message_id, subject = message_info(header)
        addresses = [r.address for r in env.receivers]
        body = filecontent.read_body(c.fd, head)
        size = len(header) + body.size
        if ts.max_message_size is not None and size > ts.max_message_size:
            raise ReplayError(
                f"message is {size} bytes, larger than MaxMessageSize "
                f"({ts.max_message_size} bytes)",
                ndr=str(status.S552_TOO_LARGE.with_text(
                    f"message too big ({size} bytes, the limit is {ts.max_message_size})")),
                sender=env.sender or None, recipients=addresses, subject=subject,
                message_id=message_id)
        # The same shape as Pickup's key, marked as Replay's (the token alone is unique).
        key = f"{c.token}:{self._tag}:replay:{c.st.st_size}:{body.digest}"
        sender = env.sender or "<>"
        receive = tracking.event(
            tracking.RECEIVE, tracking.REPLAY, message_id=message_id, recipients=addresses,
            sender=sender, return_path=sender, subject=subject, source_context=c.name,
            server_hostname=self.hostname, timestamp=now)
        inbound = Inbound(
            sender=env.sender,
            recipients=[InboundRecipient(r.address, r.orcpt, r.notify) for r in env.receivers],
            content=filecontent.content(c.fd, header, body, head.body_offset),
            size=size, header=strip_blank(header),
            source=env.message_source_name[:MAX_SOURCE_NAME], source_context=c.name,
            message_id=message_id, subject=subject, ret=env.ret, envid=env.envid,
            source_key=key, date_received=now, receive_events=[receive])
        return Prepared(c, self.submitter.prepare(org, inbound, now))

    def _ndr_original(self, c: Claimed, head: bytes,
                      exc: PickupError) -> tuple[int, str | None, str | None]:
        """The message starts after the X-header envelope (it is not part of the message);
        its Subject and Message-ID are read from the header that follows."""
        rest = _without_envelope(head)
        message_id, subject = message_info(rest)
        return len(head) - len(rest), exc.subject or subject, exc.message_id or message_id


def _without_envelope(head: bytes) -> bytes:
    """`head` without its Replay X-headers: up to X-EndOfInjectedXHeaders if the leading
    X- fields hold it, else the leading run of Replay X-headers (parse_replay's rule)."""
    pos = run_end = 0
    in_run = True
    while (m := _LEADING_FIELD.match(head, pos)) is not None:
        name = m.group(1).strip().lower()
        if not name.startswith(b"x-"):
            break
        pos = m.end()
        if name == _END_MARKER:
            return head[pos:]
        if in_run and name in _REPLAY_NAMES:
            run_end = pos
        else:
            in_run = False
    return head[run_end:]


def message_info(header: bytes) -> tuple[str | None, str | None]:
    """The Message-ID and the Subject (as tracking shows it) of a header."""
    text = header.replace(b"\r\n", b"\n")
    m = _MESSAGE_ID_RE.search(text)
    message_id = (_unfold(m.group(1)).strip(b" \t").decode("utf-8", "replace") or None
                  if m is not None else None)
    s = _SUBJECT_RE.search(text)
    subject = _tracking_subject(_unfold(s.group(1))) if s is not None else None
    return message_id, subject
