"""
Two real C{twistd llmproxy} instances sharing one PostgreSQL database and one
Redis, in front of one fake upstream: what a deployment behind a load
balancer relies on.

- C{max_requests} quotas are exact across instances (the admission decision
  is one conditional UPDATE in the database);
- the Redis response cache and the Redis rate-limit windows are shared;
- revocations, token PATCHes and project deactivations made through one
  instance are enforced by the other within a second;
- when Redis stops (or hangs) mid-traffic, proxying goes on (cache misses,
  rate limits counted in process, quotas stay exact, no request waits for
  Redis), C{/ready} names the Redis checks, and once the same Redis is back
  everything shared works again by itself;
- when the database refuses connections, cached tokens are served, what
  cannot be checked or counted is refused, and everything recovers.

Each test gets a fresh database and its own redis-server on a free port, so
stopping Redis cannot disturb tests running beside it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from llmproxy.store.sql import postgres_url
from llmproxy.testing.daemon import Daemon, start_daemon
from llmproxy.testing.fake_upstream import FakeUpstream
from tests.redisserver import RedisServer
from tests.services import POSTGRES_DSN
from tests.support import Reply, http_json, poll
from tests.test_store_support import new_postgres_database

MT = "mt-multi-instance-secret"
UPSTREAM_KEY = "sk-upstream-multi-0123456789"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
#: The client's opt-in that makes a POST cacheable (shared cache, 60 s).
OPT_IN = {"Cache-Control": "public, max-age=60"}
REDIS_CHECKS = ("cache_redis", "ratelimit_redis", "invalidation_pubsub", "redis-event-bus")

#: What each instance logs about a Redis outage and its end.
RATE_LIMITS_BACK = "Redis is back: rate limits are shared again"
LOG_LINES = (
    "cache Redis unavailable",
    "Redis is back: the response cache is in use again",
    "rate-limit Redis unavailable",
    RATE_LIMITS_BACK,
    "invalidation subscriber lost its Redis connection",
    "invalidation subscriber reconnected to Redis",
    "event bus Redis unavailable",
    "event bus Redis is back",
)


def http(
    url: str,
    method: str = "GET",
    body: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One blocking request: status, lower-cased headers, decoded JSON (or text)."""
    status, raw_headers, decoded = http_json(url, method, body, token=token, headers=headers)
    return status, {k.lower(): v for k, v in raw_headers.items()}, decoded


