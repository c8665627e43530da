"""
The behaviour every cache backend must show, written once against the
L{ResponseCache} facade; tests/test_cache.py (memory) and
tests/test_cache_redis.py (a real Redis) run it.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from llmproxy.cache import (
    BYPASS,
    CONDITIONAL_HIT,
    HIT,
    MISS,
    REVALIDATE,
    UNCACHEABLE,
    LookupResult,
    ResponseCache,
)
from llmproxy.cache.interface import ICacheBackend
from llmproxy.metrics import Metrics

PUBLIC = {"Cache-Control": "public, max-age=60", "Content-Type": "application/json"}


def hdrs(values: dict[str, str] | None = None) -> Headers:
    h = Headers()
    for k, v in (values or {}).items():
        h.addRawHeader(k.encode(), v.encode())
    return h


def header_dict(pairs: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode().lower(): v.decode() for k, v in pairs}


class CacheBehaviour:
    """Mixin: subclasses set C{make_backend(clock)} and are TestCases."""

    clock: Clock
    cache: ResponseCache
    metrics: Metrics

    def make_backend(self, clock: Clock) -> ICacheBackend:
        raise AssertionError("the subclass provides the backend")

    def make_cache(self, **kwargs: Any) -> ResponseCache:
        return ResponseCache(
            self.make_backend(self.clock), self.clock, metrics=self.metrics, **kwargs
        )

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.metrics = Metrics(self.clock, process_metrics=False)
        self.cache = self.make_cache()

    # -- helpers -------------------------------------------------------------------

    async def lookup(
        self,
        method: str = "GET",
        uri: str = "/v1/models",
        request: dict[str, str] | None = None,
        body: bytes | None = None,
        project: str | None = "p1",
        cache: ResponseCache | None = None,
    ) -> LookupResult:
        return await (cache or self.cache).lookup(method, uri, hdrs(request), body, project)

    async def fetch(
        self,
        method: str = "GET",
        uri: str = "/v1/models",
        request: dict[str, str] | None = None,
        body: bytes | None = None,
        project: str | None = "p1",
        status: int = 200,
        response: dict[str, str] | None = None,
        payload: bytes = b'{"data":[]}',
        cache: ResponseCache | None = None,
    ) -> tuple[LookupResult, dict[str, str], bool]:
        """A lookup then, unless it is a hit, the upstream answer stored as the proxy would."""
        cache = cache or self.cache
        result = await self.lookup(method, uri, request, body, project, cache)
        if result.served:
            return result, {}, False
        rh = hdrs(PUBLIC if response is None else response)
        plan = cache.plan(result, status, rh, streaming=False)
        stored = await cache.store(result, plan, status, rh, payload)
        return result, header_dict(plan.headers), stored

    # -- the shared behaviour ------------------------------------------------------

    async def test_store_then_hit(self) -> None:
        first, headers, stored = await self.fetch()
        self.assertEqual(first.outcome, MISS)
        self.assertTrue(stored)
        self.assertEqual(headers["cache-status"], "llm-proxy; stored")
        self.assertEqual(headers["x-proxy-cache"], "stored")
        self.assertEqual(len(headers["x-proxy-cache-key"]), 64)
        second = await self.lookup()
        self.assertEqual(second.outcome, HIT)
        assert second.entry is not None
        self.assertEqual(second.entry.body, b'{"data":[]}')
        self.assertEqual(second.entry.status, 200)
        self.assertEqual(second.key, headers["x-proxy-cache-key"])
        self.assertEqual(second.entry.header("content-type"), "application/json")
        self.assertEqual(self.metrics.counts["cache_hits"], 1)
        self.assertEqual(self.metrics.counts["cache_misses"], 1)
        self.assertEqual(self.metrics.counts["cache_stores"], 1)

    async def test_query_order_does_not_matter(self) -> None:
        await self.fetch(uri="/v1/models?b=2&a=1")
        self.assertEqual((await self.lookup(uri="/v1/models?a=1&b=2")).outcome, HIT)
        self.assertEqual((await self.lookup(uri="/v1/models?a=1")).outcome, MISS)

    async def test_no_directives_not_stored(self) -> None:
        _, headers, stored = await self.fetch(response={"Content-Type": "application/json"})
        self.assertFalse(stored)
        self.assertNotIn("cache-status", headers)
        self.assertEqual(headers["x-cache-debug"], "ttl-zero-ttl=0s-from-resp=false")
        self.assertEqual((await self.lookup()).outcome, MISS)
        self.assertEqual(self.metrics.counts["cache_misses"], 2)

    async def test_max_age_without_public_not_stored(self) -> None:
        _, headers, stored = await self.fetch(response={"Cache-Control": "max-age=60"})
        self.assertFalse(stored)
        self.assertEqual(headers["x-cache-debug"], "ttl-zero-ttl=0s-from-resp=false")

    async def test_client_forced_ttl(self) -> None:
        opt_in = {"Cache-Control": "public, max-age=30"}
        _, headers, stored = await self.fetch(request=opt_in, response={})
        self.assertTrue(stored)
        self.assertEqual(headers["cache-status"], "llm-proxy; stored (forced)")
        hit = await self.lookup()  # even without the request header
        self.assertEqual(hit.outcome, HIT)
        assert hit.entry is not None
        self.assertEqual(hit.entry.header("cache-control"), "public, max-age=30")
        self.clock.advance(31)
        self.assertEqual((await self.lookup()).outcome, MISS)

    async def test_private_never_stored(self) -> None:
        opt_in = {"Cache-Control": "public, max-age=30"}
        _, _, stored = await self.fetch(request=opt_in, response={"Cache-Control": "private"})
        self.assertFalse(stored)
        _, _, stored = await self.fetch(request=opt_in, response={"Cache-Control": "no-store"})
        self.assertFalse(stored)
        self.assertEqual((await self.lookup()).outcome, MISS)

    async def test_response_no_cache_not_stored(self) -> None:
        _, _, stored = await self.fetch(response={"Cache-Control": "public, max-age=60, no-cache"})
        self.assertFalse(stored)
        opt_in = {"Cache-Control": "public, max-age=30"}
        _, _, stored = await self.fetch(request=opt_in, response={"Cache-Control": "no-cache"})
        self.assertFalse(stored)

    async def test_error_status_not_stored(self) -> None:
        _, headers, stored = await self.fetch(status=500)
        self.assertFalse(stored)
        self.assertEqual(headers["x-cache-debug"], "status-not-cacheable")
        self.assertNotIn("cache-status", headers)

    async def test_s_maxage_wins(self) -> None:
        await self.fetch(response={"Cache-Control": "max-age=600, s-maxage=5"})
        self.clock.advance(6)
        self.assertEqual((await self.lookup()).outcome, MISS)

    async def test_post_needs_opt_in_and_keys_on_body(self) -> None:
        opt_in = {"Cache-Control": "public, max-age=60", "Content-Type": "application/json"}
        uri = "/v1/chat/completions"
        first, _, stored = await self.fetch("POST", uri, opt_in, b'{"a":1}', response={})
        self.assertTrue(stored)
        self.assertEqual(
            header_dict(first.upstream_headers())["x-body-hash"],
            hashlib.sha256(b'{"a":1}').hexdigest(),
        )
        self.assertEqual((await self.lookup("POST", uri, opt_in, b'{"a":1}')).outcome, HIT)
        self.assertEqual((await self.lookup("POST", uri, opt_in, b'{"a":2}')).outcome, MISS)
        plain = await self.lookup("POST", uri, {}, b'{"a":1}')
        self.assertEqual(plain.outcome, UNCACHEABLE)
        self.assertEqual(plain.upstream_headers(), [])

    async def test_other_methods_not_cached(self) -> None:
        result, headers, stored = await self.fetch("DELETE", "/v1/files/x")
        self.assertEqual(result.outcome, UNCACHEABLE)
        self.assertFalse(stored)
        self.assertEqual(headers["cache-status"], "llm-proxy; miss")

    async def test_projects_are_isolated(self) -> None:
        await self.fetch(project="alpha", payload=b"alpha's answer")
        self.assertEqual((await self.lookup(project="alpha")).outcome, HIT)
        other = await self.lookup(project="beta")
        self.assertEqual(other.outcome, MISS)
        self.assertIsNone(other.entry)

    async def test_shared_mode_crosses_projects(self) -> None:
        shared = self.make_cache(shared=True)
        await self.fetch(project="alpha", cache=shared)
        hit = await self.lookup(project="beta", cache=shared)
        self.assertEqual(hit.outcome, HIT)

    async def test_vary_keeps_every_variant_reachable(self) -> None:
        response = {"Cache-Control": "public, max-age=60", "Vary": "Accept-Language, Origin"}
        en = {"Accept-Language": "en", "Origin": "https://a.example"}
        de = {"Accept-Language": "de", "Origin": "https://a.example"}
        await self.fetch(request=en, response=response, payload=b"hello")
        self.assertEqual((await self.lookup(request=de)).outcome, MISS)
        await self.fetch(request=de, response=response, payload=b"hallo")
        hit_en = await self.lookup(request=en)
        hit_de = await self.lookup(request=de)
        assert hit_en.entry is not None and hit_de.entry is not None
        self.assertEqual((hit_en.entry.body, hit_de.entry.body), (b"hello", b"hallo"))
        self.assertEqual(hit_en.key, hit_de.key)
        other_origin = await self.lookup(request={"Accept-Language": "en", "Origin": "https://b"})
        self.assertEqual(other_origin.outcome, MISS)

    async def test_vary_star_not_stored(self) -> None:
        _, _, stored = await self.fetch(
            response={"Cache-Control": "public, max-age=60", "Vary": "*"}
        )
        self.assertFalse(stored)

    async def test_conditional_requests(self) -> None:
        await self.fetch(
            response={
                "Cache-Control": "public, max-age=60",
                "ETag": '"v1"',
                "Last-Modified": "Tue, 01 Jan 2030 00:00:00 GMT",
            }
        )
        inm = await self.lookup(request={"If-None-Match": '"v1"'})
        self.assertEqual(inm.outcome, CONDITIONAL_HIT)
        self.assertEqual((await self.lookup(request={"If-None-Match": '"v2"'})).outcome, HIT)
        ims = await self.lookup(request={"If-Modified-Since": "Wed, 02 Jan 2030 00:00:00 GMT"})
        self.assertEqual(ims.outcome, CONDITIONAL_HIT)
        old = await self.lookup(request={"If-Modified-Since": "Mon, 31 Dec 2029 00:00:00 GMT"})
        self.assertEqual(old.outcome, HIT)
        self.assertEqual(self.metrics.counts["cache_hits"], 4)

    async def test_no_cache_goes_upstream(self) -> None:
        await self.fetch()
        result = await self.lookup(request={"Cache-Control": "no-cache"})
        self.assertEqual(result.outcome, REVALIDATE)
        self.assertFalse(result.served)

    async def test_head_served_from_get(self) -> None:
        await self.fetch()
        self.assertEqual((await self.lookup("HEAD")).outcome, HIT)

    async def test_bypass_for_entries_not_shareable(self) -> None:
        # An entry without a shared-cache directive (stored by another
        # instance's older rules) is never replayed to an authorised request.
        from llmproxy.cache.entry import CachedResponse

        miss = await self.lookup()
        assert miss.key is not None
        now = self.clock.seconds()
        entry = CachedResponse(
            primary=miss.key,
            variant="0",
            method="GET",
            url="/v1/models",
            scope="project:p1",
            status=200,
            headers=(("Cache-Control", "max-age=60"),),
            chunks=(b"x",),
            streamed=False,
            vary=(),
            stored_at=now,
            expires_at=now + 60,
        )
        self.assertTrue(await self.cache.backend.put(entry, now))
        result = await self.lookup()
        self.assertEqual(result.outcome, BYPASS)
        self.assertEqual(
            header_dict(result.response_headers())["cache-status"], "llm-proxy; bypass"
        )
        self.assertEqual(self.metrics.counts["cache_bypass"], 1)

    async def test_object_cap(self) -> None:
        cache = self.make_cache(max_object_bytes=10)
        response = dict(PUBLIC, **{"Content-Length": "11"})
        _, headers, stored = await self.fetch(response=response, payload=b"x" * 11, cache=cache)
        self.assertFalse(stored)
        self.assertEqual(headers["x-cache-debug"], "object-too-large")
        _, _, stored = await self.fetch(payload=b"x" * 11, cache=cache)  # length unknown
        self.assertFalse(stored)
        self.assertEqual((await self.lookup(cache=cache)).outcome, MISS)

    # -- streams -----------------------------------------------------------------------

    async def stream(
        self,
        cache: ResponseCache,
        chunks: list[bytes],
        end: str = "finish",
        request: dict[str, str] | None = None,
    ) -> bool:
        opt_in = {"Cache-Control": "public, max-age=60"} if request is None else request
        body = b'{"stream":true}'
        result = await self.lookup("POST", "/v1/chat/completions", opt_in, body, cache=cache)
        rh = hdrs({"Content-Type": "text/event-stream"})
        plan = cache.plan(result, 200, rh, streaming=True)
        capture = cache.capture(result, plan, 200, rh)
        if capture is None:
            return False
        self.assertEqual(header_dict(plan.headers)["x-cache-debug"], "streaming-response")
        for c in chunks:
            capture.write(c)
        if end == "finish":
            return await capture.finish()
        capture.abort(end)
        return await capture.finish()

    async def stream_lookup(self, cache: ResponseCache) -> LookupResult:
        return await self.lookup(
            "POST",
            "/v1/chat/completions",
            {"Cache-Control": "public, max-age=60"},
            b'{"stream":true}',
            cache=cache,
        )

    async def test_completed_stream_replayed_as_stream(self) -> None:
        cache = self.make_cache(stream_responses=True)
        chunks = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
        self.assertTrue(await self.stream(cache, chunks))
        hit = await self.stream_lookup(cache)
        self.assertEqual(hit.outcome, HIT)
        assert hit.entry is not None
        self.assertTrue(hit.entry.streamed)
        self.assertEqual(list(hit.entry.chunks), chunks)

    async def test_cut_or_oversized_streams_never_stored(self) -> None:
        cache = self.make_cache(stream_responses=True, max_object_bytes=20)
        self.assertFalse(await self.stream(cache, [b"data: 1\n\n"], end="upstream-cut"))
        self.assertFalse(await self.stream(cache, [b"data: 1\n\n"], end="client-gone"))
        self.assertFalse(await self.stream(cache, [b"data: 1234567890\n\n"] * 3))
        self.assertEqual((await self.stream_lookup(cache)).outcome, MISS)

    async def test_streams_need_the_setting_and_opt_in(self) -> None:
        self.assertFalse(await self.stream(self.cache, [b"data: 1\n\n"]))
        cache = self.make_cache(stream_responses=True)
        self.assertFalse(
            await self.stream(cache, [b"data: 1\n\n"], request={"Cache-Control": "no-cache"})
        )

    # -- purge -----------------------------------------------------------------------------

    async def test_purge_method_and_url_everywhere(self) -> None:
        opt_in = {"Cache-Control": "public, max-age=60"}
        chat = "/v1/chat/completions"
        await self.fetch("POST", chat, opt_in, b"one", project="alpha", response={})
        await self.fetch("POST", chat, opt_in, b"two", project="beta", response={})
        await self.fetch(project="alpha")
        await self.fetch(project="beta")
        await self.fetch(uri="/v1/models/gpt")
        self.assertEqual(await self.cache.purge("post", "http://proxy.example" + chat), 2)
        self.assertEqual((await self.lookup("POST", chat, opt_in, b"one", "alpha")).outcome, MISS)
        self.assertEqual(await self.cache.purge("GET", "/v1/models"), 2)
        self.assertEqual((await self.lookup(project="beta")).outcome, MISS)
        self.assertEqual((await self.lookup(uri="/v1/models/gpt")).outcome, HIT)
        self.assertEqual(await self.cache.purge("GET", "/v1/models"), 0)

    async def test_purge_prefix(self) -> None:
        await self.fetch(uri="/v1/models")
        await self.fetch(uri="/v1/models/gpt-4?x=1")
        await self.fetch(uri="/v1/files")
        response = {"Cache-Control": "public, max-age=60", "Vary": "Accept"}
        await self.fetch(uri="/v1/models/v", request={"Accept": "a"}, response=response)
        await self.fetch(uri="/v1/models/v", request={"Accept": "b"}, response=response)
        self.assertEqual(await self.cache.purge_prefix("/v1/models"), 4)
        self.assertEqual((await self.lookup(uri="/v1/models")).outcome, MISS)
        self.assertEqual((await self.lookup(uri="/v1/files")).outcome, HIT)
        self.assertEqual(await self.cache.purge_prefix("zz"), 0)
        self.assertEqual(await self.cache.purge_prefix("/v1/models"), 0)
