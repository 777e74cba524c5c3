"""Mailbox password hashing and policy (scrypt, constant-time check, never raises)."""

from __future__ import annotations

import base64

import pytest

from mailgate.admin import AdminError
from mailgate.admin.passwords import (
    check_password,
    hash_password,
    needs_rehash,
    verify_password,
)

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_password(PASSWORD)


def test_hash_format_is_scrypt_with_current_parameters(stored: str) -> None:
    scheme, n, r, p, salt, key = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(2**15), "8", "1")
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(key)) == 32
    assert PASSWORD not in stored
    assert not needs_rehash(stored)


def test_right_password_verifies_and_wrong_ones_do_not(stored: str) -> None:
    assert verify_password(PASSWORD, stored)
    for wrong in ("correct horse batterY", "correct horse battery ", "", PASSWORD[:-1]):
        assert not verify_password(wrong, stored), wrong


def test_same_password_gets_a_new_salt_each_time(stored: str) -> None:
    again = hash_password(PASSWORD)
    assert again != stored
    assert verify_password(PASSWORD, again)


def test_unicode_passwords() -> None:
    pw = "pässwörd-密码-🔑"
    h = hash_password(pw)
    assert verify_password(pw, h)
    assert not verify_password("passwort-密码-🔑", h)


def _tamper(stored: str, index: int, value: str) -> str:
    parts = stored.split("$")
    parts[index] = value
    return "$".join(parts)


def test_malformed_hashes_are_false_never_an_exception(stored: str) -> None:
    bad: list[object] = [
        None, "", "$", "scrypt", "scrypt$$$$$", stored + "$x", stored.replace("scrypt", "bcrypt"),
        "pbkdf2_sha256$600000$salt$hash", PASSWORD,
        _tamper(stored, 1, "1000"),             # N not a power of two
        _tamper(stored, 1, str(2**30)),          # N too large (would take gigabytes)
        _tamper(stored, 1, "0"), _tamper(stored, 2, "0"), _tamper(stored, 3, "0"),
        _tamper(stored, 2, "999999999"), _tamper(stored, 3, "-1"), _tamper(stored, 1, "x"),
        _tamper(stored, 1, "１６"),
        _tamper(stored, 4, "!!!notbase64"), _tamper(stored, 5, ""), _tamper(stored, 4, ""),
        _tamper(stored, 5, "QUJD"),            # a 3-byte key
        _tamper(stored, 4, "é"), stored[:-4], stored.encode(), 42,
    ]
    for encoded in bad:
        assert verify_password(PASSWORD, encoded) is False, encoded  # type: ignore[arg-type]


def test_bad_password_input_is_false_never_an_exception(stored: str) -> None:
    for pw in (None, b"correct horse battery", 12345678, "\ud800 surrogate", "x" * 100000):
        assert verify_password(pw, stored) is False, pw  # type: ignore[arg-type]


def test_tampered_key_does_not_verify(stored: str) -> None:
    key = bytearray(base64.b64decode(stored.split("$")[5]))
    key[0] ^= 1
    assert not verify_password(PASSWORD, _tamper(stored, 5, base64.b64encode(key).decode()))


def test_needs_rehash_for_other_parameters_or_garbage(stored: str) -> None:
    assert needs_rehash(_tamper(stored, 1, str(2**14)))
    assert needs_rehash("garbage")


@pytest.mark.parametrize("pw", ["12345678", "x" * 256, "pass word with spaces", "tab\there!",
                                "ünïcödé8"])
def test_policy_accepts(pw: str) -> None:
    check_password(pw)


@pytest.mark.parametrize("pw, needle", [
    ("", "at least 8"), ("1234567", "at least 8"), ("x" * 257, "at most 256"),
    ("line1\nline2", "CR or LF"), ("carriage\rreturn", "CR or LF"), ("nul\x00byte!", "NUL"),
    ("bad \ud800 surrogate", "Unicode"),
])
def test_policy_refuses_and_never_shows_the_password(pw: str, needle: str) -> None:
    with pytest.raises(AdminError) as err:
        check_password(pw)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message
    if pw:
        assert pw not in message