class TwoInstances(TestCase):
    """
    Instances C{a} and C{b}: same database, same Redis, same environment,
    different ports. A project and its tokens are made through the
    management API of C{a}.
    """

    timeout = 120
    #: Added to the daemons' environment by a subclass.
    extra_env: dict[str, str] = {}

    async def setUp(self) -> None:  # type: ignore[override]
        database_url = new_postgres_database(self)
        self.database = sa.engine.make_url(database_url).database
        self.redis = RedisServer()
        self.addCleanup(self.redis.cleanup)
        self.redis.start()

        self.fake = FakeUpstream(clock=reactor)
        listening = self.fake.listen(reactor)
        self.addCleanup(listening.stop)

        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        providers = os.path.join(self.workdir, "api_providers.yaml")
        with open(providers, "w") as f:
            f.write(
                "default_api: fake\n"
                "apis:\n"
                "  fake:\n"
                f"    base_url: {listening.url}\n"
                "    allowed_endpoints: [/v1/chat/completions, /v1/models]\n"
                "    allowed_methods: [GET, POST]\n"
            )
        self.env = {
            "MANAGEMENT_TOKEN": MT,
            "DB_DRIVER": "postgres",
            "DATABASE_URL": database_url,
            "REDIS_ADDR": f"127.0.0.1:{self.redis.port}",
            "HTTP_CACHE_BACKEND": "redis",
            "DISTRIBUTED_RATE_LIMIT_ENABLED": "true",
            # generous: the tests count the shared window, they never hit it
            "TOKEN_RATE_LIMIT": "100000",
            "DISTRIBUTED_RATE_LIMIT_WINDOW": "1h",
            "LLM_PROXY_EVENT_BUS": "redis-streams",
            "API_CONFIG_PATH": providers,
            "LOG_FORMAT": "text",
            "ACCESS_LOG": "off",
            "USAGE_FLUSH_INTERVAL": "0.2",
            **self.extra_env,
        }
        a, b = await defer.gatherResults(
            [threads.deferToThread(self._start, name) for name in ("a", "b")],
            consumeErrors=True,
        )
        self.a: Daemon = a
        self.b: Daemon = b
        self.project = await self.blocking(
            self.manage,
            self.a,
            "POST",
            "/manage/projects",
            {"name": "shared", "api_key": UPSTREAM_KEY},
            201,
        )

    def _start(self, name: str) -> Daemon:
        workdir = os.path.join(self.workdir, name)
        os.makedirs(workdir)
        env = dict(self.env, AUDIT_LOG_FILE=os.path.join(workdir, "audit.jsonl"))
        daemon = start_daemon(workdir, env, timeout=30)
        self.addCleanup(self._stop, daemon)
        return daemon

    async def _stop(self, daemon: Daemon) -> None:
        status = await threads.deferToThread(daemon.terminate)
        self.assertEqual(status, 0, daemon.log())

    def blocking(self, f: Callable[..., Any], *args: Any) -> Any:
        """Blocking work (HTTP calls, polling) off the reactor thread."""
        return threads.deferToThread(f, *args)

    # -- blocking helpers (called through blocking) -----------------------------------

    def manage(
        self, daemon: Daemon, method: str, path: str, body: Any = None, expect: int = 200
    ) -> Any:
        status, _, payload = http(daemon.url + path, method, body, token=MT)
        self.assertEqual(status, expect, payload)
        return payload

    def new_token(self, daemon: Daemon, **fields: Any) -> dict[str, Any]:
        body = {"project_id": self.project["id"], "duration_minutes": 30, **fields}
        return self.manage(daemon, "POST", "/manage/tokens", body, 201)  # type: ignore[no-any-return]

    def chat(self, daemon: Daemon, token: str, headers: dict[str, str] | None = None) -> Reply:
        return http(daemon.url + "/v1/chat/completions", "POST", CHAT, token, headers)

    def ready(self, daemon: Daemon) -> Reply:
        return http(daemon.url + "/ready")

    def refused_within(self, daemon: Daemon, token: str, seconds: float) -> tuple[Reply, float]:
        """Poll C{daemon} with C{token} until it is refused; the refusal and its delay."""
        last: list[Reply] = []

        def refused() -> bool:
            last[:] = [self.chat(daemon, token)]
            return last[0][0] != 200

        _, elapsed = poll(refused, seconds)
        return last[0], elapsed

    def assert_refused_within_a_second(
        self, daemon: Daemon, token: str, status: int, code: str
    ) -> None:
        (got, _, body), elapsed = self.refused_within(daemon, token, 1.0)
        self.assertEqual((got, body and body.get("code")), (status, code), body)
        self.assertLess(elapsed, 1.0)

    def burst(self, calls: list[Callable[[], Reply]]) -> list[Reply]:
        """Run every call at once (all threads released together)."""
        start = threading.Barrier(len(calls))

        def synced(call: Callable[[], Reply]) -> Reply:
            start.wait()
            return call()

        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(synced, calls))

    def ready_states(self) -> list[Reply]:
        return [self.ready(daemon) for daemon in (self.a, self.b)]

    def both_ready(self, status: int) -> Callable[[], list[Reply] | None]:
        def check() -> list[Reply] | None:
            replies = self.ready_states()
            return replies if all(r[0] == status for r in replies) else None

        return check

    def cache_hit_across(
        self, token: str, marker: str, patience: float = 3.0
    ) -> tuple[Reply, Reply | None]:
        """
        Store an answer through a (retrying for C{patience} seconds: right
        after an outage the cache asks Redis again only once a second), then
        poll b for the hit (3 s). The last reply through a, and b's hit.
        """
        headers = dict(OPT_IN, **{"X-Marker": marker})
        body = dict(CHAT, user=marker)
        last: list[Reply] = []

        def stored() -> bool:
            last[:] = [http(self.a.url + "/v1/chat/completions", "POST", body, token, headers)]
            return last[0][1].get("x-proxy-cache") == "stored"

        if not poll(stored, patience, interval=0.2)[0]:
            return last[0], None

        def hit() -> Reply | None:
            reply = http(self.b.url + "/v1/chat/completions", "POST", body, token, headers)
            return reply if reply[1].get("x-proxy-cache") == "hit" else None

        found, _ = poll(hit, 3.0, interval=0.1)
        return last[0], found

    def window_shared(self, token: str) -> bool:
        """One request through a, one through b: did b count a's request?"""
        first = http(self.a.url + "/v1/models", token=token)[1]
        second = http(self.b.url + "/v1/models", token=token)[1]
        return int(second["ratelimit-remaining"]) == int(first["ratelimit-remaining"]) - 1

    def metric(self, daemon: Daemon, line_prefix: str) -> float:
        """The value of the first Prometheus sample starting with C{line_prefix} (0 if none)."""
        _, _, text = http(daemon.url + "/metrics/prometheus")
        for line in str(text).splitlines():
            if line.startswith(line_prefix):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


