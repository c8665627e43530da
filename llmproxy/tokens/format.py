"""
Withering token strings: generation, format check, hashing and the
obfuscation rules shared with the Go llm-proxy (so listings look the same).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time

TOKEN_PREFIX = "sk-"
TOKEN_LENGTH = 25
_TOKEN_RE = re.compile(r"^sk-[A-Za-z0-9_-]{22}$")


def uuid7_bytes(now_ms: int | None = None) -> bytes:
    """The 16 bytes of a fresh UUIDv7 (48-bit millisecond time, then random bits)."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    raw = bytearray(ms.to_bytes(6, "big") + os.urandom(10))
    raw[6] = 0x70 | (raw[6] & 0x0F)  # version 7
    raw[8] = 0x80 | (raw[8] & 0x3F)  # RFC 4122 variant
    return bytes(raw)


def generate_token() -> str:
    """A new token: ``sk-`` + base64url (no padding) of a UUIDv7, 25 characters."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(uuid7_bytes()).rstrip(b"=").decode("ascii")


def is_valid_format(s: str) -> bool:
    """
    True when C{s} looks like a token: 25 characters, ``sk-``, and a
    remainder that decodes as base64url to 16 bytes (the unused low bits of
    the last character are ignored, as in the Go project).
    """
    # 22 base64url characters always decode to 16 bytes, so the pattern is
    # the whole check.
    return isinstance(s, str) and len(s) == TOKEN_LENGTH and _TOKEN_RE.match(s) is not None


def hash_token(s: str) -> str:
    """Lowercase hex SHA-256: the only form of a token the database keeps."""
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def obfuscate_token(s: str) -> str:
    """
    The prefix-aware token rule: ``sk-`` + first 4 + ``*`` per hidden
    character + last 4 of the part after ``sk-``. Strings without the
    prefix, or with 8 or fewer characters after it, come back unchanged.
    """
    if not s or not s.startswith(TOKEN_PREFIX):
        return s
    rest = s[len(TOKEN_PREFIX) :]
    if len(rest) <= 8:
        return s
    return TOKEN_PREFIX + rest[:4] + "*" * (len(rest) - 8) + rest[-4:]


def obfuscate_generic(s: str) -> str:
    """
    The generic rule (provider keys, logs): up to 4 characters -> all
    stars; 5 to 12 -> first 2 then stars; longer -> first 8 + ``...`` +
    last 4.
    """
    n = len(s)
    if n <= 4:
        return "*" * n
    if n <= 12:
        return s[:2] + "*" * (n - 2)
    return s[:8] + "..." + s[-4:]
