"""Provider keys at rest: AES-256-GCM in the Go llm-proxy's ``enc:v1:`` format."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.config import ConfigError
from llmproxy.crypto import DecryptionError, KeyCipher

KEY = base64.b64encode(bytes(range(32))).decode()
OTHER = base64.b64encode(bytes(range(1, 33))).decode()


class KeyCipherTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        c = KeyCipher(KEY)
        sealed = c.encrypt("sk-provider-secret")
        self.assertTrue(sealed.startswith("enc:v1:"))
        self.assertNotIn("secret", sealed)
        self.assertEqual(c.decrypt(sealed), "sk-provider-secret")

    def test_wire_format(self) -> None:
        """nonce(12) || ciphertext || tag(16), standard base64, no associated data."""
        sealed = KeyCipher(KEY).encrypt("abc")
        raw = base64.b64decode(sealed[len("enc:v1:") :])
        self.assertEqual(len(raw), 12 + 3 + 16)
        plain = AESGCM(base64.b64decode(KEY)).decrypt(raw[:12], raw[12:], None)
        self.assertEqual(plain, b"abc")

    def test_fresh_nonce(self) -> None:
        c = KeyCipher(KEY)
        self.assertNotEqual(c.encrypt("same"), c.encrypt("same"))

    def test_empty_and_plaintext_pass_through(self) -> None:
        c = KeyCipher(KEY)
        self.assertEqual(c.encrypt(""), "")
        self.assertEqual(c.decrypt(""), "")
        self.assertEqual(c.decrypt("sk-plain"), "sk-plain")
        sealed = c.encrypt("x")
        self.assertEqual(c.encrypt(sealed), sealed)

    def test_wrong_key(self) -> None:
        sealed = KeyCipher(KEY).encrypt("abc")
        self.assertRaises(DecryptionError, KeyCipher(OTHER).decrypt, sealed)

    def test_bad_keys(self) -> None:
        for bad in ["", "not base64!", base64.b64encode(b"short").decode()]:
            e = self.assertRaises(ConfigError, KeyCipher, bad)
            self.assertIn("ENCRYPTION_KEY", str(e))
