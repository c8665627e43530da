"""Token strings: format, hashing and the obfuscation rules of the Go llm-proxy."""

from __future__ import annotations

import base64
import hashlib

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.tokens.format import (
    generate_token,
    hash_token,
    is_valid_format,
    obfuscate_generic,
    obfuscate_token,
)


class GenerateTests(SynchronousTestCase):
    def test_shape(self) -> None:
        token = generate_token()
        self.assertEqual(len(token), 25)
        self.assertTrue(token.startswith("sk-"))
        self.assertRegex(token, r"^sk-[A-Za-z0-9_-]{22}$")
        self.assertTrue(is_valid_format(token))

    def test_uuid7(self) -> None:
        raw = base64.urlsafe_b64decode(generate_token()[3:] + "==")
        self.assertEqual(len(raw), 16)
        self.assertEqual(raw[6] >> 4, 7)
        self.assertEqual(raw[8] >> 6, 0b10)

    def test_unique(self) -> None:
        self.assertEqual(len({generate_token() for _ in range(1000)}), 1000)


class ValidFormatTests(SynchronousTestCase):
    def test_rejects(self) -> None:
        for bad in [
            "",
            "sk-",
            "sk-short",
            "xx-AaIed6e8eRqoG33fo4QX3w",
            "sk-AaIed6e8eRqoG33fo4QX3w1",
            "sk-AaIed6e8eRqoG33fo4QX+w",
            "sk-AaIed6e8eRqoG33fo4QX=w",
        ]:
            self.assertFalse(is_valid_format(bad), bad)

    def test_lenient_last_bits(self) -> None:
        # The last character carries 2 unused bits; any value decodes.
        self.assertTrue(is_valid_format("sk-AaIed6e8eRqoG33fo4QX3x"))


class HashTests(SynchronousTestCase):
    def test_sha256_hex(self) -> None:
        token = "sk-AaIed6e8eRqoG33fo4QX3w"
        self.assertEqual(hash_token(token), hashlib.sha256(token.encode()).hexdigest())
        self.assertRegex(hash_token(token), "^[0-9a-f]{64}$")


class ObfuscateTests(SynchronousTestCase):
    def test_token_rule(self) -> None:
        self.assertEqual(obfuscate_token("sk-1234567890"), "sk-1234**7890")
        self.assertEqual(obfuscate_token("sk-AaIed6e8eRqoG33fo4QX3w"), "sk-AaIe**************QX3w")
        self.assertEqual(obfuscate_token(""), "")
        self.assertEqual(obfuscate_token("abcdefghijklmnop"), "abcdefghijklmnop")
        self.assertEqual(obfuscate_token("sk-12345678"), "sk-12345678")

    def test_generic_rule(self) -> None:
        self.assertEqual(obfuscate_generic(""), "")
        self.assertEqual(obfuscate_generic("abcd"), "****")
        self.assertEqual(obfuscate_generic("abcde"), "ab***")
        self.assertEqual(obfuscate_generic("abcdefghijkl"), "ab**********")
        self.assertEqual(obfuscate_generic("abcdefghijklmnop"), "abcdefgh...mnop")
        self.assertEqual(
            obfuscate_generic("sk-proj-1234567890abcdefghijklmnopqrstuvwxyz"), "sk-proj-...wxyz"
        )
