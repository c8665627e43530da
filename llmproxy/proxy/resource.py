"""
The proxy resource for C{/v1/...}: breaker, preflight, policy, token,
project guard, then a streaming forward through the shared upstream pool.

It keeps the type of Twisted's C{ReverseProxyResource} but none of its
transport: that one speaks HTTP/1.0 without TLS, collapses repeated headers,
has no backpressure and never cancels the upstream when the client leaves.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from llmproxy.cache.facade import LookupResult, ResponseCache
from llmproxy.cache.proxying import answer_from_cache, prepare_store
from llmproxy.metrics import overhead_header
from llmproxy.proxy.breaker import CircuitBreaker
from llmproxy.proxy.forward import (
    CLIENT_ABORTED,
    BodyRelay,
    IBodyFilter,
    IBodyTap,
    TapFactory,
    abort_client,
    body_length,
    describe_failure,
    is_body_filter,
    read_prefix,
    request_body,
    response_length,
)
from llmproxy.proxy.headers import (
    PROXY_NAME,
    copy_response_headers,
    is_event_stream,
    replace_headers,
    rfc3339_ns,
    unix_ns,
    upstream_request_headers,
)
from llmproxy.proxy.record import IRequestObserver, RequestRecord
from llmproxy.proxy.service import UpstreamClientService
from llmproxy.ratelimit.http import apply_rate_limit_headers, rate_limit_refusal
from llmproxy.ratelimit.policy import RateLimitPolicy
from llmproxy.store.records import Token
from llmproxy.tokens.validator import Rejection, TokenValidator, extract_bearer
from llmproxy.web.errors import json_error
from llmproxy.web.headerstore import set_clean
from llmproxy.web.site import client_ip, new_request_id

with warnings.catch_warnings():
    # twisted.web.proxy imports the deprecated HTTPClient; we only keep the
    # ReverseProxyResource type, never its HTTP/1.0 client.
    warnings.filterwarnings(
        "ignore",
        message=r"twisted\.web\.http\.HTTPClient was deprecated",
        category=DeprecationWarning,
    )
    from twisted.web.proxy import ReverseProxyResource

log = Logger()

#: Status recorded when the client went away before an answer.
CLIENT_CLOSED = 499


@attrs.frozen(slots=False)
class Upstream:
    """Where a provider lives and how long to wait for its response headers."""

    name: str
    base_url: str
    response_header_timeout: float = 30.0

    @property
    def _split(self) -> Any:
        return urlsplit(self.base_url)

    @property
    def scheme(self) -> str:
        return str(self._split.scheme or "https").lower()

    @property
    def host(self) -> str:
        return str(self._split.hostname or "")

    @property
    def port(self) -> int:
        port = self._split.port
        return int(port) if port else (443 if self.scheme == "https" else 80)


@attrs.frozen
class PolicyDenial:
    status: int
    error: str
    code: str
    description: str = ""


class Denial(Protocol):
    """What a policy refusal carries (L{llmproxy.proxy.policy.PolicyError} has it)."""

    @property
    def status(self) -> int: ...

    @property
    def error(self) -> str: ...

    @property
    def code(self) -> str: ...

    @property
    def description(self) -> str: ...


class RequestPolicy(Protocol):
    """The provider's request policy (allowed methods and paths, parameters, CORS)."""

    def preflight(self, request: Request) -> None:
        """Answer an OPTIONS preflight: status and headers (the body is empty)."""

    def check(self, request: Request) -> Denial | None:
        """Refuse a request before any token check, or None to let it through."""

    def cors_headers(self, request: Request) -> None:
        """Add the CORS echo headers to any answer (when the request had Origin)."""


class OpenPolicy:
    """Every method and path allowed, no CORS: what runs without a policy."""

    def preflight(self, request: Request) -> None:
        request.setResponseCode(204)

    def check(self, request: Request) -> Denial | None:
        return None

    def cors_headers(self, request: Request) -> None:
        pass


#: C{(body, content_type, uri) -> (new_body, changed)}.
BodyRewriter = Callable[[bytes, "str | None", str], "tuple[bytes, bool]"]

#: Largest request body offered to a L{BodyRewriter}.
REWRITE_LIMIT = 4 * 1024 * 1024

