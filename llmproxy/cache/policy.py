"""
The rules of the response cache, as pure functions: which requests are
looked up, how keys are made, how long an answer may be kept, how C{Vary}
selects an entry (RFC 9111 §4.1) and when a conditional request is answered
with 304. Everything here is synchronous and has no state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlsplit

import attrs
from twisted.web.http_headers import Headers

#: POST bodies larger than this are never hashed, so never cached.
MAX_HASHED_BODY = 1024 * 1024

#: Statuses a response TTL may be taken for (RFC 9110 "heuristically cacheable").
CACHEABLE_STATUSES = frozenset({200, 203, 301, 308, 404, 410})

#: Never stored with an entry: hop-by-hop, per-request and per-response
#: headers the proxy sets again on every answer (a hit gets its own).
NOT_STORED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "date",
        "age",
        "set-cookie",
        "x-request-id",
        "x-correlation-id",
        "x-upstream-request-start",
        "x-upstream-request-stop",
        "x-proxy-received-at",
        "x-proxy-first-response-at",
        "x-proxy-final-response-at",
        "x-llm-proxy-overhead-ms",
        "cache-status",
        "x-proxy-cache",
        "x-proxy-cache-key",
        "x-cache-debug",
    }
)


# -- header helpers --------------------------------------------------------------


def header(headers: Headers, name: str) -> str | None:
    """All values of C{name} joined by C{", "} (RFC 9110 §5.3), or None."""
    values = headers.getRawHeaders(name.encode("latin-1"))
    if not values:
        return None
    return ", ".join(v.decode("latin-1").strip() for v in values)


def cache_control(value: str | None) -> dict[str, str | None]:
    """Directives of a C{Cache-Control} value, names lower-cased."""
    directives: dict[str, str | None] = {}
    if not value:
        return directives
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, arg = part.partition("=")
        directives[name.strip().lower()] = arg.strip().strip('"') if sep else None
    return directives


def seconds(directives: dict[str, str | None], name: str) -> int | None:
    """A delta-seconds directive as int (None when absent or malformed)."""
    raw = directives.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def client_forced_ttl(request_headers: Headers) -> int:
    """
    The client's opt-in: C{Cache-Control: public} with C{s-maxage} (preferred)
    or C{max-age} above zero. 0 when the client did not opt in.
    """
    cc = cache_control(header(request_headers, "cache-control"))
    if "public" not in cc:
        return 0
    for name in ("s-maxage", "max-age"):
        n = seconds(cc, name)
        if n:
            return n
    return 0


def wants_revalidation(request_headers: Headers) -> bool:
    """C{no-cache} or C{max-age=0} from the client: do not answer from the cache."""
    cc = cache_control(header(request_headers, "cache-control"))
    return "no-cache" in cc or seconds(cc, "max-age") == 0


def is_shared_cacheable(response_cache_control: str | None) -> bool:
    """Answers to authorised requests need an explicit shared-cache directive."""
    cc = cache_control(response_cache_control)
    return "public" in cc or bool(seconds(cc, "s-maxage"))


# -- eligibility and keys ----------------------------------------------------------


def lookup_eligible(method: str, request_headers: Headers, body: bytes | None) -> bool:
    """GET and HEAD always; POST only with the client opt-in and a body we may hash."""
    if method in ("GET", "HEAD"):
        return True
    if method == "POST":
        return client_forced_ttl(request_headers) > 0 and len(body or b"") <= MAX_HASHED_BODY
    return False


def normalise_url(url: str) -> str:
    """
    Path plus the query with keys sorted (values sorted per key), scheme and
    host dropped: C{/v1/x?b=2&a=1} and C{http://h/v1/x?a=1&b=2} are the same URL.
    """
    parts = urlsplit(url)
    path = parts.path or "/"
    if not parts.query:
        return path
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    grouped: dict[str, list[str]] = {}
    for k, v in pairs:
        grouped.setdefault(k, []).append(v)
    query = "&".join(f"{k}={v}" for k in sorted(grouped) for v in sorted(grouped[k]))
    return f"{path}?{query}"


def body_digest(body: bytes | None) -> str:
    return hashlib.sha256(body or b"").hexdigest()


def scope_for(project_id: str | None, shared: bool) -> str:
    """Entries are per project unless C{HTTP_CACHE_SHARED} restores sharing."""
    if shared:
        return "shared"
    return "project:" + (project_id or "")


def primary_key(scope: str, method: str, url: str, digest: str | None) -> str:
    """64 hex characters; HEAD shares GET's entries (RFC 9110 §9.3.2)."""
    lookup_method = "GET" if method == "HEAD" else method
    material = "\n".join(("llmproxy-cache-v1", scope, lookup_method, url, digest or ""))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def index_method(method: str) -> str:
    return "GET" if method == "HEAD" else method


# -- Vary (RFC 9111 §4.1) ----------------------------------------------------------


def vary_names(response_headers: Headers) -> tuple[str, ...] | None:
    """Lower-cased, sorted header names of C{Vary}; None for C{Vary: *}."""
    value = header(response_headers, "vary")
    if not value:
        return ()
    names = sorted({n.strip().lower() for n in value.split(",") if n.strip()})
    if "*" in names:
        return None
    return tuple(names)


def normalise_field(value: str | None) -> str | None:
    """Combine and trim a field value so semantically equal values compare equal."""
    if value is None:
        return None
    return ", ".join(p.strip() for p in value.split(",") if p.strip())


def vary_selection(
    names: Iterable[str], request_headers: Headers
) -> tuple[tuple[str, str | None], ...]:
    return tuple((n, normalise_field(header(request_headers, n))) for n in names)


def variant_id(selection: tuple[tuple[str, str | None], ...]) -> str:
    material = "\n".join(f"{n}:{'' if v is None else '=' + v}" for n, v in selection)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:32]


