"""Real SMTP peers for the Send connector tests.

- `tool(name)`: Postfix's `smtp-sink` / `smtp-source` or `swaks`, found on PATH or in
  `.peers/postfix/usr/sbin` (where .ci/run extracts them from the Debian postfix package,
  without installing Postfix), with the environment to run them (`tool_env()`: their
  shared libraries from `.peers/postfix/usr/lib/postfix`). A missing tool fails the test
  when CI=true (the CI script installs them) and skips it otherwise.
- `sslyze()`: the TLS scanner, from the venv of its own that .ci/run makes in `.peers/`.
- `SmtpSink`: `smtp-sink -d` on 127.0.0.1 and a free port, every transaction dumped to a
  file (`messages()`: envelope lines X-Mail-Args / X-Rcpt-Args and the message as
  received, with LF line ends). Extra flags script it, e.g. `-f RCPT` (hard reject
  at RCPT).
- `AiosmtpdPeer`: an in-process aiosmtpd server (its own thread and loop) whose replies
  are scripted per recipient (`rcpt_replies`), with or without SMTPUTF8, and optionally
  advertising DSN (aiosmtpd itself refuses DSN parameters; the subclass takes them and
  records the raw MAIL/RCPT lines).
- `RawPeer`: a minimal asyncio SMTP server that records the exact bytes of each DATA phase
  (for the smuggling checks, T18: `assert_clean_wire`, `unstuff`, `normalised`).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
POSTFIX = ROOT / ".peers" / "postfix"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing(reason: str) -> NoReturn:
    """A tool or capability the test needs is not there: a failure in CI (.ci/run must
    provide it), a skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def tool(name: str) -> str:
    """The path of `name` (smtp-sink, smtp-source, swaks), or fail (CI) / skip."""
    found = shutil.which(name)
    if found is None:
        for folder in (POSTFIX / "usr" / "sbin", POSTFIX / "usr" / "bin"):
            if os.access(folder / name, os.X_OK):
                found = str(folder / name)
                break
    if found is not None:
        return found
    reason = (f"{name} is missing: .ci/run installs swaks and extracts Postfix's smtp-sink "
              f"and smtp-source into .peers/postfix (apt-get download postfix; dpkg -x)")
    missing(reason)


SSLYZE = ROOT / ".peers" / "sslyze" / "bin" / "sslyze"


def sslyze() -> str:
    """sslyze (reliability T25), from the venv of its own that .ci/run makes in
    .peers/sslyze, or PATH; or fail (CI) / skip."""
    if os.access(SSLYZE, os.X_OK):
        return str(SSLYZE)
    found = shutil.which("sslyze")
    if found is not None:
        return found
    missing("sslyze is missing: .ci/run installs it into .peers/sslyze (a venv of its own)")