#: Called for every refused token: C{(request, rejection, presented_token)}.
AuditHook = Callable[[Request, Rejection, "str | None"], None]


class _Exchange:
    """State of one proxied request, shared with the disconnect callback."""

    def __init__(self) -> None:
        self.client_gone = False
        self.timed_out = False
        self.pending: defer.Deferred[Any] | None = None
        self.relay: BodyRelay | None = None

    def header_timeout(self) -> None:
        if self.pending is not None:
            self.timed_out = True
            self.pending.cancel()

    def lost(self, _: Failure) -> None:
        self.client_gone = True
        if self.relay is not None:
            self.relay.client_gone()
        elif self.pending is not None:
            pending, self.pending = self.pending, None
            pending.cancel()


class _Discard(TwistedProtocol):
    """Takes an upstream body nobody will read, and closes it at once."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


class ProxyResource(ReverseProxyResource):
    """
    Forwards C{/v1/...} to one provider.

    @param reactor: timers and the clock for timeouts.
    @param upstream: the provider's base URL and header timeout.
    @param client: the shared upstream connection pool and concurrency cap.
    @param validator: token, project and provider-key checks.
    @param breaker: the provider's circuit breaker.
    @param policy: see L{RequestPolicy}; L{OpenPolicy} when None.
    @param observers: L{IRequestObserver}s, told when a request starts and ends.
    @param taps: factories of per-chunk L{IBodyTap}s for each upstream body.
    @param audit: told about every refused token (obfuscate before storing).
    @param cache: the response cache, consulted after the token and project
        checks; None when caching is off.
    @param rate_limits: global / per-IP / per-token request rate limits,
        checked once the token is known; None when none is configured.
    @param prepare_body: may rewrite a POST body before it goes upstream:
        C{(body, content_type, uri) -> (body, changed)}; C{changed} is kept
        as C{record.usage_injected} (asking a stream for its usage chunk).
    @param idle_timeout: longest silence between two upstream body chunks.
    """

    isLeaf = True

    def __init__(
        self,
        *,
        reactor: Any,
        upstream: Upstream,
        client: UpstreamClientService,
        validator: TokenValidator,
        breaker: CircuitBreaker | None = None,
        policy: RequestPolicy | None = None,
        observers: Sequence[IRequestObserver] = (),
        taps: Sequence[TapFactory] = (),
        audit: AuditHook | None = None,
        cache: ResponseCache | None = None,
        rate_limits: RateLimitPolicy | None = None,
        prepare_body: BodyRewriter | None = None,
        enforce_project_active: bool = True,
        idle_timeout: float = 300.0,
        max_request_capture: int = 65536,
        max_response_capture: int = 262144,
        cooperator: Cooperator | None = None,
    ) -> None:
        super().__init__(upstream.host, upstream.port, b"", reactor)
        self.clock: IReactorTime = reactor
        self.upstream = upstream
        self.client = client
        self.validator = validator
        self.breaker = breaker or CircuitBreaker(reactor, name=upstream.name)
        self.policy: RequestPolicy = policy or OpenPolicy()
        self.observers = list(observers)
        self.taps = list(taps)
        self.audit = audit
        self.cache = cache
        self.prepare_body = prepare_body
        self.rate_limits = rate_limits if rate_limits is not None and rate_limits.enabled else None
        self.enforce_project_active = enforce_project_active
        self.idle_timeout = idle_timeout
        self.max_request_capture = max_request_capture
        self.max_response_capture = max_response_capture
        self.cooperator = cooperator
        self._origin = client.origin(upstream.scheme, upstream.host, upstream.port)

    # -- entry point -----------------------------------------------------------------------

    def render(self, request: Request) -> Any:  # type: ignore[override]
        if not self.breaker.allow():
            # No event and no upstream call, as in the Go llm-proxy, but the
            # answer has its request id like every other one.
            request.setHeader(b"X-Request-ID", new_request_id().encode())
            return json_error(
                request, 503, "Upstream unavailable (circuit breaker open)", code="circuit_open"
            )
        record = self._new_record(request)
        self._notify("request_started", record)
        if request.method == b"OPTIONS":
            self.policy.preflight(request)
            self._finish(request, record, b"")
            return NOT_DONE_YET
        try:
            denial = self.policy.check(request)
        except Exception:
            log.failure("request policy failed")
            record.error_kind = "internal"
            self._error(request, record, 500, "Internal server error", "internal_error")
            return NOT_DONE_YET
        if denial is not None:
            record.error_kind = "policy"
            request.setHeader(b"X-Request-ID", record.request_id.encode())
            self._error(
                request, record, denial.status, denial.error, denial.code, denial.description
            )
            return NOT_DONE_YET
        exchange = _Exchange()
        if hasattr(request, "on_connection_lost"):
            request.on_connection_lost = exchange.lost
        else:
            request.notifyFinish().addErrback(exchange.lost)
        try:
            handled = self._proxy_now(request, record, exchange)
        except Exception:
            self._crashed(Failure(), request, record)
            return NOT_DONE_YET
        if not handled:
            d = defer.ensureDeferred(self._proxy(request, record, exchange))
            d.addErrback(self._crashed, request, record)
        return NOT_DONE_YET

    def _new_record(self, request: Request) -> RequestRecord:
        rid = new_request_id()
        request.request_id = rid  # type: ignore[attr-defined]
        ip = client_ip(request)
        request.client_ip = ip  # type: ignore[attr-defined]
        record = RequestRecord(
            request_id=rid,
            method=request.method.decode("latin-1"),
            path=request.uri.split(b"?", 1)[0].decode("utf-8", "replace"),
            received_at=time.monotonic(),
            received_at_wall=time.time(),
            client_ip=ip,
            provider=self.upstream.name,
        )
        record.capture = self._recording()
        if record.capture:
            record.request_body = read_prefix(request.content, self.max_request_capture)
        record.request_size = body_length(request.content)
        return record

    def _recording(self) -> bool:
        """
        Whether some observer reads the bodies, headers, model and usage of
        a record (C{wants_bodies}, True unless an observer says otherwise):
        when none does, they are neither copied nor parsed.
        """
        for observer in self.observers:
            if getattr(observer, "wants_bodies", True):
                return True
        return False

    # -- the proxied path --------------------------------------------------------------------

    def _proxy_now(self, request: Request, record: RequestRecord, exchange: _Exchange) -> bool:
        """
        The common case without a coroutine: token and project cached, no
        rate limit, no quota, a request the response cache need not look up
        and a free upstream slot. Checks, counts and refusals happen in the
        same order and with the same effects as in L{_proxy}. Returns False,
        having changed nothing, when L{_proxy} has to take the request.
        """
        if self.rate_limits is not None:
            return False
        validator = self.validator
        try:
            presented = extract_bearer(request.getHeader(b"authorization"))
        except Rejection:
            return False
        token = validator.cached_token(presented)
        if token is None:
            return False
        project = None
        if self.enforce_project_active:
            project = validator.cached_project(token.project_id, validator.project_cache_ttl)
            if project is None:
                return False
        key_project = validator.cached_project(token.project_id, validator.api_key_cache_ttl)
        if key_project is None or not validator.counts_synchronously(token):
            return False
        cache = self.cache
        if cache is not None and cache.needs_lookup(request.method, request.requestHeaders):
            return False
        semaphore = self.client.semaphore(self.upstream.name)
        if semaphore.tokens <= 0 or semaphore.waiting:
            return False
        # Committed: from here on this request is answered on this path.
        lookup: LookupResult | None = None
        try:
            validator.validate_cached(token)
            _identify(record, token)
            if project is not None:
                validator.check_cached_project(token, project)
            if cache is not None:
                try:
                    lookup = cache.uncacheable(
                        request.method, request.uri, request.requestHeaders, record.project_id
                    )
                except Exception:
                    log.failure("cache lookup failed; going upstream")
            validator.count_now(token)
            api_key = validator.api_key_of(token, key_project)
        except Rejection as rejection:
            self._rejected(request, record, rejection, presented)
            return True
        semaphore.take_now()  # a slot is free (checked above)
        try:
            d = self._exchange(request, record, exchange, token, api_key, lookup)
        except BaseException:
            semaphore.release()
            raise
        d.addBoth(_release, semaphore)
        d.addErrback(self._crashed, request, record)
        return True

    async def _proxy(self, request: Request, record: RequestRecord, exchange: _Exchange) -> None:
        presented: str | None = None
        lookup: LookupResult | None = None
        try:
            presented = extract_bearer(request.getHeader(b"authorization"))
            token = await self.validator.validate(presented, count=False)
            _identify(record, token)
            if self.enforce_project_active:
                await self.validator.check_project(token)
            if self.rate_limits is not None:
                await self._check_rate(request, record, token)
            if self.cache is not None and not exchange.client_gone:
                lookup = await self._from_cache(request, record)
                if lookup is not None and lookup.served:
                    self._done(record, record.status)
                    return
            if exchange.client_gone:
                self._client_left(record)
                return
            await self.validator.count(token)
            api_key = await self.validator.api_key(token)
        except Rejection as rejection:
            self._rejected(request, record, rejection, presented)
            return
        if exchange.client_gone:
            self._client_left(record)
            return
        await self._forward(request, record, exchange, token, api_key, lookup)

    async def _check_rate(self, request: Request, record: RequestRecord, token: Token) -> None:
        """Count the request against the rate limits; raise L{Rejection} when refused."""
        assert self.rate_limits is not None
        decision = await self.rate_limits.check(client_ip=record.client_ip, token_id=token.id)
        apply_rate_limit_headers(request, decision)
        if decision is not None and not decision.allowed:
            status, error, code, description = rate_limit_refusal(decision)
            raise Rejection(status, error, code, description, kind="rate_limited", token=token)

    async def _from_cache(self, request: Request, record: RequestRecord) -> LookupResult | None:
        """A cache hit is answered here (not counted as a request); else the lookup."""
        assert self.cache is not None
        try:
            return await answer_from_cache(
                self.cache,
                request,
                record,
                self.clock,
                usage=self.validator.usage,
                extra_headers=[(b"X-Proxy", PROXY_NAME), overhead_header(record)],
                decorate=self.policy.cors_headers,
            )
        except Exception:
            log.failure("cache lookup failed; going upstream")
            return None

    def _rejected(
        self,
        request: Request,
        record: RequestRecord,
        rejection: Rejection,
        presented: str | None,
    ) -> None:
        if rejection.token is not None:
            _identify(record, rejection.token)
        record.error_kind = rejection.kind if rejection.kind != "dependency" else rejection.code
        if self.audit is not None and rejection.kind != "rate_limited":
            try:
                self.audit(request, rejection, presented)
            except Exception:
                log.failure("auditing a refused proxy request failed")
        self._error(
            request,
            record,
            rejection.status,
            rejection.error,
            rejection.code,
            rejection.description,
        )

    async def _forward(
        self,
        request: Request,
        record: RequestRecord,
        exchange: _Exchange,
        token: Token,
        api_key: str,
        lookup: LookupResult | None,
    ) -> None:
        semaphore = self.client.semaphore(self.upstream.name)
        acquired = semaphore.acquire()
        exchange.pending = acquired
        try:
            await acquired
        except defer.CancelledError:
            self._client_left(record)
            return
        try:
            await self._exchange(request, record, exchange, token, api_key, lookup)
        finally:
            semaphore.release()

    def _exchange(
        self,
        request: Request,
        record: RequestRecord,
        exchange: _Exchange,
        token: Token,
        api_key: str,
        lookup: LookupResult | None,
    ) -> defer.Deferred[None]:
        """Send the request upstream; the Deferred fires once the answer has ended."""
        started_wall = time.time()
        headers = upstream_request_headers(
            request.requestHeaders,
            uri=request.uri,
            api_key=api_key,
            project_id=token.project_id,
            request_id=record.request_id,
            peer_ip=getattr(request.getClientAddress(), "host", "") or "",
            started_wall=started_wall,
        )
        if lookup is not None:
            headers = replace_headers(headers, lookup.upstream_headers())
        length = record.request_size or 0
        body = request_body(request.content, length, self.cooperator)
        if self.prepare_body is not None and request.method == b"POST" and length > 0:
            body = self._rewritten(request, record, length, body) or body
        record.upstream_started_at = time.monotonic()
        d = self.client.request(self._origin, request.method, request.uri, headers, body)
        exchange.pending = d
        timer = None
        if self.upstream.response_header_timeout > 0:
            timer = self.clock.callLater(
                self.upstream.response_header_timeout, exchange.header_timeout
            )
        return d.addCallbacks(  # type: ignore[no-any-return]
            self._answered,
            self._unanswered,
            callbackArgs=(request, record, exchange, lookup, started_wall, timer),
            errbackArgs=(request, record, exchange, timer),
        )

    def _unanswered(
        self,
        failure: Failure,
        request: Request,
        record: RequestRecord,
        exchange: _Exchange,
        timer: Any,
    ) -> None:
        """The upstream request failed before response headers arrived."""
        exchange.pending = None
        if timer is not None and timer.active():
            timer.cancel()
        if exchange.client_gone:
            self._client_left(record)
            return
        status, error, code, description = describe_failure(failure, timed_out=exchange.timed_out)
        log.warn(
            "upstream {provider} failed before answering: {code} ({why})",
            provider=self.upstream.name,
            code=code,
            why=failure.getErrorMessage(),
        )
        record.error_kind = "upstream_timeout" if status == 504 else code
        self._error(request, record, status, error, code, description)

    def _answered(
        self,
        response: Any,
        request: Request,
        record: RequestRecord,
        exchange: _Exchange,
        lookup: LookupResult | None,
        started_wall: float,
        timer: Any,
    ) -> defer.Deferred[None] | None:
        """Response headers arrived: answer the client and relay the body."""
        exchange.pending = None
        if timer is not None and timer.active():
            timer.cancel()
        record.upstream_headers_at = time.monotonic()
        headers_wall = time.time()
        record.status = response.code
        if exchange.client_gone:
            response.deliverBody(_Discard())
            self._client_left(record)
            return None
        streamed = is_event_stream(response.headers)
        record.streamed = streamed
        request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        copy_response_headers(response.headers, out)
        length = response_length(response.length)
        if length is not None and request.method != b"HEAD" and response.code not in (204, 304):
            # The client parses Content-Length out of the headers; pass it on
            # so the body is not re-chunked and a cut stays detectable.
            set_clean(out, b"Content-Length", [b"%d" % length])
        headers_at = rfc3339_ns(headers_wall)
        set_clean(out, b"X-Proxy", _PROXY_NAME)
        set_clean(out, b"X-Request-ID", [record.request_id.encode()])
        set_clean(out, b"X-Proxy-Received-At", [rfc3339_ns(record.received_at_wall)])
        set_clean(out, b"X-Proxy-First-Response-At", [headers_at])
        set_clean(out, b"X-Proxy-Final-Response-At", [headers_at])
        set_clean(out, b"X-Upstream-Request-Stop", [unix_ns(headers_wall)])
        if not streamed:
            set_clean(out, b"X-Upstream-Request-Start", [unix_ns(started_wall)])
        self.policy.cors_headers(request)
        recording = record.capture
        taps = self._taps(record, response) if recording or record.usage_injected else []
        body_filter = next((t for t in taps if is_body_filter(t)), None)
        if body_filter is not None:
            taps.remove(body_filter)
            # The filter may change the body's length.
            out.removeHeader(b"Content-Length")
        if self.cache is not None and lookup is not None:
            try:
                cache_tap = prepare_store(
                    self.cache, lookup, request, record, response.code, response.headers, streamed
                )
            except Exception:
                log.failure("preparing to cache a response failed")
                cache_tap = None
            if cache_tap is not None:
                taps.append(cache_tap)
        set_clean(out, *_one(overhead_header(record)))
        if recording:
            record.response_headers = list(_flat_headers(out))
        relay = BodyRelay(
            request,
            self.clock,
            self.idle_timeout,
            taps=taps,
            body_filter=cast(IBodyFilter, body_filter),
            capture_limit=self.max_response_capture if recording else 0,
        )
        exchange.relay = relay
        response.deliverBody(relay)
        return relay.done.addCallback(self._relayed, record, relay, taps, body_filter)

    def _relayed(
        self,
        kind: str | None,
        record: RequestRecord,
        relay: BodyRelay,
        taps: list[IBodyTap],
        body_filter: IBodyTap | None,
    ) -> None:
        """The body ended (C{kind}: None when complete): close the record."""
        for tap in [*taps, *([body_filter] if body_filter is not None else [])]:
            try:
                tap.body_ended(kind is None)
            except Exception:
                log.failure("body tap failed at the end of the body")
        record.bytes_sent = relay.bytes_relayed
        record.response_body = relay.captured_body
        if kind is not None:
            record.error_kind = kind
        if kind == CLIENT_ABORTED:
            self._client_left(record, status=record.status)
        else:
            self._done(record, record.status)

    def _rewritten(
        self, request: Request, record: RequestRecord, length: int, body: Any
    ) -> bytes | None:
        """The rewritten body, or None to send the body as received."""
        assert self.prepare_body is not None
        if length > REWRITE_LIMIT:
            return None
        content_type = request.getHeader(b"content-type")
        received = body if isinstance(body, bytes) else read_prefix(request.content, length)
        try:
            new, changed = self.prepare_body(
                received,
                content_type.decode("latin-1") if content_type else None,
                request.uri.decode("utf-8", "replace"),
            )
        except Exception:
            log.failure("preparing the request body failed; sending it as received")
            return None
        if not changed:
            return None
        record.usage_injected = True
        return new

    def _taps(self, record: RequestRecord, response: Any) -> list[IBodyTap]:
        taps: list[IBodyTap] = []
        for factory in self.taps:
            try:
                tap = factory(record, response)
            except Exception:
                log.failure("making a body tap failed")
                continue
            if tap is not None:
                taps.append(tap)
        return taps

    # -- answers and bookkeeping ---------------------------------------------------------

    def _error(
        self,
        request: Request,
        record: RequestRecord,
        status: int,
        error: str,
        code: str,
        description: str = "",
    ) -> None:
        body = json_error(request, status, error, code=code, description=description)
        # Unlike the Go llm-proxy, every answer carries its request id.
        request.setHeader(b"X-Request-ID", record.request_id.encode())
        self.policy.cors_headers(request)
        record.response_body = body[: self.max_response_capture]
        self._finish(request, record, body)

    def _finish(self, request: Request, record: RequestRecord, body: bytes) -> None:
        """Write a complete local answer (if the client is still there) and close the record."""
        record.status = request.code
        if not getattr(request, "_disconnected", False) and not request.finished:
            request.setHeader(*overhead_header(record))
            if body:
                request.write(body)
            request.finish()
            record.bytes_sent = len(body)
            record.response_headers = list(_flat_headers(request.responseHeaders))
        else:
            record.error_kind = record.error_kind or CLIENT_ABORTED
        self._done(record, record.status)

    def _client_left(self, record: RequestRecord, status: int = CLIENT_CLOSED) -> None:
        record.error_kind = CLIENT_ABORTED
        record.status = status
        self._done(record, status)

    def _done(self, record: RequestRecord, status: int) -> None:
        record.finished_at = time.monotonic()
        self.breaker.record(status)
        self._notify("request_finished", record)

    def _notify(self, method: str, record: RequestRecord) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(record)
            except Exception:
                log.failure("request observer {observer!r} failed", observer=observer)

    def _crashed(self, failure: Failure, request: Request, record: RequestRecord) -> None:
        log.failure("proxying {path} failed", failure, path=record.path)
        record.error_kind = record.error_kind or "internal"
        if request.startedWriting:
            abort_client(request, self.clock)
            self._done(record, 500)
            return
        self._error(request, record, 500, "Internal server error", "internal_error")


_PROXY_NAME = [PROXY_NAME]


def _release(result: Any, semaphore: defer.DeferredSemaphore) -> Any:
    semaphore.release()
    return result


def _identify(record: RequestRecord, token: Token) -> None:
    """Which token, project and token hash the request belongs to."""
    record.token_id = token.id
    record.project_id = token.project_id
    record.token_hash = token.token_hash


def _one(header: tuple[bytes, bytes]) -> tuple[bytes, list[bytes]]:
    return header[0], [header[1]]


def _flat_headers(headers: Any) -> Any:
    for name, values in headers.getAllRawHeaders():
        for value in values:
            yield name, value
