"""
L{ResponseCache}: what the proxy calls. One lookup per request before it
goes upstream, one store plan when the upstream headers arrive, and a
L{StreamCapture} fed with the body that stores the entry only when the
body ended cleanly. Backend trouble never fails a call: a lookup becomes a
miss and a store is skipped, both counted.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from llmproxy.cache import policy
from llmproxy.cache.entry import CachedResponse
from llmproxy.cache.interface import CacheUnavailable, ICacheBackend

log = Logger()

HIT = "hit"
CONDITIONAL_HIT = "conditional-hit"
MISS = "miss"
BYPASS = "bypass"
#: The client asked for a fresh answer (C{no-cache}, C{max-age=0}).
REVALIDATE = "revalidate"
#: Not a cacheable request (method, POST without opt-in, large body).
UNCACHEABLE = "uncacheable"

CACHE_STATUS = b"Cache-Status"
X_PROXY_CACHE = b"X-Proxy-Cache"
X_PROXY_CACHE_KEY = b"X-Proxy-Cache-Key"
X_CACHE_DEBUG = b"X-Cache-Debug"
X_BODY_HASH = b"X-Body-Hash"

HeaderList = list[tuple[bytes, bytes]]


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


@attrs.frozen
class LookupResult:
    """
    @ivar outcome: L{HIT}, L{CONDITIONAL_HIT}, L{MISS}, L{BYPASS},
        L{REVALIDATE} or L{UNCACHEABLE}.
    @ivar key: the primary key (64 hex), None for L{UNCACHEABLE}.
    @ivar entry: the entry to replay for the two hit outcomes.
    @ivar degraded: the backend was unavailable (the miss is not real).
    """

    outcome: str
    method: str
    url: str
    scope: str
    request_headers: Headers
    key: str | None = None
    digest: str | None = None
    entry: CachedResponse | None = None
    degraded: bool = False

    @property
    def served(self) -> bool:
        """Answer from the cache (L{llmproxy.cache.serve.serve_cached}); no upstream call."""
        return self.outcome in (HIT, CONDITIONAL_HIT)

    def upstream_headers(self) -> HeaderList:
        """Headers to add to the upstream request (C{X-Body-Hash} for opted-in POSTs)."""
        if self.method == "POST" and self.digest is not None:
            return [(X_BODY_HASH, self.digest.encode("ascii"))]
        return []

    def response_headers(self) -> HeaderList:
        """Headers the lookup itself puts on a forwarded answer (bypass only)."""
        if self.outcome == BYPASS and self.key is not None:
            return [
                (CACHE_STATUS, b"llm-proxy; bypass"),
                (X_PROXY_CACHE, b"bypass"),
                (X_PROXY_CACHE_KEY, self.key.encode("ascii")),
            ]
        return []


@attrs.frozen
class StorePlan:
    """
    What to do with an upstream answer, decided when its headers arrive.

    @ivar headers: cache headers for the response to the client.
    @ivar capture: feed the body to a L{StreamCapture} (see L{ResponseCache.capture}).
    """

    decision: policy.StoreDecision
    headers: HeaderList
    capture: bool
    streaming: bool


def disabled_headers(streaming: bool) -> HeaderList:
    """What a response carries when the cache is off (as the Go llm-proxy)."""
    return [] if streaming else [(CACHE_STATUS, b"llm-proxy; miss")]


class ResponseCache:
    """
    @param backend: where entries live (memory or Redis).
    @param shared: C{HTTP_CACHE_SHARED}: one scope for every project;
        otherwise a project only ever sees its own entries.
    @param stream_responses: C{HTTP_CACHE_STREAM_RESPONSES}.
    @param max_object_bytes: bodies larger than this are never stored.
    @param default_ttl: TTL of shared-cacheable answers without max-age.
    @param metrics: an L{llmproxy.metrics.Metrics} (or None).
    """

    def __init__(
        self,
        backend: ICacheBackend,
        clock: IReactorTime,
        *,
        shared: bool = False,
        stream_responses: bool = False,
        max_object_bytes: int = 1024 * 1024,
        default_ttl: float = 0,
        metrics: Any = None,
    ) -> None:
        self.backend = backend
        self.clock = clock
        self.shared = shared
        self.stream_responses = stream_responses
        self.max_object_bytes = max_object_bytes
        self.default_ttl = int(default_ttl)
        self.metrics = metrics

    @classmethod
    def from_config(cls, config: Any, clock: IReactorTime, metrics: Any = None) -> ResponseCache:
        """The cache C{config} describes (call only with C{http_cache_enabled})."""
        backend: ICacheBackend
        if config.http_cache_backend == "redis":
            from llmproxy.cache.redis import RedisCacheBackend
            from llmproxy.redisconn import RedisAddress, connect

            try:
                if config.redis_cache_url:
                    address = RedisAddress.from_url(config.redis_cache_url)
                else:
                    address = RedisAddress.from_config(config)
            except ValueError as e:
                log.error("REDIS_CACHE_URL is not usable ({error}); caching in memory", error=e)
                return cls._memory(config, clock, metrics)
            pool = connect(
                address,
                poolsize=config.redis_cache_pool_size,
                connect_timeout=config.redis_cache_timeout,
            )
            backend = RedisCacheBackend(
                pool,
                clock,
                prefix=config.redis_cache_key_prefix,
                timeout=config.redis_cache_timeout,
                scan_count=config.redis_scan_count,
                metrics=metrics,
            )
        else:
            return cls._memory(config, clock, metrics)
        return cls._with(backend, config, clock, metrics)

    @classmethod
    def _memory(cls, config: Any, clock: IReactorTime, metrics: Any) -> ResponseCache:
        from llmproxy.cache.memory import MemoryCacheBackend

        backend = MemoryCacheBackend(
            clock, config.http_cache_max_entries, config.http_cache_max_bytes
        )
        return cls._with(backend, config, clock, metrics)

    @classmethod
    def _with(
        cls, backend: ICacheBackend, config: Any, clock: IReactorTime, metrics: Any
    ) -> ResponseCache:
        return cls(
            backend,
            clock,
            shared=config.http_cache_shared,
            stream_responses=config.http_cache_stream_responses,
            max_object_bytes=config.http_cache_max_object_bytes,
            default_ttl=config.http_cache_default_ttl,
            metrics=metrics,
        )

    # -- lookup ------------------------------------------------------------------

    def lookup(
        self,
        method: bytes | str,
        uri: bytes | str,
        headers: Headers,
        body: bytes | None,
        project_id: str | None,
    ) -> defer.Deferred[LookupResult]:
        """
        Look the request up; never fails. Call it after the token and the
        project guard passed (the scope is the project), before the request
        is counted or sent upstream.
        """
        method_s = _text(method).upper()
        if not policy.lookup_eligible(method_s, headers, body):
            # The common case (a POST without opt-in): answer without a
            # coroutine round trip.
            return defer.succeed(self.uncacheable(method_s, uri, headers, project_id))
        return defer.ensureDeferred(self._lookup(method_s, _text(uri), headers, body, project_id))

    def needs_lookup(self, method: bytes | str, headers: Headers) -> bool:
        """
        False when L{lookup} would answer L{UNCACHEABLE} whatever the body
        (a method other than GET/HEAD, or a POST without the client's
        opt-in): the caller may then use L{uncacheable} and skip reading the
        body. Has no side effect.
        """
        method_s = _text(method).upper()
        if method_s in ("GET", "HEAD"):
            return True
        return method_s == "POST" and policy.client_forced_ttl(headers) > 0

    def uncacheable(
        self, method: bytes | str, uri: bytes | str, headers: Headers, project_id: str | None
    ) -> LookupResult:
        """L{lookup}'s answer, at once, for a request L{needs_lookup} refused."""
        url = policy.normalise_url(_text(uri))
        scope = policy.scope_for(project_id, self.shared)
        self._count("cache_miss")
        return LookupResult(
            UNCACHEABLE,  # type: ignore[arg-type]
            method=_text(method).upper(),
            url=url,
            scope=scope,
            request_headers=headers,
        )

    async def _lookup(
        self, method: str, uri: str, headers: Headers, body: bytes | None, project_id: str | None
    ) -> LookupResult:
        url = policy.normalise_url(uri)
        scope = policy.scope_for(project_id, self.shared)
        base = {"method": method, "url": url, "scope": scope, "request_headers": headers}
        digest = policy.body_digest(body) if method == "POST" else None
        key = policy.primary_key(scope, method, url, digest)
        base.update(key=key, digest=digest)
        if policy.wants_revalidation(headers):
            return LookupResult(REVALIDATE, **base)  # type: ignore[arg-type]
        try:
            variants = await self.backend.get(key)
        except CacheUnavailable:
            self._count("cache_error")
            self._count("cache_miss")
            return LookupResult(MISS, degraded=True, **base)  # type: ignore[arg-type]
        except Exception:
            log.failure("cache lookup failed")
            self._count("cache_error")
            self._count("cache_miss")
            return LookupResult(MISS, degraded=True, **base)  # type: ignore[arg-type]
        now = self.clock.seconds()
        matching = [e for e in variants if e.fresh(now) and policy.vary_matches(e.vary, headers)]
        if not matching:
            self._count("cache_miss")
            return LookupResult(MISS, **base)  # type: ignore[arg-type]
        entry = max(matching, key=lambda e: e.stored_at)
        if not policy.is_shared_cacheable(entry.header("cache-control")):
            self._count("cache_bypass")
            return LookupResult(BYPASS, **base)  # type: ignore[arg-type]
        self._count("cache_hit")
        outcome = HIT
        if policy.not_modified(
            method, headers, entry.header("etag"), entry.header("last-modified")
        ):
            outcome = CONDITIONAL_HIT
        return LookupResult(outcome, entry=entry, **base)  # type: ignore[arg-type]

    # -- storing -----------------------------------------------------------------

    def plan(
        self, lookup: LookupResult, status: int, response_headers: Headers, streaming: bool
    ) -> StorePlan:
        """
        Decide, when the upstream headers arrive, whether the answer will be
        stored and which cache headers the client sees. C{streaming}: the
        answer is C{text/event-stream}.
        """
        decision = policy.decide_store(
            lookup.method,
            lookup.request_headers,
            status,
            response_headers,
            streaming=streaming,
            stream_caching=self.stream_responses,
            default_ttl=self.default_ttl,
        )
        if lookup.degraded and decision.store:
            # The backend did not answer the lookup: nothing is stored either,
            # and the client is not told otherwise.
            decision = policy.StoreDecision(0, debug="cache-unavailable", miss_header=True)
        headers: HeaderList = list(lookup.response_headers())
        if decision.store and lookup.key is not None:
            length = _content_length(response_headers)
            request_cc = policy.cache_control(
                policy.header(lookup.request_headers, "cache-control")
            )
            if lookup.method == "HEAD":
                decision = policy.StoreDecision(0, debug="head-response-not-stored")
            elif "no-store" in request_cc:
                decision = policy.StoreDecision(0, debug="request-no-store")
            elif length is not None and length > self.max_object_bytes:
                decision = policy.StoreDecision(0, debug="object-too-large")
        key = (lookup.key or "").encode("ascii")
        if decision.store and lookup.key is not None:
            if streaming:
                headers += [
                    (CACHE_STATUS, b"llm-proxy; miss"),
                    (X_PROXY_CACHE_KEY, key),
                    (X_CACHE_DEBUG, b"streaming-response"),
                ]
            else:
                status_value = (
                    b"llm-proxy; stored (forced)" if decision.forced else b"llm-proxy; stored"
                )
                headers += [
                    (CACHE_STATUS, status_value),
                    (X_PROXY_CACHE, b"stored"),
                    (X_PROXY_CACHE_KEY, key),
                ]
            return StorePlan(decision, headers, capture=True, streaming=streaming)
        if decision.miss_header:
            headers.append((CACHE_STATUS, b"llm-proxy; miss"))
        if decision.debug:
            headers.append((X_CACHE_DEBUG, decision.debug.encode("latin-1")))
        return StorePlan(decision, headers, capture=False, streaming=streaming)

    def capture(
        self, lookup: LookupResult, plan: StorePlan, status: int, response_headers: Headers
    ) -> StreamCapture | None:
        """A capture for the body when C{plan.capture}, else None."""
        if not plan.capture or lookup.key is None:
            return None
        return StreamCapture(self, lookup, plan, status, response_headers)

    def store(
        self,
        lookup: LookupResult,
        plan: StorePlan,
        status: int,
        response_headers: Headers,
        body: bytes,
    ) -> defer.Deferred[bool]:
        """Store a body that is already complete (fires False when not stored)."""
        capture = self.capture(lookup, plan, status, response_headers)
        if capture is None:
            return defer.succeed(False)
        capture.write(body)
        return capture.finish()

    def _put(self, entry: CachedResponse) -> defer.Deferred[bool]:
        async def put() -> bool:
            try:
                stored = await self.backend.put(entry, self.clock.seconds())
            except CacheUnavailable:
                self._count("cache_error")
                return False
            except Exception:
                log.failure("cache store failed")
                self._count("cache_error")
                return False
            if stored:
                self._count("cache_store")
            return bool(stored)

        return defer.ensureDeferred(put())

    # -- management ----------------------------------------------------------------

    def purge(self, method: str, url: str) -> defer.Deferred[int]:
        """Entries removed for C{method} and C{url} (every body, scope and variant)."""
        return self.backend.purge(method.upper(), policy.normalise_url(url))

    def purge_prefix(self, prefix: str) -> defer.Deferred[int]:
        """Entries removed whose normalised URL starts with C{prefix}."""
        if prefix.startswith(("http://", "https://")):
            prefix = policy.normalise_url(prefix)
        return self.backend.purge_prefix(prefix)

    def ping(self) -> defer.Deferred[Any]:
        return self.backend.ping()

    def close(self) -> defer.Deferred[None]:
        return self.backend.close()

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name)()


