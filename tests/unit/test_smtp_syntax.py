"""MAIL/RCPT path syntax and reply texts of the SMTP server (receive/smtp_syntax.py)."""

from __future__ import annotations

import pytest

from mailgate.receive.smtp_syntax import enhanced, keyword, path, reply_text


@pytest.mark.parametrize("text, allow_null, expected", [
    ("<bob@fabrikam.test>", True, ("bob@fabrikam.test", {})),
    ("<>", True, ("", {})),
    ("<@a.test,@b.test:user@d.test>", True, ("user@d.test", {})),       # route dropped
    ("<a@b.test> SIZE=10 body=8bitmime", True,
     ("a@b.test", {"SIZE": "10", "BODY": "8bitmime"})),
    ("<a@b.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Bb@b.test", False,
     ("a@b.test", {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a+2Bb@b.test"})),
])
def test_paths_and_parameters_are_read(text: str, allow_null: bool,
                                       expected: tuple[str, dict[str, str]]) -> None:
    assert path(text, allow_null) == expected


@pytest.mark.parametrize("text, allow_null, reason", [
    ("bob@fabrikam.test", True, "angle brackets"),
    ("<bob@fabrikam.test", True, "no closing"),
    ("<>", False, "null address"),
    ("<a@b.test>SIZE=1", True, "must follow the address"),
    ("<a@b.test> SIZE=1 SIZE=2", True, "malformed parameter"),
    ("<a@b.test> X-Y=1", True, "malformed parameter"),
    ("<" + "a" * 250 + "@b.test>", True, "longer than 256 octets"),
    ("<a\x01@b.test>", True, "not a valid SMTP address"),
])
def test_bad_paths_are_refused_with_the_reason(text: str, allow_null: bool,
                                               reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        path(text, allow_null)


def test_keyword_is_case_insensitive_and_strips_spaces() -> None:
    assert keyword("from: <a@b.test>", "FROM:") == "<a@b.test>"
    assert keyword("TO:<a@b.test>", "FROM:") is None
    assert keyword(None, "TO:") is None


@pytest.mark.parametrize("reply, expected", [
    ("250 OK", "250 2.0.0 OK"),                         # aiosmtpd's RSET/NOOP
    ("221 Bye", "221 2.0.0 Bye"),
    ("503 Error: send HELO first", "503 5.5.1 Error: send HELO first"),
    ("250 2.1.0 Sender OK", "250 2.1.0 Sender OK"),     # already has one
    ("354 Start mail input", "354 Start mail input"),   # never for 354
    ("250-PIPELINING", "250-PIPELINING"),               # continuation lines are left alone
])
def test_replies_get_an_enhanced_code_when_they_lack_one(reply: str, expected: str) -> None:
    assert enhanced(reply) == expected


def test_reply_text_is_one_line_of_printable_ascii() -> None:
    assert reply_text("bad\r\naddr\x00ess é") == "bad??addr?ess ?"
    assert len(reply_text("x" * 1000)) == 300
