"""Mailbox passwords for SMTP AUTH: the policy, the hash (scrypt) and the admin commands.

A password is stored only as `scrypt$N$r$p$<base64 salt>$<base64 key>` (the mailbox's
PasswordHash), never in clear, and is never printed or logged. `verify_password` compares in
constant time and answers False, never raises, for anything malformed, so the SMTP server
can hand it whatever a client sent. Hashing takes tens of milliseconds and 32 MB on
purpose: run it off the event loop (`asyncio.to_thread`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import replace

from mailgate.admin import AdminError
from mailgate.admin.organization import _obj, _put, find_mailbox
from mailgate.directory import load_organization
from mailgate.organization import Mailbox
from mailgate.store import Store

SCHEME = "scrypt"
N, R, P = 2**15, 8, 1
SALT_BYTES = 16
KEY_BYTES = 32
MIN_LENGTH, MAX_LENGTH = 8, 256
# Bounds on the parameters a stored hash may ask for, so a crafted or corrupt PasswordHash
# cannot make verification take minutes or gigabytes.
_MAX_N, _MAX_R, _MAX_P = 2**20, 32, 16
_MAX_MEM = 2**31 - 1   # below OpenSSL's limit on every platform


def _maxmem(n: int, r: int, p: int) -> int:
    # scrypt needs 128*N*r bytes for V plus 128*r*p for B; leave room for OpenSSL's own.
    return min(_MAX_MEM, 128 * r * (n + p + 2) + 1024 * 1024)


def check_password(password: str) -> None:
    """The policy: 8-256 characters, no NUL, CR or LF. The message never shows it."""
    if not isinstance(password, str):
        raise AdminError("the password must be text")
    if len(password) < MIN_LENGTH:
        raise AdminError(f"the password must be at least {MIN_LENGTH} characters long")
    if len(password) > MAX_LENGTH:
        raise AdminError(f"the password must be at most {MAX_LENGTH} characters long")
    if any(ch in password for ch in "\x00\r\n"):
        raise AdminError("the password must not contain NUL, CR or LF characters")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise AdminError("the password is not valid Unicode text") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or not text.isascii():
        raise ValueError("not base64")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str) -> str:
    """A new hash with a random salt (so hashing the same password twice gives two
    different strings). The policy is `check_password`'s job, not this function's."""
    if not isinstance(password, str):
        raise TypeError("the password must be a str")
    salt = os.urandom(SALT_BYTES)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=N, r=R, p=P,
                         maxmem=_maxmem(N, R, P), dklen=KEY_BYTES)
    return f"{SCHEME}${N}${R}${P}${_b64(salt)}${_b64(key)}"


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise ValueError("not an scrypt hash")
    if not all(x.isascii() and x.isdigit() and len(x) <= 8 for x in parts[1:4]):
        raise ValueError("bad parameters")
    n, r, p = (int(x) for x in parts[1:4])
    if not (2 <= n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= _MAX_R
            and 1 <= p <= _MAX_P):
        raise ValueError("parameters out of range")
    salt, key = _unb64(parts[4]), _unb64(parts[5])
    if not SALT_BYTES <= len(salt) <= 64 or len(key) != KEY_BYTES:
        raise ValueError("bad salt or key length")
    return n, r, p, salt, key


def verify_password(password: str, encoded: str | None) -> bool:
    """Whether `password` matches the stored hash `encoded`. False, never an exception, for
    a wrong password, a malformed or missing hash, or input that is not text."""
    try:
        if not isinstance(password, str) or not isinstance(encoded, str):
            return False
        n, r, p, salt, key = _parse(encoded)
        candidate = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                                   maxmem=_maxmem(n, r, p), dklen=len(key))
        return hmac.compare_digest(candidate, key)
    except (ValueError, TypeError, binascii.Error, OverflowError, MemoryError):
        return False


def needs_rehash(encoded: str) -> bool:
    """Whether a valid hash uses other parameters than the current ones (the SMTP server
    may store a new hash after a successful logon)."""
    try:
        n, r, p, salt, key = _parse(encoded)
    except (ValueError, binascii.Error):
        return True
    return (n, r, p, len(salt), len(key)) != (N, R, P, SALT_BYTES, KEY_BYTES)


# -- admin commands -----------------------------------------------------------------------


async def find_mailbox_for_password(store: Store, identity: str) -> Mailbox:
    """The mailbox `identity` names (name, GUID or any of its addresses), or AdminError;
    for the CLI to check before it asks for a password."""
    org = await load_organization(store, store.node)
    return find_mailbox(org, identity)


async def set_mailbox_password(store: Store, identity: str, password: str) -> Mailbox:
    """Check the policy, hash the password and store the hash on the mailbox."""
    check_password(password)
    org = await load_organization(store, store.node)
    m = find_mailbox(org, identity)
    new = replace(m, password_hash=hash_password(password))
    await _put(store, [_obj(new)])
    return new


async def clear_mailbox_password(store: Store, identity: str) -> Mailbox:
    """Remove the mailbox's password: it can no longer log on over SMTP."""
    org = await load_organization(store, store.node)
    m = find_mailbox(org, identity)
    new = replace(m, password_hash=None)
    await _put(store, [_obj(new)])
    return new