class CacheService(service.Service):
    """Closes the cache backend (its Redis pool) when the daemon stops."""

    name = "response-cache"

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    def stopService(self) -> Any:
        super().stopService()
        return self.cache.close()


class StreamCapture:
    """
    Collects an upstream body while it is relayed. Call L{write} per chunk,
    L{finish} when the body ended cleanly, L{abort} when it was cut, failed
    or the client left. Only a finished body within C{max_object_bytes} is
    stored; one that grew past the cap is dropped at once.
    """

    def __init__(
        self,
        cache: ResponseCache,
        lookup: LookupResult,
        plan: StorePlan,
        status: int,
        response_headers: Headers,
    ) -> None:
        self.cache = cache
        self.lookup = lookup
        self.plan = plan
        self.status = status
        self.headers = policy.stored_headers(
            response_headers, plan.decision.ttl if plan.decision.forced else None
        )
        self.vary = policy.vary_names(response_headers) or ()
        self.limit = cache.max_object_bytes
        self.chunks: list[bytes] = []
        self.size = 0
        self.dropped: str | None = None
        self.done = False

    def write(self, chunk: bytes) -> None:
        if self.dropped is not None or self.done or not chunk:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.abort("too-large")
            return
        self.chunks.append(chunk)

    def abort(self, reason: str = "aborted") -> None:
        """The body will never be stored."""
        if self.dropped is None:
            self.dropped = reason
        self.chunks = []

    def finish(self) -> defer.Deferred[bool]:
        """Store the body (fires True when stored); later calls do nothing."""
        if self.done or self.dropped is not None:
            self.done = True
            return defer.succeed(False)
        self.done = True
        lookup = self.lookup
        assert lookup.key is not None
        selection = policy.vary_selection(self.vary, lookup.request_headers)
        now = self.cache.clock.seconds()
        chunks = tuple(self.chunks) if self.plan.streaming else (b"".join(self.chunks),)
        self.chunks = []
        entry = CachedResponse(
            primary=lookup.key,
            variant=policy.variant_id(selection),
            method=policy.index_method(lookup.method),
            url=lookup.url,
            scope=lookup.scope,
            status=self.status,
            headers=self.headers,
            chunks=chunks,
            streamed=self.plan.streaming,
            vary=selection,
            stored_at=now,
            expires_at=now + self.plan.decision.ttl,
            forced=self.plan.decision.forced,
        )
        return self.cache._put(entry)


def _content_length(headers: Headers) -> int | None:
    value = headers.getRawHeaders(b"content-length")
    if not value:
        return None
    try:
        return int(value[0])
    except ValueError:
        return None