def vary_matches(selection: tuple[tuple[str, str | None], ...], request_headers: Headers) -> bool:
    """The stored request's selecting header values equal the new request's."""
    return all(normalise_field(header(request_headers, n)) == v for n, v in selection)


# -- storing -------------------------------------------------------------------------


@attrs.frozen
class StoreDecision:
    """
    @ivar ttl: seconds the entry may be served; 0 = do not store.
    @ivar forced: the TTL is the client's opt-in, not the response's.
    @ivar debug: value of C{X-Cache-Debug} when nothing is stored (or None).
    @ivar miss_header: answer with C{Cache-Status: llm-proxy; miss} although
        nothing is stored (methods the cache never handles).
    """

    ttl: int
    forced: bool = False
    debug: str | None = None
    miss_header: bool = False

    @property
    def store(self) -> bool:
        return self.ttl > 0


def decide_store(
    method: str,
    request_headers: Headers,
    status: int,
    response_headers: Headers,
    *,
    streaming: bool,
    stream_caching: bool,
    default_ttl: int = 0,
) -> StoreDecision:
    """
    The TTL decision of the Go llm-proxy (§5.4 of the contract). A response
    TTL (C{s-maxage}, C{max-age}, else C{default_ttl}) needs an explicit
    shared-cache directive because every proxied request is authorised; if
    the response gives none, the client's opt-in may force one. C{no-store},
    C{private}, C{no-cache} and C{Vary: *} always win. Streams are stored only with
    stream caching on and the client's opt-in.
    """
    if method not in ("GET", "HEAD", "POST"):
        return StoreDecision(0, miss_header=True)
    if not 200 <= status < 300:
        return StoreDecision(0, debug="status-not-cacheable")
    forced_ttl = client_forced_ttl(request_headers)
    zero = "ttl-zero-ttl=0s-from-resp=false"
    if method == "POST" and forced_ttl == 0:
        return StoreDecision(0, debug=zero)
    if streaming and not (stream_caching and forced_ttl > 0):
        return StoreDecision(0)
    cc_value = header(response_headers, "cache-control")
    cc = cache_control(cc_value)
    # no-cache (without field names) means "revalidate before every reuse":
    # this cache never revalidates, so such answers are not kept.
    refused = (
        "no-store" in cc
        or "private" in cc
        or cc.get("no-cache", "") is None
        or vary_names(response_headers) is None
    )
    response_ttl = 0
    if "no-store" not in cc:
        smax, maxage = seconds(cc, "s-maxage"), seconds(cc, "max-age")
        if smax is not None:
            response_ttl = smax
        elif maxage is not None:
            response_ttl = maxage
        else:
            response_ttl = default_ttl
    if response_ttl > 0:
        if refused or status not in CACHEABLE_STATUSES or not is_shared_cacheable(cc_value):
            return StoreDecision(0, debug=zero)
        return StoreDecision(response_ttl)
    if forced_ttl > 0 and not refused:
        return StoreDecision(forced_ttl, forced=True)
    return StoreDecision(0, debug=zero)


def _b(value: bool) -> str:
    return "true" if value else "false"


def stored_headers(
    response_headers: Headers, forced_ttl: int | None
) -> tuple[tuple[str, str], ...]:
    """
    The headers kept with an entry: everything but L{NOT_STORED} and what
    C{Connection} names. A forced TTL rewrites C{Cache-Control} so the
    entry says how long it is shared.
    """
    connection = header(response_headers, "connection") or ""
    named = {n.strip().lower() for n in connection.split(",") if n.strip()}
    kept: list[tuple[str, str]] = []
    for raw_name, values in response_headers.getAllRawHeaders():
        name = raw_name.decode("latin-1")
        lname = name.lower()
        if lname in NOT_STORED or lname in named:
            continue
        if forced_ttl is not None and lname == "cache-control":
            continue
        for v in values:
            kept.append((_canonical(name), v.decode("latin-1")))
    if forced_ttl is not None:
        kept.append(("Cache-Control", f"public, max-age={forced_ttl}"))
    return tuple(kept)


def _canonical(name: str) -> str:
    return "-".join(p[:1].upper() + p[1:].lower() for p in name.split("-"))


# -- conditional requests (RFC 9110 §13) ---------------------------------------------


def _etags(value: str) -> list[str]:
    tags = []
    for part in value.split(","):
        part = part.strip()
        if part.startswith("W/"):
            part = part[2:]
        tags.append(part.strip('"'))
    return tags


def not_modified(
    method: str, request_headers: Headers, etag: str | None, last_modified: str | None
) -> bool:
    """
    True when a GET/HEAD is answered with 304: C{If-None-Match} (weak
    comparison, C{*} matches) takes precedence over C{If-Modified-Since}.
    """
    if method not in ("GET", "HEAD"):
        return False
    inm = header(request_headers, "if-none-match")
    if inm is not None:
        if etag is None:
            return False
        wanted = _etags(inm)
        return "*" in wanted or _etags(etag)[0] in wanted
    ims = header(request_headers, "if-modified-since")
    if ims is None or last_modified is None:
        return False
    from email.utils import parsedate_to_datetime

    try:
        since = parsedate_to_datetime(ims)
        modified = parsedate_to_datetime(last_modified)
    except (TypeError, ValueError):
        return False
    try:
        return modified <= since
    except TypeError:  # naive against aware
        return False
