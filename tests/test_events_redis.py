"""The Redis Streams event bus and consumer against a real Redis."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from llmproxy.events.redis_streams import (
    EventBusUnavailable,
    RedisStreamConsumer,
    RedisStreamsEventBus,
)
from llmproxy.redisconn import RedisAddress, connect
from tests.redisserver import RedisServer
from tests.services import REDIS_HOST, REDIS_PORT, require_redis


async def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await task.deferLater(reactor, 0.05, lambda: None)


class RedisTestCase(TestCase):
    def setUp(self) -> None:
        require_redis()
        self.key = f"test-events-{uuid.uuid4().hex[:12]}"
        self.admin = connect(RedisAddress(REDIS_HOST, REDIS_PORT))
        self.addCleanup(self.admin.disconnect)
        self.addCleanup(lambda: self.admin.execute_command("DEL", self.key))

    def pool(self, port: int = REDIS_PORT, size: int = 2) -> Any:
        pool = connect(RedisAddress(REDIS_HOST, port), poolsize=size)
        self.addCleanup(pool.disconnect)
        return pool

    def bus_pool(self, port: int = REDIS_PORT) -> Any:
        """A pool the bus owns (it disconnects it on stop); one connection keeps order."""
        return connect(RedisAddress(REDIS_HOST, port), poolsize=1)

    async def stream(self) -> list[dict[str, Any]]:
        reply = await self.admin.execute_command("XRANGE", self.key, "-", "+")
        return [json.loads(dict(zip(f[0::2], f[1::2], strict=True))["data"]) for _, f in reply]


class RedisBusTests(RedisTestCase):
    @defer.inlineCallbacks
    def test_publish_xadds_json(self) -> Any:
        bus = RedisStreamsEventBus(self.bus_pool(), reactor, self.key, max_len=1000)
        self.addCleanup(bus.stop)
        bus.start()
        for n in range(5):
            bus.publish({"n": n, "text": "é"})
        yield defer.ensureDeferred(wait_for(lambda: bus.sent == 5))
        events = yield defer.ensureDeferred(self.stream())
        self.assertEqual(events, [{"n": n, "text": "é"} for n in range(5)])
        yield bus.ping()
        yield bus.stop()
        self.assertEqual(bus.stats()["dropped"], 0)

    @defer.inlineCallbacks
    def test_unreachable_redis_buffers_then_flushes(self) -> Any:
        server = RedisServer()
        self.addCleanup(server.cleanup)
        bus = RedisStreamsEventBus(
            self.bus_pool(server.port), reactor, self.key, capacity=4, timeout=0.3, retry_max=0.5
        )
        self.addCleanup(bus.stop)
        bus.start()
        for n in range(6):
            bus.publish({"n": n})  # never blocks, never raises
        self.assertEqual((bus.published, bus.dropped), (4, 2))  # overflow counted
        with self.assertRaises(EventBusUnavailable) as caught:
            yield bus.ping()
        self.assertIn("4 event(s) buffered", str(caught.exception))
        yield defer.ensureDeferred(wait_for(lambda: not bus.available))
        server.start()
        yield defer.ensureDeferred(wait_for(lambda: bus.stats()["queued"] == 0, timeout=20))
        yield bus.ping()
        local = connect(RedisAddress(REDIS_HOST, server.port))
        self.addCleanup(local.disconnect)
        reply = yield local.execute_command("XRANGE", self.key, "-", "+")
        numbers = [json.loads(f[1])["n"] for _, f in reply]
        self.assertEqual(numbers, [0, 1, 2, 3])  # in order, none written twice
        yield bus.stop()

    @defer.inlineCallbacks
    def test_stop_without_redis_counts_the_loss(self) -> Any:
        server = RedisServer()  # never started
        self.addCleanup(server.cleanup)
        bus = RedisStreamsEventBus(
            self.bus_pool(server.port), reactor, self.key, timeout=0.2, stop_timeout=0.5
        )
        bus.publish({"n": 1})
        yield bus.stop()
        self.assertEqual(bus.dropped, 1)
        self.flushLoggedErrors()


class ConsumerTests(RedisTestCase):
    def consumer(self, name: str, claim_time: float = 30.0) -> RedisStreamConsumer:
        return RedisStreamConsumer(
            self.pool(size=1), self.pool(), reactor, self.key, "group", name, claim_time=claim_time
        )

    async def add(self, n: int) -> None:
        for i in range(n):
            await self.admin.execute_command("XADD", self.key, "*", "data", json.dumps({"n": i}))

    @defer.inlineCallbacks
    def test_group_pending_and_claim(self) -> Any:
        a = self.consumer("a")
        yield defer.ensureDeferred(a.ensure_group())
        yield defer.ensureDeferred(a.ensure_group())  # BUSYGROUP is fine
        yield defer.ensureDeferred(self.add(3))
        yield self.admin.execute_command("XADD", self.key, "*", "other", "x")
        first = yield defer.ensureDeferred(a.read(10, 0.1))
        self.assertEqual([e.event for e in first], [{"n": 0}, {"n": 1}, {"n": 2}, None])
        yield defer.ensureDeferred(a.ack([first[0].id]))
        # "a" restarts: its unacknowledged entries come back first
        again = self.consumer("a")
        pending = yield defer.ensureDeferred(again.read(10, 0.1))
        self.assertEqual([e.id for e in pending], [e.id for e in first[1:]])
        nothing = yield defer.ensureDeferred(again.read(10, 0.1))
        self.assertEqual(nothing, [])
        # "a" dies; "b" claims what it left pending once idle long enough
        b = self.consumer("b", claim_time=0.2)
        yield task.deferLater(reactor, 0.3, lambda: None)
        claimed = yield defer.ensureDeferred(b.read(10, 0.1))
        self.assertEqual([e.id for e in claimed], [e.id for e in first[1:]])
        yield defer.ensureDeferred(b.ack([e.id for e in claimed]))
        lag = yield defer.ensureDeferred(b.lag())
        self.assertEqual(lag, {"pending": 0, "length": 4})
        self.assertTrue((yield defer.ensureDeferred(b.leave())))
        self.assertTrue((yield defer.ensureDeferred(a.leave())))  # its entries went to "b"
        consumers = yield self.admin.execute_command("XINFO", "CONSUMERS", self.key, "group")
        self.assertEqual(consumers, [])


class ConsumerOutageTests(RedisTestCase):
    @defer.inlineCallbacks
    def test_consumer_survives_a_redis_restart(self) -> Any:
        server = RedisServer()
        self.addCleanup(server.cleanup)
        server.start()
        consumer = RedisStreamConsumer(
            self.pool(server.port, size=1),
            self.pool(server.port),
            reactor,
            self.key,
            "group",
            "c1",
            timeout=0.3,
        )
        yield defer.ensureDeferred(consumer.ensure_group())
        server.stop()
        import txredisapi

        with self.assertRaises((defer.TimeoutError, txredisapi.ConnectionError)):
            yield defer.ensureDeferred(consumer.read(10, 0.1))
        server.start()  # empty: no stream, no group
        local = self.pool(server.port)
        for n in range(2):
            yield local.execute_command("XADD", self.key, "*", "data", json.dumps({"n": n}))
        entries: list[Any] = []
        deadline = time.monotonic() + 15
        while len(entries) < 2 and time.monotonic() < deadline:
            try:
                entries += yield defer.ensureDeferred(consumer.read(10, 0.1))
            except Exception:
                yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual([e.event for e in entries], [{"n": 0}, {"n": 1}])


class BuildEventBusTests(RedisTestCase):
    @defer.inlineCallbacks
    def test_redis_bus_with_file_event_log(self) -> Any:
        import os

        from llmproxy.config import Config
        from llmproxy.events.service import build_event_bus
        from llmproxy.proxy.record import RequestRecord

        path = os.path.join(self.mktemp(), "events.jsonl")
        config = Config.from_env(
            {
                "MANAGEMENT_TOKEN": "m" * 32,
                "LLM_PROXY_EVENT_BUS": "redis-streams",
                "REDIS_ADDR": f"{REDIS_HOST}:{REDIS_PORT}",
                "REDIS_STREAM_KEY": self.key,
                "FILE_EVENT_LOG": path,
            }
        )
        setup = build_event_bus(config, reactor)
        self.assertIsNotNone(setup.ready_check)
        setup.service.startService()
        record = RequestRecord(
            "r-1", "GET", "/v1/models", time.monotonic(), time.time(), status=200
        )
        record.finished_at = record.received_at
        setup.publisher.request_finished(record)
        yield defer.ensureDeferred(wait_for(lambda: setup.service.bus.stats()["sent"] == 1))
        yield setup.ready_check()
        yield setup.service.stopService()
        events = yield defer.ensureDeferred(self.stream())
        self.assertEqual([e["request_id"] for e in events], ["r-1"])
        with open(path, encoding="utf-8") as f:
            self.assertEqual([json.loads(line)["request_id"] for line in f], ["r-1"])