class QuotaTests(TwoInstances):
    async def test_max_requests_exact_across_instances(self) -> None:
        """100 concurrent requests, half through each instance, on max_requests 20."""

        def scenario() -> tuple[list[Reply], dict[str, Any]]:
            token = self.new_token(self.a, max_requests=20)
            calls = [
                (lambda d=daemon: self.chat(d, token["token"])) for daemon in [self.a, self.b] * 50
            ]
            replies = self.burst(calls)
            stored = self.manage(self.b, "GET", f"/manage/tokens/{token['id']}")
            return replies, stored

        before = len(self.fake.requests)
        replies, stored = await self.blocking(scenario)
        statuses = [status for status, _, _ in replies]
        self.assertEqual(statuses.count(200), 20, statuses)
        self.assertEqual(statuses.count(429), 80, statuses)
        for status, _, body in replies:
            if status == 429:
                self.assertEqual(
                    body, {"error": "Rate limit exceeded", "code": "rate_limit_exceeded"}
                )
        self.assertEqual(len(self.fake.requests) - before, 20)
        self.assertEqual(stored["request_count"], 20)
        self.assertEqual(stored["max_requests"], 20)


class SharedStateTests(TwoInstances):
    async def test_cache_entry_stored_through_one_is_a_hit_through_the_other(self) -> None:
        def scenario() -> dict[str, Any]:
            out: dict[str, Any] = {}
            first, second = self.new_token(self.a), self.new_token(self.b)
            out["stored"] = self.chat(self.a, first["token"], OPT_IN)

            def hit_on_b() -> Reply | None:
                reply = self.chat(self.b, second["token"], OPT_IN)
                return reply if reply[1].get("x-proxy-cache") == "hit" else None

            out["hit"], _ = poll(hit_on_b, 3.0)
            # entries belong to their project (HTTP_CACHE_SHARED=false)
            other = self.manage(
                self.b, "POST", "/manage/projects", {"name": "other", "api_key": UPSTREAM_KEY}, 201
            )
            stranger = self.manage(
                self.b,
                "POST",
                "/manage/tokens",
                {"project_id": other["id"], "duration_minutes": 30},
                201,
            )
            out["other_project"] = self.chat(self.b, stranger["token"], OPT_IN)
            return out

        before = len(self.fake.requests)
        out = await self.blocking(scenario)
        status, headers, body = out["stored"]
        self.assertEqual(status, 200, body)
        self.assertEqual(headers["x-proxy-cache"], "stored")
        self.assertIsNotNone(out["hit"], "instance b never answered from the shared cache")
        status, hit_headers, hit_body = out["hit"]
        self.assertEqual(status, 200)
        self.assertEqual(hit_headers["cache-status"], "llm-proxy; hit")
        self.assertEqual(hit_headers["x-proxy-cache-key"], headers["x-proxy-cache-key"])
        self.assertEqual(hit_body, body)
        status, headers, _ = out["other_project"]
        self.assertEqual(status, 200)
        self.assertNotEqual(headers.get("x-proxy-cache"), "hit")
        # the first request and the other project's request went upstream
        self.assertEqual(len(self.fake.requests) - before, 2)

    async def test_rate_limit_window_is_shared(self) -> None:
        def scenario() -> list[Reply]:
            token = self.new_token(self.a)["token"]
            return [
                http(daemon.url + "/v1/models", token=token)
                for daemon in (self.a, self.b, self.a, self.b)
            ]

        replies = await self.blocking(scenario)
        self.assertEqual([status for status, _, _ in replies], [200] * 4)
        remaining = [int(headers["ratelimit-remaining"]) for _, headers, _ in replies]
        resets = [int(headers["ratelimit-reset"]) for _, headers, _ in replies]
        if resets != sorted(resets, reverse=True):
            self.skipTest("the hourly window restarted between the requests")
        # one counter for both instances: every request, wherever it went, counts
        self.assertEqual(remaining, [remaining[0] - i for i in range(4)])
        self.assertEqual(int(replies[0][1]["ratelimit-limit"]), 100000)