def tool_env() -> dict[str, str]:
    """The environment for the tools: the extracted Postfix libraries on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    libs = POSTFIX / "usr" / "lib" / "postfix"
    if libs.is_dir():
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(libs), env.get("LD_LIBRARY_PATH"))
                                          if p)
    return env


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@dataclass
class SinkMessage:
    mail_args: str                 # X-Mail-Args: "<sender> SIZE=... RET=..."
    rcpt_args: list[str]           # X-Rcpt-Args per recipient: "<address> NOTIFY=..."
    data: bytes                    # the message as received (LF line ends, unstuffed)
    path: Path

    @property
    def recipients(self) -> list[str]:
        return [a.split()[0].strip("<>") for a in self.rcpt_args]


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1:<free port>, dumping every transaction."""

    def __init__(self, *flags: str) -> None:
        self.binary = tool("smtp-sink")
        self.port = free_port()
        # smtp-sink runs as the -u user, ourselves (the option is required as root).
        self.folder = Path(tempfile.mkdtemp(prefix="mailgate-sink-"))
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SmtpSink:
        import pwd

        user = pwd.getpwuid(os.geteuid()).pw_name
        self.proc = subprocess.Popen(
            [self.binary, "-u", user, "-d", f"{self.folder}/%Y%m%d%H%M%S.", *self.flags,
             f"127.0.0.1:{self.port}", "64"],
            env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(self.port)
        except OSError:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _open_dumps(self) -> set[str]:
        """The dump files smtp-sink still writes: it creates one when a transaction starts
        and closes it when the transaction ends, so only closed ones are whole."""
        assert self.proc is not None
        fds = Path(f"/proc/{self.proc.pid}/fd")
        out = set()
        for fd in fds.iterdir():
            try:
                out.add(os.readlink(fd))
            except OSError:   # closed meanwhile
                pass
        return out

    def messages(self) -> list[SinkMessage]:
        """Every whole transaction received so far (none still being written)."""
        out = []
        # Listed before smtp-sink's open files are read: a dump that is closed after the
        # listing is whole, and one created after it is not listed.
        paths = list(self.folder.iterdir())
        writing = self._open_dumps()
        for path in sorted((p for p in paths if os.path.realpath(p) not in writing),
                           key=lambda p: (p.stat().st_mtime, p.name)):
            raw = path.read_bytes()
            mail_args, rcpts = "", []
            rest = raw
            while True:
                line, sep, tail = rest.partition(b"\n")
                if not sep or not line.startswith(b"X-"):
                    break
                if line.startswith(b"X-Mail-Args: "):
                    mail_args = line[13:].decode("utf-8", "replace")
                elif line.startswith(b"X-Rcpt-Args: "):
                    rcpts.append(line[13:].decode("utf-8", "replace"))
                elif not line.startswith((b"X-Client-", b"X-Helo-Args")):
                    break
                rest = tail
            out.append(SinkMessage(mail_args, rcpts, rest, path))
        return out


# -- what a next hop receives ----------------------------------------------------------------

def assert_clean_wire(data: bytes) -> None:
    """Reliability T18: no LF without CR before it, no CR without LF after it, and no line
    that is a single "." except the terminator."""
    assert data.endswith(b"\r\n.\r\n") or data == b".\r\n"
    body = data[:-3]
    assert re.search(rb"(?<!\r)\n", body) is None, body
    assert re.search(rb"\r(?!\n)", body) is None, body
    lines = body.split(b"\r\n")
    assert b"." not in lines[:-1], body


def unstuff(data: bytes) -> bytes:
    """What a receiving server makes of the data (RFC 5321 §4.5.2)."""
    assert data.endswith(b".\r\n")
    lines = data[:-3].split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def normalised(content: bytes) -> bytes:
    out = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return out if out.endswith(b"\r\n") or not out else out + b"\r\n"


# -- aiosmtpd ------------------------------------------------------------------------------

@dataclass
class PeerMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_line: str                 # the MAIL command's argument, as sent (DSN peer only)
    rcpt_lines: list[str]          # each RCPT command's argument, as sent (DSN peer only)
    tls: bool = False


class AiosmtpdPeer:
    """An in-process aiosmtpd next hop. `rcpt_replies` maps a recipient (lower case) to
    the reply for its RCPT (e.g. "550 5.1.1 no such user"); others get 250. `dsn`: it
    also advertises DSN and accepts RET/ENVID/NOTIFY/ORCPT."""

    def __init__(self, *, rcpt_replies: dict[str, str] | None = None, smtputf8: bool = True,
                 dsn: bool = False, data_reply: str | None = None,
                 tls_context: Any = None, login: tuple[str, str] | None = None,
                 host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port()
        self.rcpt_replies = {k.lower(): v for k, v in (rcpt_replies or {}).items()}
        self.smtputf8 = smtputf8
        self.dsn = dsn
        self.data_reply = data_reply
        self.tls_context = tls_context
        self.login = login               # (user, password) required before MAIL (needs TLS)
        self.logins: list[tuple[str, bool]] = []     # (user, accepted)
        self.ehlos: list[str] = []
        self.messages: list[PeerMessage] = []
        self.rcpt_attempts: list[str] = []
        self.sessions = 0
        self._controller: Any = None

    def __enter__(self) -> AiosmtpdPeer:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import SMTP

        peer = self

        class Handler:
            async def handle_EHLO(self, server: Any, session: Any, envelope: Any,
                                  hostname: str, responses: list[str]) -> list[str]:
                session.host_name = hostname
                peer.ehlos.append(hostname)
                if peer.dsn:
                    responses.insert(-1, "250-DSN")
                return responses

            async def handle_RCPT(self, server: Any, session: Any, envelope: Any,
                                  address: str, rcpt_options: list[str]) -> str:
                peer.rcpt_attempts.append(address)
                reply = peer.rcpt_replies.get(address.lower())
                if reply:
                    return reply
                envelope.rcpt_tos.append(address)
                return "250 2.1.5 OK"

            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                if peer.data_reply:
                    return peer.data_reply
                peer.messages.append(PeerMessage(
                    envelope.mail_from, list(envelope.rcpt_tos),
                    envelope.original_content or b"",
                    getattr(server, "mail_line", ""), list(getattr(server, "rcpt_lines", [])),
                    session.ssl is not None))
                return "250 2.0.0 OK queued"

        class DsnSMTP(SMTP):
            """aiosmtpd with the DSN parameters accepted (and the raw lines kept)."""

            mail_line = ""
            rcpt_lines: list[str] = []

            def _getparams(self, params: Any) -> Any:
                found = super()._getparams(params)
                if found is not None and peer.dsn:
                    for key in ("RET", "ENVID", "NOTIFY", "ORCPT"):
                        found.pop(key, None)
                return found

            async def smtp_MAIL(self, arg: str) -> None:
                self.mail_line = arg
                self.rcpt_lines = []
                await super().smtp_MAIL(arg)

            async def smtp_RCPT(self, arg: str) -> None:
                self.rcpt_lines.append(arg)
                await super().smtp_RCPT(arg)

        class PeerController(Controller):
            def factory(self) -> SMTP:
                peer.sessions += 1
                return DsnSMTP(self.handler, **self.SMTP_kwargs)

        kwargs: dict[str, Any] = {"enable_SMTPUTF8": self.smtputf8, "decode_data": False}
        if self.tls_context is not None:
            kwargs["tls_context"] = self.tls_context
        if self.login is not None:
            from aiosmtpd.smtp import AuthResult, LoginPassword

            def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                              auth_data: Any) -> AuthResult:
                ok = (isinstance(auth_data, LoginPassword) and peer.login is not None
                      and (auth_data.login.decode(), auth_data.password.decode())
                      == peer.login)
                user = auth_data.login.decode() if isinstance(auth_data, LoginPassword) \
                    else "?"
                peer.logins.append((user, ok))
                return AuthResult(success=ok, handled=False)
            kwargs.update(authenticator=authenticator, auth_required=True,
                          auth_require_tls=True)
        self._controller = PeerController(Handler(), hostname=self.host, port=self.port,
                                          **kwargs)
        self._controller.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._controller is not None:
            self._controller.stop()


# -- a raw-capturing peer ------------------------------------------------------------------

@dataclass
class RawPeer:
    """A minimal SMTP server that keeps the exact bytes of every DATA phase (up to and
    including the terminating CRLF.CRLF) and every command line."""

    port: int = 0
    data: list[bytes] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.base_events.Server | None = None

    async def _session(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        try:
            while True:
                line = await reader.readuntil(b"\n")
                self.commands.append(line)
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-raw.test\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    raw = await reader.readuntil(b"\r\n.\r\n")
                    self.data.append(raw)
                    writer.write(b"250 2.0.0 captured\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def __enter__(self) -> RawPeer:
        started = threading.Event()

        def run() -> None:
            async def main() -> None:
                self._loop = asyncio.get_running_loop()
                self._server = await asyncio.start_server(self._session, "127.0.0.1", 0,
                                                          limit=1 << 26)
                self.port = int(self._server.sockets[0].getsockname()[1])
                started.set()
                async with self._server:
                    try:
                        await self._server.serve_forever()
                    except asyncio.CancelledError:
                        pass
            asyncio.run(main())

        self._thread = threading.Thread(target=run, name="raw-peer", daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        if self._thread is not None:
            self._thread.join(10)


def self_signed_context(folder: Path, host: str = "mx.fabrikam.test") -> Any:
    """A server SSLContext with a fresh self-signed certificate for `host` (for a STARTTLS
    peer that no client can validate)."""
    return certificate_context(folder, host)[0]


def certificate_context(folder: Path, host: str = "mx.fabrikam.test",
                        signed_by_ca: bool = False) -> tuple[Any, Path | None]:
    """A server SSLContext with a fresh certificate for `host`: self-signed, or issued by a
    fresh test CA whose certificate file is returned too (a client's TlsCaFile)."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def builder(subject: Any, issuer: Any, public: Any) -> Any:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(public).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def leaf(issuer: Any) -> Any:
        return builder(name, issuer, key.public_key()).add_extension(
            x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    ca_file: Path | None = None
    if signed_by_ca:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailgate test CA")])
        ca = (builder(ca_name, ca_name, ca_key.public_key())
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(
                  digital_signature=True, content_commitment=False, key_encipherment=False,
                  data_encipherment=False, key_agreement=False, key_cert_sign=True,
                  crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        cert = leaf(ca_name).sign(ca_key, hashes.SHA256())
        ca_file = folder / "test-ca.pem"
        ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    else:
        cert = leaf(name).sign(key, hashes.SHA256())
    cert_file, key_file = folder / f"peer-{host}-cert.pem", folder / f"peer-{host}-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx, ca_file
