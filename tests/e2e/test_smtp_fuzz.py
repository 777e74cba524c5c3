"""Address syntax fuzzing over real SMTP (issue #4, reliability T28) and parser-bomb messages
(T32): generated MAIL/RCPT paths on one long-lived session of a running node, with the
outcome checked against mailgate's own address parser, and messages built to make parsers
slow or deep."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailgate.core.address import AddressError, parse_smtp_address
from tests.conftest import MailgateEnv, NodeThread, wait_for
from tests.smtp import chat, free_port, read_reply, add_connector, wait_listening

LOCAL_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))
ATOM = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-/=?^_`{|}~.",
               min_size=1, max_size=70)
QUOTED = st.builds(lambda t: '"' + t + '"',
                   st.text(alphabet=st.sampled_from(list('ab c\\"@.\t') + ["\x00", "\r", "\n",
                                                                         "é", "\x7f"]),
                           max_size=20))
NASTY = st.text(alphabet=LOCAL_CHARS, min_size=1, max_size=40)
DOMAIN = st.one_of(
    st.sampled_from(["contoso.test", "fabrikam.test", "[127.0.0.1]", "[IPv6:::1]",
                     "[1.2.3]", "[IPv6:zz]", "-bad-.test", "a..b", "xn--bcher-kva.test",
                     "bücher.test", "a" * 64 + ".test", ("a" * 60 + ".") * 5 + "test"]),
    st.text(alphabet="abc.-_09", min_size=1, max_size=30))
LOCAL = st.one_of(ATOM, QUOTED, NASTY)


def expected(local: str, domain: str, utf8: bool) -> str:
    """What the server must answer a `MAIL FROM:<local@domain>` with: 'ok', 'refused'."""
    text = f"{local}@{domain}"
    if any(ch in text for ch in "\r\n\x00"):
        return "refused"
    if not utf8 and not text.isascii():
        return "refused"
    try:
        parse_smtp_address(text)
    except AddressError:
        return "refused"
    return "ok"


def test_t28_generated_paths_never_break_the_session(demo_env: MailgateEnv) -> None:
    """T28: 2,000 generated senders (dot-atoms, quoted strings with blanks, escapes, NUL,
    CR, LF, 8-bit; domains with labels, literals, bad literals), with and without
    SMTPUTF8: the answer matches mailgate's address parser (250 or a 5xx refusal), never a
    crash or a 4xx; control characters are always refused; the session stays usable."""
    port = free_port()
    add_connector(demo_env, port, "--max-protocol-errors", "1000000")
    node = NodeThread(demo_env)
    try:
        wait_listening(port)
        conn: dict[str, socket.socket] = {}

        def session() -> socket.socket:
            if "s" not in conn:
                s = socket.create_connection(("127.0.0.1", port), timeout=20)
                read_reply(s)
                assert chat(s, b"EHLO fuzz.test").startswith(b"250")
                conn["s"] = s
            return conn["s"]

        @settings(max_examples=2000, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(local=LOCAL, domain=DOMAIN, utf8=st.booleans())
        @example(local="\xa00", domain="contoso.test", utf8=False)  # was trimmed to "0"
        def one(local: str, domain: str, utf8: bool) -> None:
            s = session()
            path = f"{local}@{domain}".encode("utf-8")
            line = b"MAIL FROM:<" + path + b">" + (b" SMTPUTF8" if utf8 else b"") + b"\r\n"
            s.sendall(line)
            # A bare LF splits the line: one reply per piece. After repeated unknown
            # commands (the pieces) the server may end the session with 502: allowed.
            replies = []
            for _ in range(line.count(b"\n")):
                reply = read_reply(s)
                replies.append(reply)
                if reply.startswith(b"502 5.5.1") or not reply:
                    conn.pop("s").close()
                    break
            want = expected(local, domain, utf8)
            codes = [r[:3] for r in replies]
            assert all(c[:1] in (b"2", b"5") for c in codes), (line, replies)
            if want == "ok":
                assert codes == [b"250"], (line, replies)
            else:
                assert b"250" not in codes, (line, replies)
            if "s" in conn:
                assert chat(s, b"RSET").startswith(b"250")
        one()
        if "s" in conn:
            conn["s"].close()
    finally:
        node.stop()


def test_t32_parser_bombs_are_carried_or_refused_quickly(demo_env: MailgateEnv) -> None:
    """T32: multipart nesting 5,000 deep and 100,000 empty parts are carried as they are
    (mailgate does not parse bodies), each answered within 2 s; a 5 MB header and a To:
    with 50,000 addresses are refused by MaxHeaderSize (552 5.3.4); the node keeps
    delivering."""
    port = free_port()
    add_connector(demo_env, port, "--max-message-size", "20MB")
    node = NodeThread(demo_env)
    fax = "IMCEAFAX-+2B16660000@contoso.test"
    try:
        wait_listening(port)
        deep = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'
                       for i in range(5000))
        parts = 'Content-Type: multipart/mixed; boundary="p"\r\n\r\n' + "--p\r\n\r\n" * 100000
        addresses = "To: " + ",\r\n ".join(f"u{i}@fabrikam.test" for i in range(50000))
        cases = [("deep", deep, b"250"), ("parts", parts, b"250"),
                 ("header", "X-Big: " + ("h" * 900 + "\r\n ") * 5800 + "\r\n", b"552"),
                 ("to", addresses + "\r\n", b"552")]
        for name, head, code in cases:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            read_reply(s)
            chat(s, b"EHLO bomb.test")
            assert chat(s, b"MAIL FROM:<bob@fabrikam.test>").startswith(b"250")
            assert chat(s, f"RCPT TO:<{fax}>".encode()).startswith(b"250")
            assert chat(s, b"DATA").startswith(b"354")
            body = (f"Subject: {name}\r\n" + head).encode() + b"\r\n.\r\n"
            s.sendall(body)
            t0 = time.monotonic()
            reply = read_reply(s)
            assert time.monotonic() - t0 < 2.0, name
            assert reply.startswith(code), (name, reply[:100])
            s.close()
        folder = demo_env.drop / "Fax"
        done = wait_for(lambda: len(list(folder.glob("*.eml"))) == 2 and
                        list(folder.glob("*.eml")), what="the two carried messages")
        sizes = sorted(Path(p).stat().st_size for p in done)  # type: ignore[union-attr]
        assert sizes[0] > 100_000 and sizes[1] > 400_000
    finally:
        node.stop()
