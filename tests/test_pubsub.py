"""Cross-instance invalidation over Redis pub/sub (real Redis)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmproxy.config import Config
from llmproxy.invalidation import InvalidationHub
from llmproxy.metrics import Metrics, sum_samples
from llmproxy.pubsub import RedisInvalidationBridge
from llmproxy.redisconn import RedisAddress
from tests.redisserver import RedisServer
from tests.services import REDIS_HOST, REDIS_PORT, require_redis

clock: Any = reactor


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(clock, seconds, lambda: None)


class Instance:
    """One llmproxy instance's view: a hub, what its caches heard, a bridge."""

    def __init__(self, address: RedisAddress, channel: str) -> None:
        self.hub = InvalidationHub()
        self.heard: list[tuple[str, str, float]] = []
        self.hub.subscribe(lambda kind, key: self.heard.append((kind, key, time.monotonic())))
        self.metrics = Metrics(clock, process_metrics=False)
        self.bridge = RedisInvalidationBridge(
            self.hub, address, clock, clock, metrics=self.metrics, channel=channel
        )


class BridgeTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        require_redis()
        channel = f"test-invalidations:{uuid.uuid4().hex}"
        address = RedisAddress(REDIS_HOST, REDIS_PORT)
        self.a = Instance(address, channel)
        self.b = Instance(address, channel)
        for instance in (self.a, self.b):
            instance.bridge.startService()
            self.addCleanup(instance.bridge.stopService)

    async def subscribed(self) -> None:
        await defer.gatherResults(
            [self.a.bridge.when_subscribed(), self.b.bridge.when_subscribed()]
        )

    async def wait_for(self, instance: Instance, count: int, within: float) -> None:
        deadline = time.monotonic() + within
        while len(instance.heard) < count and time.monotonic() < deadline:
            await sleep(0.01)

    async def test_announcement_reaches_other_instance_within_a_second(self) -> None:
        await self.subscribed()
        started = time.monotonic()
        self.a.hub.token_changed("hash-of-revoked-token")
        await self.wait_for(self.b, 1, within=1.0)
        self.assertEqual([h[:2] for h in self.b.heard], [("token", "hash-of-revoked-token")])
        self.assertLess(self.b.heard[0][2] - started, 1.0)
        # the announcing instance applied it once, locally, and not again from Redis
        await sleep(0.2)
        self.assertEqual([h[:2] for h in self.a.heard], [("token", "hash-of-revoked-token")])
        self.assertEqual(
            sum_samples(self.b.metrics, "llm_proxy_invalidations_total", {"direction": "received"}),
            1,
        )
        self.assertEqual(
            sum_samples(self.a.metrics, "llm_proxy_invalidations_total", {"direction": "received"}),
            0,
        )

    async def test_both_directions_and_kinds(self) -> None:
        await self.subscribed()
        self.b.hub.project_changed("project-1")
        self.a.hub.token_changed("t-2")
        await self.wait_for(self.a, 2, within=1.0)
        await self.wait_for(self.b, 2, within=1.0)
        self.assertEqual(
            {h[:2] for h in self.a.heard}, {("project", "project-1"), ("token", "t-2")}
        )
        self.assertEqual(
            {h[:2] for h in self.b.heard}, {("project", "project-1"), ("token", "t-2")}
        )

    async def test_ready_check(self) -> None:
        await self.subscribed()
        await self.a.bridge.ready_check()


