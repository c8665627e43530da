"""Rate limits: in-process windows, the policy, headers and the 429 body."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from llmproxy.config import Config
from llmproxy.metrics import Metrics, sum_samples
from llmproxy.ratelimit import (
    Decision,
    IRateLimiter,
    MemoryRateLimiter,
    RateLimitPolicy,
    RedisRateLimiter,
    apply_rate_limit_headers,
    build_rate_limit_policy,
    rate_limit_error,
    rate_limit_headers,
)

BASE = {"MANAGEMENT_TOKEN": "mt-secret-value"}


class MemoryLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(600)  # a window boundary
        self.limiter = MemoryRateLimiter(self.clock)

    def check(self, key: str = "k", limit: int = 3, window: float = 60) -> Decision:
        return self.successResultOf(self.limiter.check(key, limit, window))

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IRateLimiter, self.limiter))

    def test_limit_then_refused(self) -> None:
        remaining = [self.check().remaining for _ in range(3)]
        self.assertEqual(remaining, [2, 1, 0])
        refused = self.check()
        self.assertFalse(refused.allowed)
        self.assertEqual(refused.retry_after, 60)
        self.assertEqual(refused.remaining, 0)

    def test_window_resets(self) -> None:
        for _ in range(3):
            self.check()
        self.clock.advance(45)
        refused = self.check()
        self.assertFalse(refused.allowed)
        self.assertEqual(refused.retry_after, 15)
        self.clock.advance(15)
        again = self.check()
        self.assertTrue(again.allowed)
        self.assertEqual(again.remaining, 2)
        self.assertEqual(again.reset_seconds, 60)

    def test_keys_independent(self) -> None:
        for _ in range(3):
            self.check("a")
        self.assertFalse(self.check("a").allowed)
        self.assertTrue(self.check("b").allowed)

    def test_bounded_memory(self) -> None:
        limiter = MemoryRateLimiter(self.clock, max_keys=10)
        for i in range(10):
            self.successResultOf(limiter.check(f"old-{i}", 5, 60))
        self.clock.advance(60)
        for i in range(25):
            self.successResultOf(limiter.check(f"new-{i}", 5, 60))
        self.assertLessEqual(len(limiter), 10)


class PolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(self.clock, process_metrics=False)

    def policy(self, **env: str) -> RateLimitPolicy | None:
        return build_rate_limit_policy(Config.from_env(dict(BASE, **env)), self.clock, self.metrics)

    def check(self, policy: RateLimitPolicy, ip: str = "10.0.0.1", token: str | None = "t1") -> Any:
        return self.successResultOf(policy.check(client_ip=ip, token_id=token))

    def test_nothing_configured(self) -> None:
        self.assertIsNone(self.policy())

    def test_token_limit_per_token(self) -> None:
        policy = self.policy(TOKEN_RATE_LIMIT="2")
        assert policy is not None
        self.assertTrue(self.check(policy).allowed)
        self.assertTrue(self.check(policy).allowed)
        refused = self.check(policy)
        self.assertFalse(refused.allowed)
        self.assertEqual(refused.scope, "token")
        self.assertTrue(self.check(policy, token="t2").allowed)
        self.assertIsNone(self.check(policy, token=None))
        self.assertEqual(
            sum_samples(self.metrics, "llm_proxy_ratelimit_rejected_total", {"scope": "token"}),
            1,
        )

    def test_tightest_decision_wins(self) -> None:
        policy = self.policy(GLOBAL_RATE_LIMIT="100", IP_RATE_LIMIT="3", TOKEN_RATE_LIMIT="10")
        assert policy is not None
        first = self.check(policy)
        self.assertEqual((first.scope, first.limit, first.remaining), ("ip", 3, 2))
        self.check(policy)
        self.check(policy)
        refused = self.check(policy)
        self.assertEqual((refused.allowed, refused.scope), (False, "ip"))
        other_ip = self.check(policy, ip="10.0.0.2")
        self.assertTrue(other_ip.allowed)
        self.assertEqual(other_ip.scope, "ip")

    def test_global_limit_across_ips(self) -> None:
        policy = self.policy(GLOBAL_RATE_LIMIT="2", DISTRIBUTED_RATE_LIMIT_WINDOW="10s")
        assert policy is not None
        self.assertTrue(self.check(policy, ip="a", token=None).allowed)
        self.assertTrue(self.check(policy, ip="b", token="x").allowed)
        refused = self.check(policy, ip="c", token="y")
        self.assertEqual(
            (refused.allowed, refused.scope, refused.retry_after), (False, "global", 10)
        )
        self.clock.advance(10)
        self.assertTrue(self.check(policy, ip="c", token="y").allowed)

    def test_distributed_defaults_token_limit(self) -> None:
        config = Config.from_env(dict(BASE, DISTRIBUTED_RATE_LIMIT_ENABLED="true"))
        policy = build_rate_limit_policy(config, self.clock, redis_pool=object())
        assert policy is not None
        self.assertEqual(policy.token_limit, 60)
        self.assertIsInstance(policy.limiter, RedisRateLimiter)
        self.assertRaises(ValueError, build_rate_limit_policy, config, self.clock)


class _Limited(Resource):
    """What the proxy does with a decision."""

    isLeaf = True

    def __init__(self, policy: RateLimitPolicy) -> None:
        super().__init__()
        self.policy = policy

    def render_GET(self, request: Any) -> Any:
        from twisted.web.server import NOT_DONE_YET

        def decided(decision: Decision | None) -> None:
            if decision is not None and not decision.allowed:
                request.write(rate_limit_error(request, decision))
            else:
                apply_rate_limit_headers(request, decision)
                request.write(b"ok")
            request.finish()

        self.policy.check(client_ip="1.2.3.4", token_id="tok").addCallback(decided)
        return NOT_DONE_YET


class HeaderTests(SynchronousTestCase):
    def test_headers_and_429(self) -> None:
        clock = Clock()
        policy = RateLimitPolicy(MemoryRateLimiter(clock), window=60, token_limit=2)
        client = StubTreq(_Limited(policy))
        response = self.successResultOf(client.get("http://x/"))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("RateLimit-Limit"), ["2"])
        self.assertEqual(response.headers.getRawHeaders("RateLimit-Remaining"), ["1"])
        self.assertEqual(response.headers.getRawHeaders("RateLimit-Reset"), ["60"])
        self.assertIsNone(response.headers.getRawHeaders("Retry-After"))
        self.successResultOf(client.get("http://x/"))
        clock.advance(20)
        response = self.successResultOf(client.get("http://x/"))
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["40"])
        self.assertEqual(response.headers.getRawHeaders("RateLimit-Remaining"), ["0"])
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(body["error"], "Rate limit exceeded")
        self.assertEqual(body["code"], "rate_limit_exceeded")
        self.assertEqual(body["retry_after"], 40)

    def test_unavailable_is_503(self) -> None:
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b""])
        decision = Decision(False, 5, 0, 30, retry_after=1, unavailable=True)
        body = json.loads(rate_limit_error(request, decision))  # type: ignore[arg-type]
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(body["code"], "rate_limit_unavailable")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Retry-After"), [b"1"])

    def test_no_decision_no_headers(self) -> None:
        self.assertEqual(rate_limit_headers(None), [])


class _DownPool:
    """A Redis pool whose every call fails at once (connection refused)."""

    def eval(self, *args: Any) -> Any:
        from twisted.internet import defer

        return defer.fail(ConnectionRefusedError("redis down"))


class RedisDownLoggingTests(SynchronousTestCase):
    def test_one_log_line_per_minute_and_a_metric_per_failure(self) -> None:
        from twisted.logger import LogLevel, globalLogPublisher

        events: list[dict[str, Any]] = []

        def observer(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "llmproxy.ratelimit.redis":
                events.append(event)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        clock = Clock()
        metrics = Metrics(clock, process_metrics=False)
        limiter = RedisRateLimiter(_DownPool(), clock, metrics=metrics, retry_interval=1.0)
        for _ in range(100):  # 100 requests over 50 s, Redis probed every second
            decision = self.successResultOf(limiter.check("tok", 5, 60))
            self.assertTrue(decision.allowed)
            clock.advance(0.5)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        failures = sum_samples(metrics, "llm_proxy_redis_errors_total", {"component": "ratelimit"})
        self.assertEqual(failures, 50)
        self.assertEqual(
            sum_samples(metrics, "llm_proxy_ratelimit_degraded_total", {"outcome": "fail_open"}),
            100,
        )
        clock.advance(15)
        self.successResultOf(limiter.check("tok", 5, 60))
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 2)
        self.assertEqual(warnings[1]["suppressed"], 49)
        self.assertNotIn("tok", str(warnings))