class RedisRestartTests(TwoInstances):
    """Redis stops while traffic flows through both instances, then returns."""

    async def test_proxying_survives_a_redis_restart(self) -> None:
        def scenario() -> dict[str, Any]:
            out: dict[str, Any] = {}
            traffic_token = self.new_token(self.a)["token"]
            before, during, patched = (self.new_token(self.a) for _ in range(3))
            counted = self.new_token(self.a, max_requests=1000)
            cache_token = self.new_token(self.a)["token"]
            for daemon in (self.a, self.b):  # both instances have them cached
                for token in (before, during, patched, counted):
                    self.assertEqual(self.chat(daemon, token["token"])[0], 200)
            out["ready_before"], _ = poll(self.both_ready(200), 10.0, interval=0.1)
            out["hit_before"] = self.cache_hit_across(cache_token, "before")

            # revocation through a, enforced by b
            self.manage(self.a, "DELETE", f"/manage/tokens/{before['id']}", expect=204)
            self.assert_refused_within_a_second(self.b, before["token"], 401, "token_inactive")

            # traffic through both instances for the rest of the test
            stop = threading.Event()
            traffic: list[int] = []

            def flow() -> None:
                daemons = [self.a, self.b]
                i = 0
                while not stop.is_set():
                    traffic.append(self.chat(daemons[i % 2], traffic_token, OPT_IN)[0])
                    i += 1
                    time.sleep(0.01)

            flows = [threading.Thread(target=flow) for _ in range(2)]
            for t in flows:
                t.start()
            try:
                time.sleep(0.3)
                self.redis.stop()
                stopped_at = time.monotonic()
                out["ready_down"], out["down_after"] = poll(
                    self.both_ready(503), 10.0, interval=0.1
                )
                # the cache is missed (nothing stored, nothing served from Redis)
                out["cache_down"] = self.cache_hit_across(cache_token, "down", patience=0)
                # quotas live in the database: still exact
                limited = self.new_token(self.b, max_requests=10)["token"]
                out["quota_down"] = self.burst(
                    [(lambda d=d: self.chat(d, limited)) for d in [self.a, self.b] * 15]
                )
                # a revocation made now is enforced at once by the instance that made it
                self.manage(self.a, "DELETE", f"/manage/tokens/{during['id']}", expect=204)
                out["during_on_a"] = self.chat(self.a, during["token"])
                # b has not heard of it yet, but a token with a quota is decided
                # by the database on every request
                self.manage(self.a, "DELETE", f"/manage/tokens/{counted['id']}", expect=204)
                out["counted_on_b"] = self.chat(self.b, counted["token"])
                out["traffic_down"] = len(traffic)
                time.sleep(max(0.0, 2.0 - (time.monotonic() - stopped_at)))

                self.redis.start()  # same port, empty
                started_at = time.monotonic()
                out["ready_again"], out["recovery"] = poll(self.both_ready(200), 20.0, interval=0.1)
                # b lost its subscription meanwhile and dropped its cached tokens
                out["during_on_b"], out["during_delay"] = self.refused_within(
                    self.b, during["token"], 1.0
                )
                out["since_restart"] = time.monotonic() - started_at
                out["hit_after"] = self.cache_hit_across(cache_token, "after")
                out["shared_limits_after"], _ = poll(
                    lambda: self.window_shared(cache_token), 5.0, interval=0.2
                )
                # Each rate limiter tries Redis again on its own schedule, on a
                # request: keep the traffic going until both have (a loaded
                # machine can take seconds).
                poll(
                    lambda: all(RATE_LIMITS_BACK in d.log() for d in (self.a, self.b)),
                    15.0,
                    interval=0.2,
                )
            finally:
                stop.set()
                for t in flows:
                    t.join()
            out["traffic"] = traffic

            # PATCH through b and project deactivation through a, on the other instance
            self.manage(self.b, "PATCH", f"/manage/tokens/{patched['id']}", {"is_active": False})
            self.assert_refused_within_a_second(self.a, patched["token"], 401, "token_inactive")
            self.manage(
                self.a, "PATCH", f"/manage/projects/{self.project['id']}", {"is_active": False}
            )
            self.assert_refused_within_a_second(self.b, traffic_token, 403, "project_inactive")
            out["metrics"] = [
                {
                    name: self.metric(d, f"llm_proxy_{name}")
                    for name in (
                        'redis_errors_total{component="cache"}',
                        'redis_errors_total{component="ratelimit"}',
                        'redis_errors_total{component="pubsub"}',
                        'redis_errors_total{component="events"}',
                        'ratelimit_degraded_total{outcome="fallback"}',
                    )
                }
                for d in (self.a, self.b)
            ]
            # the event bus probes Redis on its own schedule (backoff up to 5 s)
            poll(lambda: all(line in d.log() for line in LOG_LINES for d in (self.a, self.b)), 15)
            out["logs"] = [d.log() for d in (self.a, self.b)]
            return out

        upstream_before = len(self.fake.requests)
        out = await self.blocking(scenario)
        self.assertIsNotNone(out["ready_before"])
        stored, hit = out["hit_before"]
        self.assertEqual(stored[1]["x-proxy-cache"], "stored")
        self.assertIsNotNone(hit)

        # Redis down: /ready says so on both, naming every Redis check
        self.assertIsNotNone(out["ready_down"], "/ready did not report the Redis outage")
        for status, _, body in out["ready_down"]:
            self.assertEqual(status, 503)
            self.assertEqual(body["checks"]["database"], "ok")
            for name in REDIS_CHECKS:
                self.assertNotEqual(body["checks"][name], "ok", body)
                self.assertIn(name, body["error"])
        stored, hit = out["cache_down"]
        self.assertEqual(stored[0], 200)
        self.assertEqual(stored[1]["cache-status"], "llm-proxy; miss")
        self.assertEqual(stored[1]["x-cache-debug"], "cache-unavailable")
        self.assertIsNone(hit)
        statuses = [status for status, _, _ in out["quota_down"]]
        self.assertEqual((statuses.count(200), statuses.count(429)), (10, 20), statuses)
        for status, _, body in (out["during_on_a"], out["counted_on_b"]):
            self.assertEqual((status, body["code"]), (401, "token_inactive"))

        # Redis back: ready again, shared invalidation and cache work again
        self.assertIsNotNone(out["ready_again"], "/ready did not recover")
        (status, _, body), delay = out["during_on_b"], out["during_delay"]
        self.assertEqual((status, body["code"]), (401, "token_inactive"))
        self.assertLess(delay, 1.0)
        stored, hit = out["hit_after"]
        self.assertEqual(stored[1]["x-proxy-cache"], "stored")
        self.assertIsNotNone(hit, "no shared cache hit after Redis returned")

        # traffic never failed, in the outage or around it
        self.assertGreater(out["traffic_down"], 0)
        self.assertEqual(set(out["traffic"]), {200}, out["traffic"])
        self.assertTrue(out["shared_limits_after"], "rate-limit windows not shared again")
        # a metric and a log line for the outage and for the recovery, on both instances
        for counts in out["metrics"]:
            for name, value in counts.items():
                self.assertGreater(value, 0, name)
        for daemon, log in zip((self.a, self.b), out["logs"], strict=True):
            for line in LOG_LINES:
                self.assertIn(line, log, daemon.log_path)
        self.assertGreater(len(self.fake.requests), upstream_before)


