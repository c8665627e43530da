"""
Replaying a cache hit onto a twisted.web request: the stored status,
headers and body (chunk by chunk for a stored stream), with everything that
belongs to this request fresh: its own C{X-Request-ID}, C{Date}, C{Age},
timing headers and the cache headers.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.http import datetimeToString
from twisted.web.server import Request

from llmproxy.cache.facade import (
    CACHE_STATUS,
    CONDITIONAL_HIT,
    HIT,
    X_PROXY_CACHE,
    X_PROXY_CACHE_KEY,
    HeaderList,
    LookupResult,
)

#: Stored headers a 304 leaves out (RFC 9110 §15.4.5: no content).
_NOT_ON_304 = frozenset({"content-type", "content-encoding", "content-language", "content-range"})


def rfc3339_ns(wall: float) -> bytes:
    """UTC RFC 3339 with nanoseconds, as the Go llm-proxy's timing headers."""
    t = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    nanos = int(round((wall - int(wall)) * 1e9)) % 1_000_000_000
    return (t.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z").encode("ascii")


def serve_cached(
    request: Request,
    result: LookupResult,
    request_id: str,
    clock: IReactorTime,
    extra_headers: HeaderList | None = None,
    decorate: Callable[[Request], object] | None = None,
) -> int:
    """
    Answer C{request} from C{result} (a hit or conditional hit) and finish
    it. C{extra_headers} are set after the stored and fresh headers (e.g.
    C{X-Proxy}); C{decorate(request)} runs just before the body is written
    (e.g. the proxy's CORS echo headers).
    Returns the number of body bytes written. The caller returns
    C{NOT_DONE_YET} from C{render} (or nothing, when called later).
    """
    entry = result.entry
    if entry is None or result.outcome not in (HIT, CONDITIONAL_HIT):
        raise ValueError("serve_cached needs a hit")
    now = clock.seconds()
    conditional = result.outcome == CONDITIONAL_HIT
    status = 304 if conditional else entry.status
    request.setResponseCode(status)
    out = request.responseHeaders
    for name, value in entry.headers:
        if conditional and name.lower() in _NOT_ON_304:
            continue
        out.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
    stamp = rfc3339_ns(now)
    fresh: HeaderList = [
        (b"X-Request-ID", request_id.encode("latin-1")),
        (b"Date", datetimeToString(int(now))),
        (b"Age", str(entry.age(now)).encode("ascii")),
        (b"X-Proxy-Received-At", stamp),
        (b"X-Proxy-First-Response-At", stamp),
        (b"X-Proxy-Final-Response-At", stamp),
        (CACHE_STATUS, b"llm-proxy; " + result.outcome.encode("ascii")),
        (X_PROXY_CACHE, result.outcome.encode("ascii")),
        (X_PROXY_CACHE_KEY, entry.primary.encode("ascii")),
    ]
    for raw_name, raw_value in [*fresh, *(extra_headers or [])]:
        out.setRawHeaders(raw_name, [raw_value])
    if decorate is not None:
        decorate(request)
    written = 0
    if conditional or request.method == b"HEAD":
        if not conditional:
            out.setRawHeaders(b"content-length", [str(len(entry.body)).encode("ascii")])
        _finish(request)
        return 0
    if not entry.streamed:
        body = entry.body
        out.setRawHeaders(b"content-length", [str(len(body)).encode("ascii")])
        if not _gone(request):
            request.write(body)
            written = len(body)
    else:
        for chunk in entry.chunks:
            if _gone(request):
                break
            request.write(chunk)
            written += len(chunk)
    _finish(request)
    return written


def _gone(request: Any) -> bool:
    return bool(getattr(request, "_disconnected", False))


def _finish(request: Any) -> None:
    if not _gone(request) and not getattr(request, "finished", False):
        request.finish()
