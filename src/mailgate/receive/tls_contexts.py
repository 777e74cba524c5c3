"""The Receive connectors' server TLS contexts, one per certificate and key pair.

A context is loaded before a connector's first client (the SMTP service does it in a worker
thread: reading a key, or making the self-signed one, must not hold up sessions) and kept.
`refresh()`, which the service runs every minute in a worker thread, loads a pair again
when its files changed, so a renewed certificate is taken without a restart, and makes the
self-signed certificate again a month before its end. A pair that fails to load again keeps
the context it would have replaced; the failure is logged once per change of its files. A
configured certificate that ends within 30 days (or has ended) is logged as a warning when
it is loaded and once a day after.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mailgate.clock import Clock, iso
from mailgate.receive.tls import RENEW_BEFORE, not_after, self_signed, server_context

log = logging.getLogger(__name__)

RETRY = 30.0                 # seconds before a pair that never loaded is tried again
EXPIRY_WARNING = 30 * 86400.0
WARN_EVERY = 86400.0

Pair = tuple[str | None, str | None]   # (certificate, key) paths; (None, None): self-signed
_Files = tuple[tuple[int, int, int] | None, ...]


@dataclass
class _Loaded:
    context: ssl.SSLContext
    certificate: Path
    key: Path
    files: _Files            # the files as they were when loaded
    not_after: float | None  # epoch seconds, when it could be read
    self_signed: bool
    warned_at: float | None = None


def _files(*paths: Path) -> _Files:
    out: list[tuple[int, int, int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


class TlsContexts:
    """Loads, keeps and reloads server contexts. Thread-safe."""

    def __init__(self, folder: Path, hostname: str, clock: Clock) -> None:
        self.folder = folder          # where the self-signed certificate lives
        self.hostname = hostname
        self.clock = clock
        self._loaded: dict[Pair, _Loaded] = {}
        self._retry_at: dict[Pair, float] = {}   # monotonic; pairs that never loaded
        self._bad: dict[Pair, _Files] = {}       # files whose reload failed (logged once)
        self._lock = threading.Lock()

    def has(self, pair: Pair) -> bool:
        return pair in self._loaded

    def get(self, pair: Pair, connector: str) -> ssl.SSLContext | None:
        """The pair's context: the one loaded, or loaded now; None (logged) if it cannot
        be loaded, and then not tried again for RETRY seconds."""
        loaded = self._loaded.get(pair)
        if loaded is not None:
            return loaded.context
        with self._lock:
            loaded = self._loaded.get(pair)
            if loaded is not None:
                return loaded.context
            if time.monotonic() < self._retry_at.get(pair, 0.0):
                return None   # failed a moment ago: not reloaded and logged per connection
            try:
                loaded = self._loaded[pair] = self._load(pair)
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.error("SMTP: no TLS for the %s connector (tried again in %d s): %s",
                          connector, RETRY, exc)
                self._retry_at[pair] = time.monotonic() + RETRY
                return None
            self._retry_at.pop(pair, None)
            return loaded.context

    def forget_failures(self) -> None:
        """Try pairs that failed again at their next use (the configuration changed)."""
        self._retry_at.clear()

    def refresh(self, in_use: set[Pair]) -> None:
        """Forget the pairs no longer `in_use`; load again each other pair whose files
        changed, and make the self-signed certificate again when it is due; warn of
        configured certificates near their end."""
        with self._lock:
            for pair in set(self._loaded) - in_use:
                del self._loaded[pair]
                self._bad.pop(pair, None)
            for pair, loaded in list(self._loaded.items()):
                now = self.clock.now()
                if self._current(loaded, now):
                    self._warn_expiry(loaded, now)
                    continue
                try:
                    fresh = self._load(pair)
                except (OSError, ssl.SSLError, ValueError) as exc:
                    files = _files(loaded.certificate, loaded.key)
                    if self._bad.get(pair) != files:
                        self._bad[pair] = files
                        log.error("SMTP: cannot load the certificate %s again, the one loaded "
                                  "before stays in use: %s", loaded.certificate, exc)
                    continue
                self._bad.pop(pair, None)
                self._loaded[pair] = fresh
                log.info("SMTP: loaded the certificate %s again (ends %s)", fresh.certificate,
                         iso(fresh.not_after))

    @staticmethod
    def _current(loaded: _Loaded, now: float) -> bool:
        if _files(loaded.certificate, loaded.key) != loaded.files:
            return False
        due = loaded.not_after is not None and now >= loaded.not_after - RENEW_BEFORE
        return not (loaded.self_signed and due)

    def _load(self, pair: Pair) -> _Loaded:
        cert, key = pair
        now = self.clock.now()
        if cert and key:
            certificate, private = Path(cert), Path(key)
            # Read before loading: a change made meanwhile is seen at the next refresh.
            files = _files(certificate, private)
            context = server_context(certificate, private)
            try:
                ends: float | None = not_after(certificate)
            except ValueError:
                ends = None   # OpenSSL took it; only the warning needs the date
            loaded = _Loaded(context, certificate, private, files, ends, self_signed=False)
            self._warn_expiry(loaded, now)
            return loaded
        made = self_signed(self.folder, self.hostname, now)
        files = _files(made.certificate, made.key)
        context = server_context(made.certificate, made.key)
        return _Loaded(context, made.certificate, made.key, files, made.not_after,
                       self_signed=True)

    def _warn_expiry(self, loaded: _Loaded, now: float) -> None:
        if loaded.self_signed or loaded.not_after is None:
            return
        if loaded.not_after - now > EXPIRY_WARNING:
            return
        if loaded.warned_at is not None and now - loaded.warned_at < WARN_EVERY:
            return
        loaded.warned_at = now
        if loaded.not_after <= now:
            log.warning("SMTP: the certificate %s ended %s; senders that check it will "
                        "refuse it", loaded.certificate, iso(loaded.not_after))
        else:
            log.warning("SMTP: the certificate %s ends %s, in %d days", loaded.certificate,
                        iso(loaded.not_after), int((loaded.not_after - now) // 86400))
