"""
Provider keys at rest: AES-256-GCM with the Go llm-proxy's format
(``enc:v1:`` + standard base64 of nonce, ciphertext and tag), so a database
written by either project can be read by the other with the same key.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from llmproxy.config import ConfigError

ENCRYPTED_PREFIX = "enc:v1:"
_NONCE_SIZE = 12


class DecryptionError(Exception):
    """A stored value could not be decrypted with the configured key."""


def is_encrypted(value: str) -> bool:
    return value.startswith(ENCRYPTED_PREFIX)


class KeyCipher:
    """Encrypts and decrypts provider keys with one 32-byte key."""

    def __init__(self, key_b64: str) -> None:
        try:
            key = base64.b64decode(key_b64.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError("ENCRYPTION_KEY: not valid base64 (expected base64 of 32 bytes)")
        if len(key) != 32:
            raise ConfigError(
                f"ENCRYPTION_KEY: must decode to 32 bytes, got {len(key)} "
                "(generate one with: openssl rand -base64 32)"
            )
        self._aead = AESGCM(key)

    def encrypt(self, plaintext: str) -> str:
        """``enc:v1:...``; the empty string and already-encrypted values stay as they are."""
        if plaintext == "" or is_encrypted(plaintext):
            return plaintext
        nonce = os.urandom(_NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), None)
        return ENCRYPTED_PREFIX + base64.b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, value: str) -> str:
        """
        The plaintext; values without the ``enc:v1:`` prefix (rows written
        before encryption was switched on) pass through unchanged.

        @raise DecryptionError: the value was encrypted with another key or is damaged.
        """
        if not is_encrypted(value):
            return value
        try:
            raw = base64.b64decode(value[len(ENCRYPTED_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise DecryptionError("encrypted value is not valid base64")
        if len(raw) < _NONCE_SIZE + 16:
            raise DecryptionError("encrypted value is too short")
        try:
            plain = self._aead.decrypt(raw[:_NONCE_SIZE], raw[_NONCE_SIZE:], None)
        except InvalidTag:
            raise DecryptionError("encrypted value does not match ENCRYPTION_KEY")
        return plain.decode("utf-8")
