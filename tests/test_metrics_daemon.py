"""The real daemon (twistd subprocess) serves metrics and shares state over Redis."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.testing.daemon import Daemon, start_daemon
from tests.services import REDIS_HOST, REDIS_PORT, require_redis

BASE = {"MANAGEMENT_TOKEN": "mt-secret-value"}


def get(daemon: Daemon, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(daemon.url + path)
    if token:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class DaemonMetricsTests(SynchronousTestCase):
    def start(self, **env: str) -> Daemon:
        workdir = self.mktemp()
        os.makedirs(workdir)
        daemon = start_daemon(workdir, dict(BASE, **env))
        self.addCleanup(daemon.kill)
        return daemon

    def test_default_metrics(self) -> None:
        daemon = self.start()
        status, headers, body = get(daemon, "/metrics")
        self.assertEqual(status, 200)
        data: dict[str, Any] = json.loads(body)
        for field in ("uptime_seconds", "request_count", "error_count", "cache_hits"):
            self.assertIn(field, data)
        status, headers, body = get(daemon, "/metrics/prometheus")
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "text/plain; version=0.0.4; charset=utf-8")
        self.assertIn(b"# TYPE llm_proxy_requests_total counter", body)
        self.assertIn(b"process_resident_memory_bytes", body)
        status, _, body = get(daemon, "/ready")
        self.assertEqual(status, 200, body)
        self.assertEqual(daemon.terminate(), 0)

    def test_redis_configured(self) -> None:
        require_redis()
        daemon = self.start(
            METRICS_PATH="/internal/metrics",
            METRICS_TOKEN="scrape-me",
            DISTRIBUTED_RATE_LIMIT_ENABLED="true",
            REDIS_ADDR=f"{REDIS_HOST}:{REDIS_PORT}",
        )
        self.assertEqual(get(daemon, "/metrics")[0], 404)
        self.assertEqual(get(daemon, "/internal/metrics")[0], 401)
        status, _, body = get(daemon, "/internal/metrics/prometheus", token="scrape-me")
        self.assertEqual(status, 200)
        self.assertIn(b"llm_proxy_uptime_seconds", body)
        for _ in range(50):  # the subscriber connects right after start
            status, _, body = get(daemon, "/ready")
            if status == 200:
                break
            time.sleep(0.1)
        self.assertEqual(status, 200, body)
        checks = json.loads(body)["checks"]
        self.assertEqual(checks["ratelimit_redis"], "ok")
        self.assertEqual(checks["invalidation_pubsub"], "ok")
        self.assertEqual(daemon.terminate(), 0)
        self.assertNotIn("Traceback", daemon.log())

    def test_redis_unreachable(self) -> None:
        from llmproxy.testing.daemon import free_port

        daemon = self.start(
            DISTRIBUTED_RATE_LIMIT_ENABLED="true", REDIS_ADDR=f"127.0.0.1:{free_port()}"
        )
        status, _, body = get(daemon, "/health")
        self.assertEqual(status, 200)
        status, _, body = get(daemon, "/ready")
        self.assertEqual(status, 503)
        checks = json.loads(body)["checks"]
        self.assertNotEqual(checks["ratelimit_redis"], "ok")
        self.assertNotEqual(checks["invalidation_pubsub"], "ok")
        self.assertEqual(get(daemon, "/metrics")[0], 200)
        self.assertEqual(daemon.terminate(), 0)
