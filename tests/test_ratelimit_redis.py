"""The Redis rate limiter against a real Redis: atomicity, expiry, outages."""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from llmproxy.metrics import Metrics, sum_samples
from llmproxy.ratelimit import Decision, MemoryRateLimiter, RedisRateLimiter
from llmproxy.redisconn import RedisAddress, connect
from tests.redisserver import RedisServer
from tests.services import REDIS_HOST, REDIS_PORT, require_redis

clock: Any = reactor


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(clock, seconds, lambda: None)


class RedisLimiterTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        require_redis()
        self.pool = connect(RedisAddress(REDIS_HOST, REDIS_PORT), poolsize=4)
        self.addCleanup(self.pool.disconnect)
        self.prefix = f"test-ratelimit:{uuid.uuid4().hex}:"
        self.metrics = Metrics(clock, process_metrics=False)
        self.limiter = RedisRateLimiter(
            self.pool, clock, timeout=2.0, prefix=self.prefix, metrics=self.metrics
        )

    async def test_atomic_under_concurrency(self) -> None:
        results = await defer.gatherResults([self.limiter.check("tok", 37, 60) for _ in range(200)])
        allowed = [d for d in results if d.allowed]
        self.assertEqual(len(allowed), 37)
        self.assertEqual(sorted(d.remaining for d in allowed), list(range(37)))
        refused = [d for d in results if not d.allowed]
        self.assertTrue(all(d.retry_after and d.retry_after <= 60 for d in refused))
        self.assertEqual(sum_samples(self.metrics, "llm_proxy_redis_errors_total"), 0)

    async def test_keys_expire(self) -> None:
        await self.limiter.check("tok", 5, 10)
        keys = await self.pool.keys(self.prefix + "*")
        self.assertEqual(len(keys), 1)
        self.assertTrue(keys[0].startswith(self.prefix + "tok:"))
        ttl = int(await self.pool.ttl(keys[0]))
        self.assertGreater(ttl, 0)
        self.assertLessEqual(ttl, 11)
        await self.pool.delete(keys[0])

    async def test_key_secret_hides_ids(self) -> None:
        limiter = RedisRateLimiter(self.pool, clock, prefix=self.prefix, key_secret="s3cret")
        await limiter.check("token:abc-id", 5, 60)
        keys = await self.pool.keys(self.prefix + "*")
        self.assertEqual(len(keys), 1)
        self.assertNotIn("abc-id", keys[0])
        ident = keys[0][len(self.prefix) :].split(":")[0]
        self.assertEqual(len(ident), 16)
        await self.pool.delete(keys[0])

    async def test_shared_between_instances(self) -> None:
        other_pool = connect(RedisAddress(REDIS_HOST, REDIS_PORT), poolsize=1)
        self.addCleanup(other_pool.disconnect)
        other = RedisRateLimiter(other_pool, clock, prefix=self.prefix)
        a = await self.limiter.check("tok", 2, 60)
        b = await other.check("tok", 2, 60)
        c = await self.limiter.check("tok", 2, 60)
        self.assertEqual([a.allowed, b.allowed, c.allowed], [True, True, False])


class RedisOutageTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = RedisServer()
        self.server.start()
        self.addCleanup(self.server.cleanup)
        self.pool = connect(RedisAddress("127.0.0.1", self.server.port), poolsize=1)
        self.addCleanup(self.pool.disconnect)
        self.metrics = Metrics(clock, process_metrics=False)

    def limiter(self, **kw: Any) -> RedisRateLimiter:
        return RedisRateLimiter(
            self.pool, clock, timeout=0.2, retry_interval=0.1, metrics=self.metrics, **kw
        )

    async def recovered(self, limiter: RedisRateLimiter) -> Decision:
        """Check until a decision comes from Redis again (reconnect has backoff)."""
        for _ in range(150):
            errors = sum_samples(self.metrics, "llm_proxy_redis_errors_total")
            decision = await limiter.check("tok", 100, 60)
            if sum_samples(self.metrics, "llm_proxy_redis_errors_total") == errors and (
                limiter.available
            ):
                return decision
            await sleep(0.1)
        raise AssertionError("the limiter did not return to Redis")

    async def test_fail_open_then_recover(self) -> None:
        limiter = self.limiter(fail_open=True)
        first = await limiter.check("tok", 100, 60)
        self.assertEqual(first.remaining, 99)
        self.server.stop()
        down = await limiter.check("tok", 100, 60)
        self.assertTrue(down.allowed)
        self.assertFalse(down.unavailable)
        self.assertGreaterEqual(
            sum_samples(self.metrics, "llm_proxy_redis_errors_total", {"component": "ratelimit"}),
            1,
        )
        self.assertGreaterEqual(
            sum_samples(
                self.metrics, "llm_proxy_ratelimit_degraded_total", {"outcome": "fail_open"}
            ),
            1,
        )
        self.server.start()  # same port, empty data
        back = await self.recovered(limiter)
        self.assertTrue(back.allowed)
        self.assertLess(back.remaining, 100)
        self.assertTrue(limiter.available)

    async def test_fail_closed(self) -> None:
        limiter = self.limiter(fail_open=False)
        self.assertTrue((await limiter.check("tok", 100, 60)).allowed)
        self.server.stop()
        down = await limiter.check("tok", 100, 60)
        self.assertFalse(down.allowed)
        self.assertTrue(down.unavailable)
        self.assertEqual(down.retry_after, 1)
        # within the retry interval Redis is not even asked
        again = await limiter.check("tok", 100, 60)
        self.assertTrue(again.unavailable)
        self.assertEqual(
            sum_samples(
                self.metrics, "llm_proxy_ratelimit_degraded_total", {"outcome": "fail_closed"}
            ),
            2,
        )
        self.server.start()
        back = await self.recovered(limiter)
        self.assertTrue(back.allowed)
        self.assertFalse(back.unavailable)

    async def test_fallback_counts_in_process(self) -> None:
        limiter = self.limiter(fail_open=False, fallback=MemoryRateLimiter(clock))
        self.server.stop()
        decisions = [await limiter.check("tok", 2, 60) for _ in range(3)]
        self.assertEqual([d.allowed for d in decisions], [True, True, False])
        self.assertFalse(any(d.unavailable for d in decisions))
        self.assertEqual(
            sum_samples(
                self.metrics, "llm_proxy_ratelimit_degraded_total", {"outcome": "fallback"}
            ),
            3,
        )
