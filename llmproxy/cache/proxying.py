"""
The two places the proxy touches the cache, packaged so its request path
stays short:

1. L{answer_from_cache} after the token and the project guard passed and
   before the request is counted or sent upstream: replays a hit and says
   so, or hands back the lookup for step 2.
2. L{prepare_store} when the upstream headers arrived, before the first
   body byte goes out: sets the cache headers and returns a L{CacheTap}
   (an L{IBodyTap}) that stores the body once it ended cleanly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from llmproxy.cache.facade import (
    BYPASS,
    MISS,
    HeaderList,
    LookupResult,
    ResponseCache,
    StreamCapture,
)
from llmproxy.cache.serve import serve_cached
from llmproxy.proxy.forward import IBodyTap
from llmproxy.proxy.record import RequestRecord

log = Logger()


def request_body(request: Request) -> bytes:
    """The buffered request body (twisted.web reads it before C{render})."""
    content = request.content
    if content is None:
        return b""
    position = content.tell()
    content.seek(0)
    try:
        return content.read()
    finally:
        content.seek(position)


async def answer_from_cache(
    cache: ResponseCache,
    request: Request,
    record: RequestRecord,
    clock: IReactorTime,
    usage: Any = None,
    extra_headers: HeaderList | None = None,
    decorate: Callable[[Request], object] | None = None,
) -> LookupResult:
    """
    Look C{request} up in the scope of C{record.project_id}. On a hit the
    answer is written and finished here (with C{record.request_id} as its
    own X-Request-ID), C{record} is filled (status, cache_status,
    bytes_sent) and C{usage.add_cache_hit(record.token_hash)} is called
    (C{extra_headers} and C{decorate}: see L{serve_cached}); the
    caller then only notifies its observers. Otherwise nothing was written:
    forward upstream, adding C{result.upstream_headers()} to the upstream
    request, and keep C{result} for L{prepare_store}.
    """
    body = None
    if request.method == b"POST" and cache.needs_lookup(request.method, request.requestHeaders):
        # Only an opted-in POST is looked up; do not copy other bodies.
        body = request_body(request)
    result = await cache.lookup(
        request.method, request.uri, request.requestHeaders, body, record.project_id
    )
    if not result.served:
        return result
    record.cache_status = result.outcome
    record.status = (
        304 if result.outcome != "hit" else (result.entry.status if result.entry else 200)
    )
    if usage is not None and record.token_hash:
        try:
            usage.add_cache_hit(record.token_hash)
        except Exception:
            log.failure("counting a cache hit failed")
    record.bytes_sent = serve_cached(
        request, result, record.request_id, clock, extra_headers, decorate
    )
    record.response_headers = [
        (name, value)
        for name, values in request.responseHeaders.getAllRawHeaders()
        for value in values
    ]
    return result


@implementer(IBodyTap)
class CacheTap:
    """Feeds the relayed body to a L{StreamCapture}; stores it only when complete."""

    def __init__(self, capture: StreamCapture) -> None:
        self.capture = capture

    def data_received(self, chunk: bytes) -> None:
        self.capture.write(chunk)

    def body_ended(self, complete: bool) -> None:
        if complete:
            self.capture.finish()
        else:
            self.capture.abort("incomplete")


def prepare_store(
    cache: ResponseCache,
    lookup: LookupResult,
    request: Request,
    record: RequestRecord,
    status: int,
    upstream_headers: Headers,
    streaming: bool,
) -> CacheTap | None:
    """
    Call when the upstream answer's headers arrived (after copying them to
    the response, before its body). Sets the cache headers on the response
    and C{record.cache_status}; returns the tap to add to the body relay, or
    None when nothing will be stored. Pass the B{upstream} headers: what the
    proxy adds per request is not part of the entry.
    """
    plan = cache.plan(lookup, status, upstream_headers, streaming)
    for name, value in plan.headers:
        request.responseHeaders.setRawHeaders(name, [value])
    if plan.capture:
        record.cache_status = "stored" if not streaming else MISS
    elif lookup.outcome == BYPASS:
        record.cache_status = BYPASS
    elif lookup.key is not None:
        record.cache_status = MISS
    capture = cache.capture(lookup, plan, status, upstream_headers)
    return CacheTap(capture) if capture is not None else None