class RedisHangTests(TwoInstances):
    """
    Redis stops answering without closing its connections (the process is
    paused): every call has to time out, nothing may wait for Redis.
    """

    async def test_proxying_does_not_wait_for_a_hung_redis(self) -> None:
        freeze = 5.0

        def scenario() -> dict[str, Any]:
            out: dict[str, Any] = {}
            token = self.new_token(self.a)
            revoked = self.new_token(self.a)
            for daemon in (self.a, self.b):
                self.assertEqual(self.chat(daemon, revoked["token"])[0], 200)
            self.assertTrue(poll(self.both_ready(200), 10.0, interval=0.1)[0])

            stop = threading.Event()
            traffic: list[tuple[int, float]] = []

            def flow(daemon: Daemon) -> None:
                while not stop.is_set():
                    started = time.monotonic()
                    status = self.chat(daemon, token["token"], OPT_IN)[0]
                    traffic.append((status, time.monotonic() - started))
                    time.sleep(0.02)

            flows = [threading.Thread(target=flow, args=(d,)) for d in (self.a, self.b)]
            for t in flows:
                t.start()
            pid = self.redis.process.pid  # type: ignore[union-attr]
            try:
                time.sleep(0.3)
                os.kill(pid, signal.SIGSTOP)
                self.addCleanup(os.kill, pid, signal.SIGCONT)
                frozen_at = time.monotonic()
                out["ready_hung"] = [self.ready(d) for d in (self.a, self.b)]
                time.sleep(max(0.0, freeze - (time.monotonic() - frozen_at)))
                os.kill(pid, signal.SIGCONT)
                out["ready_again"], out["recovery"] = poll(
                    self.both_ready(200),
                    20.0,
                    interval=0.1,
                )
                self.manage(self.a, "DELETE", f"/manage/tokens/{revoked['id']}", expect=204)
                out["revoked_on_b"] = self.refused_within(self.b, revoked["token"], 1.0)
                cache_token = self.new_token(self.b)["token"]
                out["hit_after"] = self.cache_hit_across(cache_token, "after-hang")
            finally:
                stop.set()
                for t in flows:
                    t.join()
            out["traffic"] = traffic
            return out

        out = await self.blocking(scenario)
        for status, _, body in out["ready_hung"]:
            self.assertEqual(status, 503, body)
            self.assertEqual(body["checks"]["database"], "ok")
            for name in REDIS_CHECKS:
                self.assertNotEqual(body["checks"][name], "ok", body)
        statuses = [status for status, _ in out["traffic"]]
        self.assertEqual(set(statuses), {200})
        # every Redis call has a deadline: no request waited for Redis to wake up
        slowest = max(seconds for _, seconds in out["traffic"])
        self.assertLess(slowest, freeze / 2, sorted(seconds for _, seconds in out["traffic"]))
        self.assertTrue(out["ready_again"], "/ready did not recover")
        (status, _, body), delay = out["revoked_on_b"]
        self.assertEqual((status, body["code"]), (401, "token_inactive"))
        self.assertLess(delay, 1.0)
        stored, hit = out["hit_after"]
        self.assertEqual(stored[1].get("x-proxy-cache"), "stored", stored)
        self.assertIsNotNone(hit, "no shared cache hit after Redis woke up")


