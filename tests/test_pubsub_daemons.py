"""
Several real daemons sharing one database and Redis: a revocation, a token
PATCH or a project deactivation made through one instance is enforced by
the others within a second, although they had the token cached. A daemon
without Redis (the Go llm-proxy's situation) keeps serving from its cache.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.testing.daemon import Daemon, start_daemon
from tests.services import REDIS_HOST, REDIS_PORT, require_redis
from tests.support import Reply, http_json, poll

MT = "mt-pubsub-management-secret"
UPSTREAM_KEY = "sk-upstream-0123456789abcdef"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def call(daemon: Daemon, method: str, path: str, body: Any = None, token: str | None = MT) -> Reply:
    return http_json(daemon.url + path, method, body, token=token, timeout=20)


class CrossInstanceInvalidationTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_redis()
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        upstream_dir = os.path.join(self.workdir, "upstream")
        os.makedirs(upstream_dir)
        upstream = start_daemon(upstream_dir, {}, plugin="llmproxy-fake-upstream", health_path=None)
        self.addCleanup(upstream.kill)
        self.env = {
            "MANAGEMENT_TOKEN": MT,
            "DATABASE_PATH": os.path.join(self.workdir, "shared.db"),
            "OPENAI_API_URL": upstream.url,
            "AUDIT_LOG_FILE": os.path.join(self.workdir, "audit.jsonl"),
            "HTTP_CACHE_ENABLED": "false",
            "ACCESS_LOG": "off",
        }

    def start(self, name: str, **env: str) -> Daemon:
        workdir = os.path.join(self.workdir, name)
        os.makedirs(workdir)
        daemon = start_daemon(workdir, dict(self.env, **env))
        self.addCleanup(daemon.kill)
        return daemon

    def proxied(self, daemon: Daemon, token: str) -> tuple[int, Any]:
        status, _, body = call(daemon, "POST", "/v1/chat/completions", CHAT, token=token)
        return status, body

    def refused_within(self, daemon: Daemon, token: str, seconds: float) -> tuple[int, Any, float]:
        """Poll until the proxy refuses C{token}; returns status, body and the delay."""
        last: list[tuple[int, Any]] = []

        def refused() -> bool:
            last[:] = [self.proxied(daemon, token)]
            return last[0][0] != 200

        _, elapsed = poll(refused, seconds)
        (status, body) = last[0]
        return status, body, elapsed

    def test_changes_reach_every_instance_within_a_second(self) -> None:
        shared = {"INVALIDATION_PUBSUB": "true", "REDIS_ADDR": f"{REDIS_HOST}:{REDIS_PORT}"}
        a = self.start("a", **shared)
        b = self.start("b", **shared)
        alone = self.start("alone")  # same database, no Redis

        _, _, project = call(a, "POST", "/manage/projects", {"name": "p", "api_key": UPSTREAM_KEY})
        tokens = []
        for _ in range(3):
            status, _, token = call(
                a, "POST", "/manage/tokens", {"project_id": project["id"], "duration_minutes": 5}
            )
            self.assertEqual(status, 201, token)
            tokens.append(token)
        revoked, patched, other = tokens
        for daemon in (a, b, alone):  # every instance now has the tokens cached
            for token in tokens:
                self.assertEqual(self.proxied(daemon, token["token"])[0], 200)
        for _ in range(50):
            if call(b, "GET", "/ready", token=None)[0] == 200:
                break
            time.sleep(0.1)

        # revocation through A
        self.assertEqual(call(a, "DELETE", f"/manage/tokens/{revoked['id']}")[0], 204)
        status, body, elapsed = self.refused_within(b, revoked["token"], 1.0)
        self.assertEqual((status, body["code"]), (401, "token_inactive"))
        self.assertLess(elapsed, 1.0)
        # the instance without Redis still trusts its cached copy (bounded by the TTL)
        self.assertEqual(self.proxied(alone, revoked["token"])[0], 200)

        # token PATCH through B is enforced on A
        status, _, _ = call(b, "PATCH", f"/manage/tokens/{patched['id']}", {"is_active": False})
        self.assertEqual(status, 200)
        status, body, elapsed = self.refused_within(a, patched["token"], 1.0)
        self.assertEqual((status, body["code"]), (401, "token_inactive"))
        self.assertLess(elapsed, 1.0)

        # project deactivation through A
        status, _, _ = call(a, "PATCH", f"/manage/projects/{project['id']}", {"is_active": False})
        self.assertEqual(status, 200)
        status, body, elapsed = self.refused_within(b, other["token"], 1.0)
        self.assertEqual((status, body["code"]), (403, "project_inactive"))
        self.assertLess(elapsed, 1.0)

        _, _, metrics = call(b, "GET", "/metrics", token=None)
        self.assertIn("request_count", metrics)
        for daemon in (a, b, alone):
            self.assertEqual(daemon.terminate(), 0, daemon.log())
