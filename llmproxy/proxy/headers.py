"""
Which headers cross the proxy, in each direction, and which it adds.

Repeated headers are kept as they are (twisted's C{getAllRawHeaders} keeps
every value); hop-by-hop headers, and any header the C{Connection} header
names, never cross.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from twisted.web.http_headers import Headers

from llmproxy.web.headerstore import set_clean

PROXY_NAME = b"llm-proxy"
PROXY_VERSION = b"0.1.0"

#: RFC 9110 §7.6.1 plus the historical ones.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Client address headers a client could forge; the proxy sets its own
#: X-Forwarded-For from the peer address instead.
CLIENT_IP_HEADERS = frozenset(
    {
        b"x-forwarded-for",
        b"x-real-ip",
        b"cf-connecting-ip",
        b"cf-ipcountry",
        b"x-client-ip",
        b"x-original-forwarded-for",
    }
)

#: Set by the proxy (or by the HTTP client) on the way upstream.
_REPLACED_UPSTREAM = frozenset(
    {
        b"host",
        b"content-length",
        b"authorization",
        b"x-request-id",
        b"x-proxy",
        b"x-proxy-version",
        b"x-proxy-id",
        b"x-upstream-request-start",
        b"accept-encoding",  # narrowed to what the proxy can read (readable_codings)
    }
)

#: Content codings the proxy can undo to read an answer (usage, events,
#: the response cache's checks): the only ones asked of the upstream.
READABLE_CODINGS = frozenset({b"gzip", b"x-gzip", b"deflate", b"identity"})
_readable_memo: dict[bytes, bytes] = {}


def readable_codings(accept_encoding: bytes) -> bytes:
    """
    The client's C{Accept-Encoding} without the codings the proxy cannot
    undo (C{br}, C{zstd}, C{*} ...), else C{identity}: the client still gets
    a coding it asked for, and the answer's usage can still be read.
    """
    narrowed = _readable_memo.get(accept_encoding)
    if narrowed is None:
        kept = [
            part.strip()
            for part in accept_encoding.split(b",")
            if part.split(b";", 1)[0].strip().lower() in READABLE_CODINGS
        ]
        narrowed = b", ".join(kept) or b"identity"
        if len(_readable_memo) >= 256:
            _readable_memo.clear()
        _readable_memo[accept_encoding] = narrowed
    return narrowed


#: Set by the proxy (or by twisted.web) on the way back to the client.
_REPLACED_DOWNSTREAM = frozenset(
    {
        b"x-request-id",
        b"x-proxy",
        b"x-proxy-received-at",
        b"x-proxy-first-response-at",
        b"x-proxy-final-response-at",
        b"x-upstream-request-start",
        b"x-upstream-request-stop",
        b"date",
        b"server",
    }
)


#: What never crosses upstream, and what never comes back (before the
#: names a C{Connection} header adds).
_DROP_UPSTREAM = HOP_BY_HOP | CLIENT_IP_HEADERS | _REPLACED_UPSTREAM
_DROP_DOWNSTREAM = HOP_BY_HOP | _REPLACED_DOWNSTREAM

_PROXY_NAME = [PROXY_NAME]
_PROXY_VERSION = [PROXY_VERSION]


def _dropped(base: frozenset[bytes], headers: Headers) -> frozenset[bytes]:
    named = connection_named(headers)
    return base | named if named else base


def connection_named(headers: Headers) -> set[bytes]:
    """Header names listed in C{Connection} (they are hop-by-hop too)."""
    named: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        for part in value.split(b","):
            part = part.strip().lower()
            if part:
                named.add(part)
    return named


def unix_ns(wall: float | None = None) -> bytes:
    """Wall-clock time in integer nanoseconds, as the Go project sends it."""
    t = time.time_ns() if wall is None else int(wall * 1e9)
    return str(t).encode()


#: The formatted prefix of the last whole second seen (three calls a request).
_second: list[Any] = [None, b""]


def rfc3339_ns(wall: float) -> bytes:
    """RFC 3339 UTC with nanosecond digits (microsecond precision)."""
    second = int(wall)
    if _second[0] != second:
        _second[0] = second
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)).encode()
    return _second[1] + b"%06d000Z" % min(999_999, round((wall - second) * 1_000_000))


def wants_stream(request_headers: Headers, uri: bytes) -> bool:
    accept = b",".join(request_headers.getRawHeaders(b"accept", []))
    if b"text/event-stream" in accept.lower():
        return True
    _, _, query = uri.partition(b"?")
    return b"stream=true" in query.lower()


#: A header list in the order it is sent: C{(name, value)} pairs, names repeated as needed.
HeaderPairs = list[tuple[bytes, bytes]]


def upstream_request_headers(
    client: Headers,
    *,
    uri: bytes,
    api_key: str,
    project_id: str,
    request_id: str,
    peer_ip: str,
    started_wall: float,
) -> HeaderPairs:
    """
    The headers sent upstream: the client's, minus hop-by-hop, client-IP
    and proxy-owned ones, plus the project's key and the proxy's own. The
    HTTP client adds C{Host} (the upstream's) and C{Content-Length}.

    A plain list rather than a L{Headers}: it is built for every request
    and only ever written out once.
    """
    drop = _dropped(_DROP_UPSTREAM, client)
    out = [
        (name, value)
        for name, values in client.getAllRawHeaders()
        if name.lower() not in drop
        for value in values
    ]
    key = api_key.encode("utf-8")
    if b"\r" in key or b"\n" in key:
        key = b" ".join(key.splitlines())  # never a second header line
    out += [
        (b"Authorization", b"Bearer " + key),
        (b"X-Proxy", PROXY_NAME),
        (b"X-Proxy-Version", PROXY_VERSION),
        (b"X-Proxy-Id", project_id.encode("utf-8")),
        (b"X-Request-Id", request_id.encode("utf-8")),
        (b"X-Upstream-Request-Start", unix_ns(started_wall)),
    ]
    codings = client.getRawHeaders(b"accept-encoding")
    if codings:
        out.append((b"Accept-Encoding", readable_codings(b", ".join(codings))))
    if peer_ip:
        out.append((b"X-Forwarded-For", peer_ip.encode("latin-1")))
    if not client.hasHeader(b"accept") and wants_stream(client, uri):
        out.append((b"Accept", b"text/event-stream"))
    return out


def replace_headers(
    headers: HeaderPairs, replacements: Iterable[tuple[bytes, bytes]]
) -> HeaderPairs:
    """C{headers} with every name in C{replacements} set to the replacement's value."""
    extra = list(replacements)
    if not extra:
        return headers
    names = {name.lower() for name, _ in extra}
    return [(n, v) for n, v in headers if n.lower() not in names] + extra


def copy_response_headers(upstream: Headers, downstream: Headers) -> None:
    """
    Upstream response headers the client may see (all but hop-by-hop).
    C{upstream} is a L{Headers}, so its names and values are already valid.
    """
    drop = _dropped(_DROP_DOWNSTREAM, upstream)
    for name, values in upstream.getAllRawHeaders():
        if name.lower() not in drop:
            set_clean(downstream, name, values)


def is_event_stream(headers: Headers) -> bool:
    for value in headers.getRawHeaders(b"content-type", []):
        if b"text/event-stream" in value.lower():
            return True
    return False
