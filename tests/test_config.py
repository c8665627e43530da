"""Configuration: environment parsing, one-line startup errors, docs in sync."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.config import Config, ConfigError, parse_duration, parse_listen_addr, render_rst

BASE = {"MANAGEMENT_TOKEN": "mt-secret-value"}


class DurationTests(SynchronousTestCase):
    def test_go_syntax(self) -> None:
        self.assertEqual(parse_duration("500ms"), 0.5)
        self.assertEqual(parse_duration("1m30s"), 90.0)
        self.assertEqual(parse_duration("24h"), 86400.0)
        self.assertEqual(parse_duration("2.5s"), 2.5)

    def test_plain_seconds(self) -> None:
        self.assertEqual(parse_duration("45"), 45.0)

    def test_garbage(self) -> None:
        for bad in ("", "abc", "5 s", "10x", "-3s", "1m-2s"):
            self.assertRaises(ValueError, parse_duration, bad)


class ListenAddrTests(SynchronousTestCase):
    def test_go_style(self) -> None:
        self.assertEqual(parse_listen_addr(":8080"), "tcp:8080")
        self.assertEqual(parse_listen_addr("127.0.0.1:9000"), "tcp:9000:interface=127.0.0.1")

    def test_endpoint_strings_kept(self) -> None:
        for s in ("tcp:8080:backlog=10", "unix:/tmp/x.sock", "systemd:domain=INET:index=0"):
            self.assertEqual(parse_listen_addr(s), s)

    def test_bad(self) -> None:
        self.assertRaises(ValueError, parse_listen_addr, "nonsense")


class FromEnvTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        c = Config.from_env(BASE)
        self.assertEqual(c.db_driver, "sqlite")
        self.assertEqual(c.database_path, "./data/llmproxy.db")
        self.assertEqual(c.event_bus, "in-memory")
        self.assertTrue(c.enforce_project_active)
        self.assertEqual(c.drain_timeout, 30.0)

    def test_values_parsed(self) -> None:
        c = Config.from_env(
            dict(
                BASE,
                DRAIN_TIMEOUT="5s",
                HTTP_CACHE_ENABLED="false",
                DB_DRIVER="PostgreSQL",
                DATABASE_URL="postgresql://x@y/z",
                LOG_FORMAT="console",
            )
        )
        self.assertEqual(c.drain_timeout, 5.0)
        self.assertFalse(c.http_cache_enabled)
        self.assertEqual(c.db_driver, "postgres")
        self.assertEqual(c.log_format, "text")

    def test_overrides_win(self) -> None:
        c = Config.from_env(dict(BASE, DRAIN_TIMEOUT="5s"), {"drain_timeout": 7.0})
        self.assertEqual(c.drain_timeout, 7.0)

    def test_missing_management_token(self) -> None:
        e = self.assertRaises(ConfigError, Config.from_env, {})
        self.assertIn("MANAGEMENT_TOKEN", str(e))

    def test_bad_value_names_variable(self) -> None:
        for var, value in [
            ("DRAIN_TIMEOUT", "soon"),
            ("HTTP_CACHE_BACKEND", "memcached"),
            ("LLM_PROXY_EVENT_BUS", "kafka"),
            ("MAX_REQUEST_SIZE", "big"),
            ("AUDIT_ENABLED", "maybe"),
        ]:
            e = self.assertRaises(ConfigError, Config.from_env, dict(BASE, **{var: value}))
            self.assertTrue(str(e).startswith(var + ":"), str(e))

    def test_postgres_needs_url(self) -> None:
        e = self.assertRaises(ConfigError, Config.from_env, dict(BASE, DB_DRIVER="postgres"))
        self.assertIn("DATABASE_URL", str(e))

    def test_repr_hides_secrets(self) -> None:
        c = Config.from_env(
            dict(BASE, ENCRYPTION_KEY="c2VjcmV0", DATABASE_URL="postgresql://u:pw@h/d")
        )
        text = repr(c)
        self.assertNotIn("mt-secret-value", text)
        self.assertNotIn("c2VjcmV0", text)
        self.assertNotIn("pw@h", text)


class DocsTests(SynchronousTestCase):
    def test_configuration_rst_in_sync(self) -> None:
        """docs/configuration.rst is generated from Config; regenerate it when this fails."""
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(here, "docs", "configuration.rst"), encoding="utf-8") as f:
            on_disk = f.read()
        self.assertEqual(
            on_disk.strip(),
            render_rst().strip(),
            "run: python -m llmproxy.config > docs/configuration.rst",
        )


class StartupErrorTests(SynchronousTestCase):
    """A bad value stops twistd with one line and a non-zero status, no traceback."""

    def run_twistd(self, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        full = {k: v for k, v in os.environ.items() if k != "MANAGEMENT_TOKEN"}
        full.update(env)
        return subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from twisted.scripts.twistd import run; sys.argv[0]='twistd'; run()",
                "-n",
                "--pidfile=",
                "llmproxy",
                "--port",
                "tcp:0",
            ],
            env=full,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.mktemp_dir(),
        )

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_missing_management_token(self) -> None:
        r = self.run_twistd({})
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("MANAGEMENT_TOKEN", r.stderr)
        self.assertNotIn("Traceback", r.stderr + r.stdout)

    def test_bad_duration(self) -> None:
        r = self.run_twistd({"MANAGEMENT_TOKEN": "x", "DRAIN_TIMEOUT": "whenever"})
        self.assertNotEqual(r.returncode, 0)
        self.assertEqual(
            r.stderr.strip().splitlines()[-1],
            "llmproxy: configuration error: DRAIN_TIMEOUT: not a duration: 'whenever'"
            " (examples: 500ms, 30s, 1m30s, 24h)",
        )
        self.assertNotIn("Traceback", r.stderr + r.stdout)
