"""The providers file: schema, built-in default, startup errors, provider selection."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from twisted.internet import reactor, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

import llmproxy
from llmproxy.config import Config, ConfigError
from llmproxy.proxy.providers import (
    OPENAI_ENDPOINTS,
    ConnectionLimits,
    load_providers,
    load_providers_config,
    parse_providers,
)
from llmproxy.testing.daemon import start_daemon
from llmproxy.testing.fake_upstream import FakeUpstream

SHIPPED = os.path.join(os.path.dirname(llmproxy.__file__), "data", "api_providers.yaml")

GOOD = """
default_api: openai
apis:
  openai:
    base_url: https://api.openai.com
    allowed_endpoints: [/v1/chat/completions, /v1/models]
    allowed_methods: [get, Post]
    timeouts:
      request: 2m
      response_header: 15s
      idle_connection: 45s
      flush_interval: 10ms
    connection:
      max_idle_conns: 8
      max_idle_conns_per_host: 20
    param_whitelist:
      model: [gpt-4o, "gpt-4o-*"]
    allowed_origins: [https://ok.example]
    required_headers: [Origin]
  local:
    base_url: http://127.0.0.1:8000/ignored/path
    allowed_endpoints: [/v1/]
    allowed_methods: [POST]
"""


class ProvidersFileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def config(self, **env: str) -> Config:
        return Config.from_env(dict({"MANAGEMENT_TOKEN": "m" * 32}, **env))

    def load(self, text: str, **env: str):
        return load_providers(self.config(API_CONFIG_PATH=self.write(text), **env))

    def assertStartupError(self, text: str, *fragments: str, **env: str) -> str:
        path = self.write(text)
        with self.assertRaises(ConfigError) as ctx:
            load_providers(self.config(API_CONFIG_PATH=path, **env))
        message = str(ctx.exception)
        self.assertIn(path, message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_full_provider(self) -> None:
        p = self.load(GOOD)
        self.assertEqual(p.name, "openai")
        self.assertEqual((p.scheme, p.host, p.port), ("https", "api.openai.com", 443))
        self.assertEqual(p.origin, "https://api.openai.com")
        self.assertEqual(p.allowed_endpoints, ("/v1/chat/completions", "/v1/models"))
        self.assertEqual(p.allowed_methods, ("GET", "POST"))
        self.assertEqual(p.timeouts.request, 120.0)
        self.assertEqual(p.timeouts.response_header, 15.0)
        self.assertEqual(p.timeouts.idle_connection, 45.0)
        self.assertAlmostEqual(p.timeouts.flush_interval, 0.01)
        self.assertEqual(p.connection.max_persistent_per_host, 8)
        self.assertEqual(dict(p.param_whitelist), {"model": ("gpt-4o", "gpt-4o-*")})
        self.assertEqual(p.allowed_origins, ("https://ok.example",))
        self.assertEqual(p.required_headers, ("origin",))
        self.assertEqual(p.idle_timeout(self.config()), 120.0)

    def test_selection_by_env_then_default_api(self) -> None:
        p = self.load(GOOD, DEFAULT_API_PROVIDER="local")
        self.assertEqual(p.name, "local")
        self.assertEqual((p.scheme, p.host, p.port), ("http", "127.0.0.1", 8000))
        self.assertEqual(p.origin, "http://127.0.0.1:8000")
        # defaults for what the file leaves out
        self.assertIsNone(p.timeouts.request)
        self.assertEqual(p.idle_timeout(self.config(UPSTREAM_IDLE_TIMEOUT="7s")), 7.0)
        self.assertEqual(p.timeouts.response_header, 30.0)
        self.assertEqual(p.param_whitelist, {})
        # an unknown DEFAULT_API_PROVIDER falls back to default_api, as in the Go project
        self.assertEqual(self.load(GOOD, DEFAULT_API_PROVIDER="nope").name, "openai")

    def test_unknown_provider_without_default_api(self) -> None:
        text = GOOD.replace("default_api: openai\n", "")
        message = self.assertStartupError(text, "nope", DEFAULT_API_PROVIDER="nope")
        self.assertIn("DEFAULT_API_PROVIDER", message)

    def test_warnings_for_unknown_keys_and_paths(self) -> None:
        providers = load_providers_config(
            self.config(API_CONFIG_PATH=self.write(GOOD + "    timeout: 5s\n"))
        )
        notes = "\n".join(providers.warnings)
        self.assertIn("apis.local: unknown key 'timeout'", notes)
        self.assertIn("'/ignored/path' is ignored", notes)

    def test_builtin_only_when_file_missing(self) -> None:
        missing = os.path.join(self.mktemp(), "nothere.yaml")
        p = load_providers(
            self.config(
                API_CONFIG_PATH=missing,
                OPENAI_API_URL="http://127.0.0.1:9999",
                REQUEST_TIMEOUT="12s",
            )
        )
        self.assertEqual(p.name, "openai")
        self.assertEqual(p.origin, "http://127.0.0.1:9999")
        self.assertEqual(p.allowed_endpoints, OPENAI_ENDPOINTS)
        self.assertIn("/v1/fine-tunes", p.allowed_endpoints)
        self.assertEqual(p.allowed_methods, ("GET", "POST", "DELETE"))
        self.assertEqual(p.timeouts.response_header, 12.0)
        self.assertEqual(p.timeouts.idle_connection, 90.0)
        self.assertEqual(p.connection, ConnectionLimits(100, 20))
        self.assertEqual((p.param_whitelist, p.allowed_origins), ({}, ()))

    def test_builtin_with_other_provider_name_is_an_error(self) -> None:
        missing = os.path.join(self.mktemp(), "nothere.yaml")
        with self.assertRaises(ConfigError) as ctx:
            load_providers(self.config(API_CONFIG_PATH=missing, DEFAULT_API_PROVIDER="anthropic"))
        self.assertIn("does not exist", str(ctx.exception))

    def test_bad_openai_url(self) -> None:
        missing = os.path.join(self.mktemp(), "nothere.yaml")
        with self.assertRaises(ConfigError) as ctx:
            load_providers(self.config(API_CONFIG_PATH=missing, OPENAI_API_URL="api.openai.com"))
        self.assertIn("OPENAI_API_URL", str(ctx.exception))

    def test_shipped_example_is_valid(self) -> None:
        with open(SHIPPED, encoding="utf-8") as f:
            providers = parse_providers(f.read(), SHIPPED)
        self.assertEqual(providers.default_api, "openai")
        self.assertEqual(set(providers.apis), {"openai", "anthropic"})
        self.assertEqual(providers.warnings, ())
        self.assertEqual(providers.apis["anthropic"].allowed_methods, ("POST",))
        self.assertIn("gpt-4o-*", providers.apis["openai"].param_whitelist["model"])

    # -- startup errors: an existing but broken file never falls back

    def test_invalid_yaml(self) -> None:
        self.assertStartupError("apis: [unclosed", "invalid YAML")

    def test_empty_file(self) -> None:
        self.assertStartupError("", "empty")

    def test_not_a_mapping(self) -> None:
        self.assertStartupError("- a\n- b\n", "must be a mapping")

    def test_no_apis(self) -> None:
        self.assertStartupError("default_api: openai\n", "apis: missing")
        self.assertStartupError("apis: {}\n", "apis: no providers defined")

    def test_unknown_default_api(self) -> None:
        text = GOOD.replace("default_api: openai", "default_api: azure")
        self.assertStartupError(text, "default_api", "'azure'")

    def test_missing_required_fields(self) -> None:
        base = "apis:\n  p:\n    base_url: https://x.example\n"
        base += "    allowed_endpoints: [/v1/x]\n    allowed_methods: [POST]\n"
        self.assertEqual(self.load(base, DEFAULT_API_PROVIDER="p").name, "p")
        for key, fragment in [
            ("base_url", "apis.p.base_url: missing"),
            ("allowed_endpoints", "apis.p.allowed_endpoints: missing"),
            ("allowed_methods", "apis.p.allowed_methods: missing"),
        ]:
            text = "\n".join(line for line in base.splitlines() if key not in line)
            self.assertStartupError(text, fragment, DEFAULT_API_PROVIDER="p")
        self.assertStartupError(
            base.replace("[/v1/x]", "[]"), "must list at least one", DEFAULT_API_PROVIDER="p"
        )

    def test_bad_values(self) -> None:
        cases = [
            ("base_url: https://api.openai.com", "base_url: ftp://x", "http:// or https://"),
            ("base_url: https://api.openai.com", "base_url: https://:99", "no host"),
            ("[/v1/chat/completions, /v1/models]", "[v1/models]", "must start with '/'"),
            ("[get, Post]", "[get, 'PO ST']", "not an HTTP method"),
            ("request: 2m", "request: soon", "apis.openai.timeouts.request: not a duration"),
            ("flush_interval: 10ms", "flush_interval: -5", "negative duration"),
            ("max_idle_conns: 8", "max_idle_conns: many", "apis.openai.connection.max_idle_conns"),
            ('[gpt-4o, "gpt-4o-*"]', '[gpt-4o, "gpt-[4"]', "param_whitelist.model[1]: bad glob"),
            ('[gpt-4o, "gpt-4o-*"]', '["x\\\\"]', "bad glob"),
            ("[https://ok.example]", "['*']", "leave allowed_origins empty"),
            ("timeouts:", "timeouts: 5\n    unused:", "timeouts: must be a mapping"),
        ]
        for old, new, fragment in cases:
            self.assertIn(old, GOOD)
            self.assertStartupError(GOOD.replace(old, new, 1), fragment)

    def test_unreadable_file(self) -> None:
        path = self.write("apis: {}\n")
        os.chmod(path, 0)
        if os.access(path, os.R_OK):  # running as root: make it undecodable instead
            with open(path, "wb") as f:
                f.write(b"\xff\xfe not utf-8")
        with self.assertRaises(ConfigError) as ctx:
            load_providers(self.config(API_CONFIG_PATH=path))
        self.assertIn(path, str(ctx.exception))
        self.assertIn("cannot read", str(ctx.exception))


class ConnectionLimitTests(SynchronousTestCase):
    def test_max_persistent_per_host(self) -> None:
        self.assertEqual(ConnectionLimits(100, 20).max_persistent_per_host, 20)
        self.assertEqual(ConnectionLimits(5, 20).max_persistent_per_host, 5)
        self.assertEqual(ConnectionLimits(0, 20).max_persistent_per_host, 20)
        self.assertEqual(ConnectionLimits(100, 0).max_persistent_per_host, 2)


DAEMON_PROVIDERS = """
default_api: openai
apis:
  openai:
    base_url: {upstream}
    allowed_endpoints: [/v1/chat/completions, /v1/models]
    allowed_methods: [GET, POST]
    timeouts:
      request: 30s
      response_header: 10s
    param_whitelist:
      model: [gpt-4o, "gpt-4o-*"]
    allowed_origins: [https://ok.example]
"""


def http_call(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json; charset=utf-8")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


class ProvidersDaemonTests(TestCase):
    """The real daemon serves the provider and policy of its providers file."""

    timeout = 120

    async def test_daemon_applies_the_providers_file(self) -> None:
        from tests.test_e2e_proxy import UPSTREAM_KEY, seed_database

        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor)
        self.addCleanup(listening.stop)
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        path = os.path.join(workdir, "providers.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(DAEMON_PROVIDERS.format(upstream=listening.url))
        db = os.path.join(workdir, "llmproxy.db")
        _, (token,) = await seed_database(db, [{}])
        env = {
            "MANAGEMENT_TOKEN": "mt",
            "DATABASE_PATH": db,
            "API_CONFIG_PATH": path,
            "OPENAI_API_URL": "http://127.0.0.1:9",  # the file wins
            "LOG_FORMAT": "text",
            "ACCESS_LOG": "off",
            "AUDIT_LOG_FILE": os.path.join(workdir, "audit.log"),
            "HTTP_CACHE_ENABLED": "false",
        }
        daemon = await threads.deferToThread(start_daemon, workdir, env)
        self.addCleanup(lambda: threads.deferToThread(daemon.terminate))
        url = daemon.url
        auth = {"Authorization": f"Bearer {token}"}

        def calls() -> dict[str, tuple[int, Any, Any]]:
            chat = "/v1/chat/completions"
            return {
                "unknown": http_call(url + "/v1/unknown", "POST", {}),
                "delete": http_call(url + "/v1/models", "DELETE"),
                "bad_model": http_call(url + chat, "POST", {"model": "claude-3"}),
                "bad_origin": http_call(
                    url + "/v1/models", headers={"Origin": "https://bad.example"}
                ),
                "preflight": http_call(
                    url + "/v1/anything",
                    "OPTIONS",
                    headers={
                        "Origin": "https://x.example",
                        "Access-Control-Request-Headers": "Authorization, X-Foo",
                    },
                ),
                "no_token": http_call(url + chat, "POST", {"model": "gpt-4o"}),
                "ok": http_call(
                    url + chat,
                    "POST",
                    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                    dict(auth, Origin="https://ok.example"),
                ),
            }

        r = await threads.deferToThread(calls)
        self.assertEqual(r["unknown"][0], 404)
        self.assertEqual(json.loads(r["unknown"][2])["code"], "endpoint_not_found")
        self.assertEqual(r["delete"][0], 405)
        self.assertTrue(r["delete"][1]["X-Request-ID"])
        self.assertEqual(r["bad_model"][0], 400)
        self.assertTrue(
            json.loads(r["bad_model"][2])["error"].startswith(
                "Parameter 'model' value 'claude-3' is not allowed"
            )
        )
        self.assertEqual(r["bad_origin"][0], 403)
        self.assertEqual(r["bad_origin"][1]["Access-Control-Allow-Origin"], "https://bad.example")
        self.assertIn("Origin", r["bad_origin"][1]["Vary"])
        self.assertEqual(r["preflight"][0], 204)
        self.assertEqual(r["preflight"][1]["Access-Control-Allow-Headers"], "Authorization, X-Foo")
        self.assertEqual(r["preflight"][1]["Access-Control-Max-Age"], "86400")
        self.assertEqual(r["no_token"][0], 401)
        status, response_headers, body = r["ok"]
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["model"], "gpt-4o-mini")
        self.assertEqual(response_headers["Access-Control-Allow-Origin"], "https://ok.example")
        # only the accepted request reached the provider, with the project key
        self.assertEqual(len(fake.requests), 1)
        self.assertEqual(fake.last_request.header("authorization"), f"Bearer {UPSTREAM_KEY}")

    async def test_broken_file_stops_the_daemon(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        path = os.path.join(workdir, "providers.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write("apis:\n  openai:\n    base_url: https://api.openai.com\n")
        env = {
            "MANAGEMENT_TOKEN": "mt",
            "DATABASE_PATH": os.path.join(workdir, "llmproxy.db"),
            "API_CONFIG_PATH": path,
            "LOG_FORMAT": "text",
        }
        with self.assertRaises(RuntimeError) as ctx:
            await threads.deferToThread(start_daemon, workdir, env)
        message = str(ctx.exception)
        self.assertIn("configuration error", message)
        self.assertIn(path, message)
        self.assertIn("apis.openai.allowed_endpoints: missing", message)
