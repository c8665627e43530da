"""The response cache on a real Redis: the shared behaviour, key layout, outages."""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from llmproxy.cache import MISS, ResponseCache
from llmproxy.cache.interface import CacheUnavailable, ICacheBackend
from llmproxy.cache.redis import RedisCacheBackend
from llmproxy.metrics import Metrics, sum_samples
from llmproxy.redisconn import RedisAddress, connect
from tests.cache_suite import PUBLIC, CacheBehaviour, hdrs
from tests.redisserver import RedisServer
from tests.services import REDIS_HOST, REDIS_PORT, require_redis

real_clock: Any = reactor


class RedisCacheBehaviour(CacheBehaviour, TestCase):
    timeout = 20

    def setUp(self) -> None:
        require_redis()
        self.pool = connect(RedisAddress(REDIS_HOST, REDIS_PORT), poolsize=2)
        self.addCleanup(self.pool.disconnect)
        self.key_prefix = f"test-cache:{uuid.uuid4().hex}:"
        self.addCleanup(self.remove_keys)
        super().setUp()

    async def remove_keys(self) -> None:
        keys = await self.pool.keys(self.key_prefix + "*")
        if keys:
            await self.pool.delete(keys)

    def make_backend(self, clock: Clock) -> ICacheBackend:
        # The fake clock decides freshness; Redis TTLs follow from it.
        return RedisCacheBackend(self.pool, clock, prefix=self.key_prefix, timeout=5.0)

    async def test_entries_carry_a_redis_ttl(self) -> None:
        await self.fetch(response={"Cache-Control": "public, max-age=30"})
        keys = await self.pool.keys(self.key_prefix + "e:*")
        self.assertEqual(len(keys), 1)
        ttl = int(await self.pool.ttl(keys[0]))
        self.assertGreater(ttl, 0)
        self.assertLessEqual(ttl, 30)

    async def test_two_instances_share_entries(self) -> None:
        await self.fetch()
        other_pool = connect(RedisAddress(REDIS_HOST, REDIS_PORT), poolsize=1)
        self.addCleanup(other_pool.disconnect)
        other = ResponseCache(
            RedisCacheBackend(other_pool, self.clock, prefix=self.key_prefix), self.clock
        )
        self.assertEqual((await self.lookup(cache=other)).outcome, "hit")
        self.assertEqual(await other.purge("GET", "/v1/models"), 1)
        self.assertEqual((await self.lookup()).outcome, MISS)

    async def test_small_scan_batches_purge_everything(self) -> None:
        cache = ResponseCache(
            RedisCacheBackend(self.pool, self.clock, prefix=self.key_prefix, scan_count=2),
            self.clock,
        )
        for i in range(7):
            await self.fetch(uri=f"/v1/models/{i}", cache=cache)
        self.assertEqual(await cache.purge_prefix("/v1/models/"), 7)


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(real_clock, seconds, lambda: None)


class RedisOutageTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = RedisServer()
        self.addCleanup(self.server.cleanup)
        self.server.start()
        self.pool = connect(RedisAddress("127.0.0.1", self.server.port), poolsize=2)
        self.addCleanup(self.pool.disconnect)
        self.metrics = Metrics(real_clock, process_metrics=False)
        self.backend = RedisCacheBackend(
            self.pool, real_clock, timeout=0.3, metrics=self.metrics, retry_interval=0.2
        )
        self.cache = ResponseCache(self.backend, real_clock, metrics=self.metrics)

    async def fill(self) -> bool:
        result = await self.cache.lookup("GET", "/v1/models", hdrs(), None, "p")
        rh = hdrs(PUBLIC)
        plan = self.cache.plan(result, 200, rh, streaming=False)
        return await self.cache.store(result, plan, 200, rh, b"cached")

    async def outcome(self) -> Any:
        return await self.cache.lookup("GET", "/v1/models", hdrs(), None, "p")

    async def test_down_is_a_miss_and_back_is_a_hit(self) -> None:
        self.assertTrue(await self.fill())
        self.assertEqual((await self.outcome()).outcome, "hit")

        self.server.stop()
        started = real_clock.seconds()
        result = await self.outcome()
        self.assertEqual(result.outcome, MISS)
        self.assertTrue(result.degraded)
        self.assertLess(real_clock.seconds() - started, 5)
        self.assertFalse(await self.fill())  # storing is skipped, never fails
        quick = await self.outcome()  # within retry_interval: no Redis call at all
        self.assertTrue(quick.degraded)
        self.assertGreaterEqual(sum_samples(self.metrics, "llm_proxy_cache_errors_total"), 2)
        self.assertGreaterEqual(
            sum_samples(self.metrics, "llm_proxy_redis_errors_total", {"component": "cache"}), 1
        )
        with self.assertRaises(CacheUnavailable):
            await self.cache.purge("GET", "/v1/models")

        self.server.start()  # an empty Redis (no persistence)
        for _ in range(100):
            await sleep(0.2)
            if not (await self.outcome()).degraded:
                break
        self.assertTrue(self.backend.available)
        self.assertTrue(await self.fill())
        self.assertEqual((await self.outcome()).outcome, "hit")
        self.assertEqual(await self.cache.purge_prefix("/v1/"), 1)


class RedisUrlListTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        require_redis()
        self.pool = connect(RedisAddress(REDIS_HOST, REDIS_PORT), poolsize=1)
        self.addCleanup(self.pool.disconnect)
        self.key_prefix = f"test-cache:{uuid.uuid4().hex}:"
        self.addCleanup(self.remove_keys)
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.cache = ResponseCache(
            RedisCacheBackend(self.pool, self.clock, prefix=self.key_prefix), self.clock
        )

    async def remove_keys(self) -> None:
        keys = await self.pool.keys(self.key_prefix + "*")
        if keys:
            await self.pool.delete(keys)

    async def fill(self, uri: str, max_age: int) -> None:
        result = await self.cache.lookup("GET", uri, hdrs(), None, "p")
        rh = hdrs({"Cache-Control": f"public, max-age={max_age}"})
        plan = self.cache.plan(result, 200, rh, streaming=False)
        self.assertTrue(await self.cache.store(result, plan, 200, rh, b"x"))

    async def test_expired_urls_leave_the_list(self) -> None:
        await self.fill("/v1/short", 1)
        await sleep(1.2)
        for i in range(30):
            await self.fill(f"/v1/long/{i % 3}", 60)
        members = await self.pool.zrange(self.key_prefix + "urls", 0, -1)
        self.assertNotIn("/v1/short\nGET", members)
        self.assertEqual(len(members), 3)