def set_database_reachable(name: str, reachable: bool) -> None:
    """
    Take one database away from every client (refuse new connections, end
    the open ones) or give it back; the server and its other databases are
    untouched.
    """
    admin = sa.create_engine(
        postgres_url(POSTGRES_DSN), poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS {reachable}"))
            if not reachable:
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name"
                    ),
                    {"name": name},
                )
    finally:
        admin.dispose()


class DatabaseOutageTests(TwoInstances):
    """The shared database goes away for a while, then returns."""

    # the project guard's cache outlives the outage, so cached tokens keep working
    extra_env = {"LLM_PROXY_ACTIVE_CACHE_TTL": "60"}

    async def test_database_outage(self) -> None:
        def scenario() -> dict[str, Any]:
            out: dict[str, Any] = {}
            cached = self.new_token(self.a)
            limited = self.new_token(self.a, max_requests=5)
            unseen = self.new_token(self.a)
            for daemon in (self.a, self.b):
                self.assertEqual(self.chat(daemon, cached["token"])[0], 200)
                self.assertEqual(self.chat(daemon, limited["token"])[0], 200)
            self.addCleanup(set_database_reachable, self.database, True)
            set_database_reachable(self.database, False)
            upstream = len(self.fake.requests)
            out["ready_down"], _ = poll(
                lambda: (
                    all(self.ready(d)[0] == 503 for d in (self.a, self.b))
                    and [self.ready(d) for d in (self.a, self.b)]
                ),
                10.0,
                interval=0.1,
            )
            out["cached"] = [self.chat(d, cached["token"]) for d in (self.a, self.b)]
            out["limited"] = [self.chat(d, limited["token"]) for d in (self.a, self.b)]
            out["unseen"] = [self.chat(d, unseen["token"]) for d in (self.a, self.b)]
            out["manage"] = http(self.b.url + "/manage/projects", token=MT)
            out["upstream_down"] = len(self.fake.requests) - upstream

            set_database_reachable(self.database, True)
            out["ready_again"], out["recovery"] = poll(
                lambda: all(self.ready(d)[0] == 200 for d in (self.a, self.b)), 20.0, 0.1
            )
            out["limited_after"] = [self.chat(d, limited["token"]) for d in (self.a, self.b)]
            out["unseen_after"] = self.chat(self.b, unseen["token"])

            def counted() -> dict[str, Any] | None:
                token = self.manage(self.a, "GET", f"/manage/tokens/{cached['id']}")
                return token if token["request_count"] == 4 else None

            # the counts of the requests served during the outage were kept and written
            out["cached_row"], _ = poll(counted, 5.0, interval=0.2)
            out["limited_row"] = self.manage(self.a, "GET", f"/manage/tokens/{limited['id']}")
            return out

        out = await self.blocking(scenario)
        self.assertTrue(out["ready_down"], "/ready did not report the database outage")
        for status, _, body in out["ready_down"]:
            self.assertEqual(status, 503)
            self.assertIn("database", body["error"])
            self.assertNotEqual(body["checks"]["database"], "ok")
            for name in REDIS_CHECKS:
                self.assertEqual(body["checks"][name], "ok")
        # tokens and projects already cached are served
        self.assertEqual([status for status, _, _ in out["cached"]], [200, 200])
        # quotas fail closed: the request cannot be counted, so it is refused
        for status, _, body in out["limited"] + out["unseen"]:
            self.assertEqual((status, body["code"]), (401, "invalid_token"), body)
        self.assertEqual(out["upstream_down"], 2)
        self.assertEqual(out["manage"][0] // 100, 5, out["manage"])
        # back: everything works again without a restart
        self.assertTrue(out["ready_again"], "/ready did not recover")
        self.assertEqual([status for status, _, _ in out["limited_after"]], [200, 200])
        self.assertEqual(out["unseen_after"][0], 200)
        self.assertIsNotNone(out["cached_row"], "usage counted during the outage was lost")
        self.assertEqual(out["limited_row"]["request_count"], 4)
