"""End to end: the real daemon wires the response cache and its purge route."""

from __future__ import annotations

import os
import uuid

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.testing.daemon import Daemon, start_daemon
from tests.services import REDIS_HOST, REDIS_PORT, require_redis
from tests.support import poll
from tests.test_manage_daemon import call

MT = "mt-cache-e2e-secret"


class CacheDaemonTests(SynchronousTestCase):
    def start(self, **env: str) -> Daemon:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        full = {
            "MANAGEMENT_TOKEN": MT,
            "DB_DRIVER": "sqlite",
            "DATABASE_PATH": os.path.join(workdir, "llmproxy.db"),
            "AUDIT_LOG_FILE": os.path.join(workdir, "audit.jsonl"),
        }
        full.update(env)
        daemon = start_daemon(workdir, full)
        self.addCleanup(daemon.kill)
        return daemon

    def purge(self, daemon: Daemon, body: object, method: str = "POST") -> tuple[int, object]:
        status, _, payload = call(daemon, method, "/manage/cache/purge", body, token=MT)
        return status, payload

    def test_memory_cache_purge_route(self) -> None:
        daemon = self.start()
        self.assertEqual(
            self.purge(daemon, {"method": "GET", "url": "/v1/models"}),
            (200, {"deleted": False, "count": 0}),
        )
        self.assertEqual(
            self.purge(daemon, {"method": "GET", "url": "/v1/models", "prefix": "zz"}),
            (200, {"deleted": 0, "count": 0}),
        )
        self.assertEqual(
            self.purge(daemon, {"url": "/v1/models"}),
            (400, {"error": "method and url are required"}),
        )
        self.assertEqual(
            self.purge(daemon, None, method="GET"),
            (405, {"error": "method not allowed", "code": "method_not_allowed"}),
        )
        status, _, _ = call(daemon, "POST", "/manage/cache/purge", {}, token="wrong")
        self.assertEqual(status, 401)

    def test_cache_disabled(self) -> None:
        daemon = self.start(HTTP_CACHE_ENABLED="false")
        self.assertEqual(
            self.purge(daemon, {"method": "GET", "url": "/v1/models"}),
            (400, {"error": "caching is disabled"}),
        )

    def test_redis_backend_ready_check(self) -> None:
        require_redis()
        daemon = self.start(
            HTTP_CACHE_BACKEND="redis",
            REDIS_CACHE_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
            REDIS_CACHE_KEY_PREFIX=f"test-cache-e2e:{uuid.uuid4().hex}:",
        )
        # The Redis connection is made after the port opens: ready within seconds.
        ready, _ = poll(lambda: call(daemon, "GET", "/ready", token=None)[0] == 200, 10.0)
        self.assertTrue(ready)
        status, _, payload = call(daemon, "GET", "/ready", token=None)
        self.assertEqual(status, 200)
        self.assertEqual(payload["checks"]["cache_redis"], "ok")
        self.assertEqual(
            self.purge(daemon, {"method": "GET", "url": "/v1/models", "prefix": "/v1/"}),
            (200, {"deleted": 0, "count": 0}),
        )
