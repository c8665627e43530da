"""The response cache with the in-process backend: shared behaviour, LRU bounds, hit replay."""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llmproxy.cache import MemoryCacheBackend, ResponseCache
from llmproxy.cache.interface import ICacheBackend
from llmproxy.cache.proxying import answer_from_cache, prepare_store
from llmproxy.metrics import Metrics
from llmproxy.proxy.record import RequestRecord
from tests.cache_suite import PUBLIC, CacheBehaviour, hdrs


class MemoryCacheBehaviour(CacheBehaviour, TestCase):
    def make_backend(self, clock: Clock) -> ICacheBackend:
        return MemoryCacheBackend(clock, max_entries=1000, max_bytes=10_000_000)


class LRUTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    async def fill(self, cache: ResponseCache, uri: str, size: int) -> None:
        result = await cache.lookup("GET", uri, hdrs(), None, "p")
        rh = hdrs(PUBLIC)
        plan = cache.plan(result, 200, rh, streaming=False)
        self.assertTrue(await cache.store(result, plan, 200, rh, b"x" * size))

    async def outcome(self, cache: ResponseCache, uri: str) -> str:
        return (await cache.lookup("GET", uri, hdrs(), None, "p")).outcome

    async def test_eviction_by_bytes_keeps_recently_used(self) -> None:
        backend = MemoryCacheBackend(self.clock, max_entries=1000, max_bytes=6000)
        cache = ResponseCache(backend, self.clock)
        for i in range(4):
            await self.fill(cache, f"/v1/m/{i}", 1000)
        self.assertEqual(await self.outcome(cache, "/v1/m/0"), "hit")  # now most recent
        await self.fill(cache, "/v1/m/4", 1000)
        self.assertLessEqual(backend.bytes, 6000)
        self.assertEqual(await self.outcome(cache, "/v1/m/0"), "hit")
        self.assertEqual(await self.outcome(cache, "/v1/m/1"), "miss")
        self.assertEqual(await self.outcome(cache, "/v1/m/4"), "hit")
        self.assertGreaterEqual(backend.evictions, 1)

    async def test_eviction_by_entries(self) -> None:
        backend = MemoryCacheBackend(self.clock, max_entries=3, max_bytes=10_000_000)
        cache = ResponseCache(backend, self.clock)
        for i in range(5):
            await self.fill(cache, f"/v1/m/{i}", 10)
        self.assertEqual(len(backend), 3)
        self.assertEqual(await self.outcome(cache, "/v1/m/1"), "miss")
        self.assertEqual(await self.outcome(cache, "/v1/m/4"), "hit")

    async def test_entry_larger_than_budget_refused(self) -> None:
        backend = MemoryCacheBackend(self.clock, max_entries=10, max_bytes=1000)
        cache = ResponseCache(backend, self.clock)
        await self.fill(cache, "/v1/small", 10)
        result = await cache.lookup("GET", "/v1/big", hdrs(), None, "p")
        rh = hdrs(PUBLIC)
        plan = cache.plan(result, 200, rh, streaming=False)
        self.assertFalse(await cache.store(result, plan, 200, rh, b"x" * 2000))
        self.assertEqual(await self.outcome(cache, "/v1/small"), "hit")


class _MiniProxy(Resource):
    """
    The smallest proxy that uses the cache through the helpers the real one
    calls: answer_from_cache, then prepare_store and the body tap.
    """

    isLeaf = True

    def __init__(self, cache: ResponseCache, clock: Clock, upstream: Any) -> None:
        super().__init__()
        self.cache = cache
        self.clock = clock
        self.upstream = upstream
        self.ids = iter(f"req-{i}" for i in range(1000))
        self.usage = _Usage()
        self.records: list[RequestRecord] = []

    def render(self, request: Any) -> Any:
        request_id = next(self.ids)
        record = RequestRecord(
            request_id=request_id,
            method=request.method.decode(),
            path=request.path.decode(),
            received_at=0.0,
            received_at_wall=0.0,
            project_id="p1",
            token_hash="hash-of-token",
        )
        self.records.append(record)

        async def go() -> None:
            result = await answer_from_cache(
                self.cache,
                request,
                record,
                self.clock,
                usage=self.usage,
                extra_headers=[(b"X-Proxy", b"llm-proxy")],
                decorate=lambda r: r.setHeader(b"Access-Control-Allow-Origin", b"https://a"),
            )
            if result.served:
                return
            status, headers, chunks, streaming, complete = self.upstream()
            request.setResponseCode(status)
            for name, values in headers.getAllRawHeaders():
                request.responseHeaders.setRawHeaders(name, values)
            request.responseHeaders.setRawHeaders(b"x-request-id", [request_id.encode()])
            tap = prepare_store(self.cache, result, request, record, status, headers, streaming)
            for c in chunks:
                request.write(c)
                if tap is not None:
                    tap.data_received(c)
            if tap is not None:
                tap.body_ended(complete)
            request.finish()

        defer.ensureDeferred(go())
        return NOT_DONE_YET


class _Usage:
    def __init__(self) -> None:
        self.hits: list[str] = []

    def add_cache_hit(self, token_hash: str) -> None:
        self.hits.append(token_hash)


class ServeCachedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(2_000_000_000)
        self.metrics = Metrics(self.clock, process_metrics=False)
        self.cache = ResponseCache(
            MemoryCacheBackend(self.clock, 100, 1_000_000),
            self.clock,
            stream_responses=True,
            metrics=self.metrics,
        )
        self.upstream_calls = 0
        self.upstream_up = True
        self.answer: tuple[int, Any, list[bytes], bool, bool] = (
            200,
            hdrs(dict(PUBLIC, ETag='"v1"')),
            [b'{"data":[1]}'],
            False,
            True,
        )
        self.proxy = _MiniProxy(self.cache, self.clock, self.upstream)
        self.client = StubTreq(self.proxy)

    def upstream(self) -> tuple[int, Any, list[bytes], bool, bool]:
        if not self.upstream_up:
            raise AssertionError("the upstream is stopped")
        self.upstream_calls += 1
        return self.answer

    def get(self, method: str = "GET", **kwargs: Any) -> tuple[Any, bytes]:
        response = self.successResultOf(
            self.client.request(method, "http://proxy/v1/models", **kwargs)
        )
        return response, self.successResultOf(response.content())

    def test_hit_served_with_upstream_stopped(self) -> None:
        first, body = self.get()
        self.assertEqual(first.headers.getRawHeaders("cache-status"), ["llm-proxy; stored"])
        self.upstream_up = False
        self.clock.advance(5)
        second, body2 = self.get()
        self.assertEqual(second.code, 200)
        self.assertEqual(body2, body)
        self.assertEqual(self.upstream_calls, 1)
        h = second.headers
        self.assertEqual(h.getRawHeaders("cache-status"), ["llm-proxy; hit"])
        self.assertEqual(h.getRawHeaders("x-proxy-cache"), ["hit"])
        self.assertEqual(
            h.getRawHeaders("x-proxy-cache-key"), first.headers.getRawHeaders("x-proxy-cache-key")
        )
        self.assertEqual(h.getRawHeaders("x-request-id"), ["req-1"])  # its own, not req-0
        self.assertEqual(first.headers.getRawHeaders("x-request-id"), ["req-0"])
        self.assertEqual(h.getRawHeaders("age"), ["5"])
        self.assertEqual(h.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(h.getRawHeaders("x-proxy"), ["llm-proxy"])
        self.assertEqual(h.getRawHeaders("access-control-allow-origin"), ["https://a"])
        received = h.getRawHeaders("x-proxy-received-at")[0]
        self.assertRegex(received, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
        self.assertEqual(self.metrics.counts["cache_hits"], 1)
        self.assertEqual(self.proxy.usage.hits, ["hash-of-token"])
        first_record, hit_record = self.proxy.records
        self.assertEqual(first_record.cache_status, "stored")
        self.assertEqual(hit_record.cache_status, "hit")
        self.assertEqual(hit_record.status, 200)
        self.assertEqual(hit_record.bytes_sent, len(body))

    def test_cut_stream_not_stored(self) -> None:
        chunks = [b"data: a\n\n"]
        self.answer = (200, hdrs({"Content-Type": "text/event-stream"}), chunks, True, False)
        opt_in = {"Cache-Control": "public, max-age=60"}
        first, _ = self.get("POST", headers=opt_in, data=b"{}")
        self.assertEqual(first.headers.getRawHeaders("x-cache-debug"), ["streaming-response"])
        self.get("POST", headers=opt_in, data=b"{}")
        self.assertEqual(self.upstream_calls, 2)
        self.assertEqual(self.metrics.counts["cache_stores"], 0)

    def test_conditional_hit_is_304(self) -> None:
        self.get()
        response, body = self.get(headers={"If-None-Match": '"v1"'})
        self.assertEqual(response.code, 304)
        self.assertEqual(body, b"")
        self.assertEqual(
            response.headers.getRawHeaders("cache-status"), ["llm-proxy; conditional-hit"]
        )
        self.assertEqual(response.headers.getRawHeaders("etag"), ['"v1"'])

    def test_head_hit_has_no_body(self) -> None:
        self.get()
        response, body = self.get("HEAD")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(response.headers.getRawHeaders("x-proxy-cache"), ["hit"])

    def test_stream_replayed_as_stream(self) -> None:
        chunks = [b"data: a\n\n", b"data: b\n\n", b"data: [DONE]\n\n"]
        self.answer = (200, hdrs({"Content-Type": "text/event-stream"}), chunks, True, True)
        opt_in = {"Cache-Control": "public, max-age=60"}
        first, body = self.get("POST", headers=opt_in, data=b"{}")
        self.assertEqual(body, b"".join(chunks))
        self.upstream_up = False
        second, body2 = self.get("POST", headers=opt_in, data=b"{}")
        self.assertEqual(body2, b"".join(chunks))
        self.assertEqual(second.headers.getRawHeaders("x-proxy-cache"), ["hit"])
        self.assertEqual(second.headers.getRawHeaders("content-type"), ["text/event-stream"])
        self.assertIsNone(second.headers.getRawHeaders("content-length"))