class OutageTests(TestCase):
    timeout = 60

    async def test_resubscribes_when_redis_returns(self) -> None:
        server = RedisServer()
        server.start()
        self.addCleanup(server.cleanup)
        address = RedisAddress("127.0.0.1", server.port)
        channel = "llmproxy:invalidations"
        a, b = Instance(address, channel), Instance(address, channel)
        for instance in (a, b):
            instance.bridge.startService()
            self.addCleanup(instance.bridge.stopService)
        await defer.gatherResults([a.bridge.when_subscribed(), b.bridge.when_subscribed()])

        server.stop()
        for _ in range(100):
            if not b.bridge.subscribed:
                break
            await sleep(0.05)
        self.assertFalse(b.bridge.subscribed)
        failure = await self.assertFailure(b.bridge.ready_check(), RuntimeError)
        self.assertIn("not subscribed", str(failure))
        a.hub.token_changed("lost-while-down")  # cannot be published now: kept, retried
        await sleep(0.8)
        self.assertEqual(b.heard, [])
        self.assertGreaterEqual(
            sum_samples(a.metrics, "llm_proxy_redis_errors_total", {"component": "pubsub"}), 1
        )

        server.start()
        await defer.gatherResults([a.bridge.when_subscribed(), b.bridge.when_subscribed()])
        a.hub.token_changed("after-recovery")
        for _ in range(500):  # the publishing connection may reconnect a little later
            if ("token", "after-recovery") in [h[:2] for h in b.heard]:
                break
            await sleep(0.01)
        heard = [h[:2] for h in b.heard]
        self.assertIn(("token", "after-recovery"), heard)
        # what was announced during the outage may have been missed: caches flush
        self.assertIn(("all", ""), heard)
        self.assertIn(("all", ""), [h[:2] for h in a.heard])
        self.assertLess(heard.index(("all", "")), heard.index(("token", "after-recovery")))


class MessageTests(SynchronousTestCase):
    def setUp(self) -> None:
        from twisted.internet.task import Clock

        self.hub = InvalidationHub()
        self.heard: list[tuple[str, str]] = []
        self.hub.subscribe(lambda kind, key: self.heard.append((kind, key)))
        c = Clock()
        self.bridge = RedisInvalidationBridge(self.hub, RedisAddress(), c, c)  # type: ignore[arg-type]

    def test_own_messages_ignored(self) -> None:
        own = json.dumps({"i": self.bridge.instance_id, "k": "token", "key": "x"})
        self.bridge.message_received(own)
        self.assertEqual(self.heard, [])

    def test_bad_messages_ignored(self) -> None:
        for message in (
            "not json",
            json.dumps({"k": "token"}),
            json.dumps({"i": "other", "k": "bogus", "key": "x"}),
            json.dumps({"i": "other", "k": "token", "key": 5}),
            b"\xff\xfe",
        ):
            self.bridge.message_received(message)
        self.assertEqual(self.heard, [])
        self.flushLoggedErrors()

    def test_foreign_message_delivered(self) -> None:
        self.bridge.message_received(json.dumps({"i": "other", "k": "project", "key": "p1"}))
        self.assertEqual(self.heard, [("project", "p1")])


class PubSubAddressTests(SynchronousTestCase):
    def address(self, **env: str) -> Any:
        from llmproxy.pubsub import pubsub_address

        return pubsub_address(Config.from_env(dict({"MANAGEMENT_TOKEN": "mt"}, **env)))

    def test_off_without_redis(self) -> None:
        self.assertIsNone(self.address())
        self.assertIsNone(self.address(HTTP_CACHE_BACKEND="redis", HTTP_CACHE_ENABLED="false"))

    def test_on_when_redis_is_used(self) -> None:
        for env in (
            {"INVALIDATION_PUBSUB": "true"},
            {"DISTRIBUTED_RATE_LIMIT_ENABLED": "true"},
            {"LLM_PROXY_EVENT_BUS": "redis-streams"},
            {"HTTP_CACHE_BACKEND": "redis"},
        ):
            address = self.address(REDIS_ADDR="redis.internal:6380", **env)
            self.assertEqual((address.host, address.port), ("redis.internal", 6380), env)

    def test_unusable_cache_url_is_no_redis(self) -> None:
        # the cache falls back to memory then; the daemon must still start
        self.assertIsNone(self.address(HTTP_CACHE_BACKEND="redis", REDIS_CACHE_URL="http://x/0"))

    def test_cache_only_uses_cache_url(self) -> None:
        address = self.address(
            HTTP_CACHE_BACKEND="redis", REDIS_CACHE_URL="redis://:pw@cache.internal:6390/3"
        )
        self.assertEqual(
            (address.host, address.port, address.password), ("cache.internal", 6390, "pw")
        )
