"""
Process-local metrics in two formats: the Go llm-proxy's JSON counters at
C{METRICS_PATH} and Prometheus text at C{METRICS_PATH/prometheus}.

Each L{Metrics} owns its own C{CollectorRegistry}, so tests and several
apps in one process never share counters. Labels only carry bounded values
(provider names, status classes, fixed reason words): never tokens, project
ids or request ids.
"""

from __future__ import annotations

import hmac
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from llmproxy.proxy.record import IRequestObserver, RequestRecord
from llmproxy.web.auth import bearer_token
from llmproxy.web.errors import json_body, json_error

log = Logger()

PROMETHEUS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
OVERHEAD_HEADER = b"X-Proxy-Overhead-Ms"

#: Latency buckets (seconds): LLM calls range from milliseconds (cache
#: hits) to minutes (long streams).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: Proxy overhead is small by design: finer buckets.
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class _ReactorMetric:
    """
    A labelled metric updated from the reactor thread only: its children are
    plain objects without locks, made by C{new_child}, and the registry
    reads them through the subclass's C{collect}, in the same C{family}
    C{prometheus_client}'s own metrics produce. Subclasses register
    themselves once they can be collected.
    """

    def __init__(
        self,
        family: Callable[..., Any],
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        new_child: Callable[[], Any],
    ) -> None:
        self._family = family
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._new_child = new_child
        self._children: dict[tuple[str, ...], Any] = {}
        if not self._labelnames:
            self._default = self.labels()

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}")
            child = self._children[values] = self._new_child()
        return child

    def _empty_family(self) -> Any:
        return self._family(self._name, self._documentation, labels=self._labelnames)

    def describe(self) -> list[Any]:
        return [self._empty_family()]


class FastHistogram(_ReactorMetric):
    """
    A histogram exposed exactly as C{prometheus_client.Histogram} exposes
    one (bucket, count and sum samples). Its observations are plain list and
    float updates: C{prometheus_client}'s take a lock per counter and cost
    three observations per request a few per cent of the proxy's CPU.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        buckets: Iterable[float],
        registry: CollectorRegistry,
    ) -> None:
        upper = [float(b) for b in buckets]
        if upper[-1] != float("inf"):
            upper.append(float("inf"))
        self._upper = upper
        super().__init__(
            HistogramMetricFamily,
            name,
            documentation,
            labelnames,
            lambda: _HistogramChild(upper),
        )
        registry.register(self)

    def observe(self, value: float) -> None:
        self._default.observe(value)

    def collect(self) -> Iterable[Any]:
        family = self._empty_family()
        for values, child in self._children.items():
            running = 0.0
            buckets = []
            for bound, count in zip(self._upper, child.counts, strict=True):
                running += count
                buckets.append((floatToGoString(bound), running))
            family.add_metric(list(values), buckets, child.sum)
        yield family


class _HistogramChild:
    __slots__ = ("counts", "sum", "_upper")

    def __init__(self, upper: list[float]) -> None:
        self._upper = upper
        self.counts = [0] * len(upper)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self._upper, value)] += 1
        self.sum += value


class FastCounter(_ReactorMetric):
    """
    A counter exposed exactly as C{prometheus_client.Counter} exposes one
    (C{_total} and C{_created} samples). An increment is a float addition:
    the stock counter takes a lock on each, and the proxy increments two or
    three per request.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        name = name.removesuffix("_total")
        super().__init__(CounterMetricFamily, name, documentation, labelnames, _CounterChild)
        registry.register(self)

    def inc(self, amount: float = 1.0) -> None:
        self._default.inc(amount)

    def collect(self) -> Iterable[Any]:
        family = self._empty_family()
        for values, child in self._children.items():
            family.add_metric(list(values), child.value, created=child.created)
        yield family


class _CounterChild:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


#: Distinct values one label may take before further values become "other".
MAX_LABEL_VALUES = 64
OTHER = "other"


class BoundedLabel:
    """
    Keeps a label's cardinality bounded: the first C{limit} distinct values
    pass through (truncated to 64 characters), later ones become C{other}.
    """

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        value = (value or "unknown")[:64]
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


def status_class(status: int) -> str:
    """C{"2xx"} for 200..299 and so on; C{"none"} when no status was sent."""
    if 100 <= status <= 599:
        return f"{status // 100}xx"
    return "none"


def proxy_overhead_seconds(record: RequestRecord, now: float) -> float:
    """
    Time spent inside llmproxy for C{record} up to C{now} (monotonic): all
    of it when no upstream call was made (cache hit, proxy-made error),
    otherwise the time before the upstream request was sent plus the time
    since its response headers arrived.
    """
    if record.upstream_started_at is None:
        return max(0.0, now - record.received_at)
    before = record.upstream_started_at - record.received_at
    after = 0.0 if record.upstream_headers_at is None else now - record.upstream_headers_at
    return max(0.0, before + max(0.0, after))


def overhead_header(record: RequestRecord, now: float | None = None) -> tuple[bytes, bytes]:
    """
    The C{X-Proxy-Overhead-Ms} header for a response about to be sent
    (C{now} defaults to C{time.monotonic()}, the clock of L{RequestRecord}).
    """
    if now is None:
        now = time.monotonic()
    ms = proxy_overhead_seconds(record, now) * 1000.0
    text = f"{ms:.2f}"
    # Kept on the record as sent, so the metrics need not search the headers.
    record.overhead = float(text) / 1000.0
    return OVERHEAD_HEADER, text.encode("ascii")


def _overhead_from_headers(record: RequestRecord) -> float | None:
    wanted = OVERHEAD_HEADER.lower()
    for name, value in record.response_headers:
        if name.lower() == wanted:
            try:
                return float(value) / 1000.0
            except ValueError:
                return None
    return None


class Metrics:
    """
    Every counter llmproxy exposes. Components receive this object in their
    constructor and call the small methods below; the proxy reports through
    L{MetricsObserver}.
    """

    def __init__(self, clock: IReactorTime, process_metrics: bool = True) -> None:
        self.clock = clock
        self.started = clock.seconds()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._provider = BoundedLabel()
        self._error_kind = BoundedLabel(32)
        self._reason = BoundedLabel(32)
        self._component = BoundedLabel(16)
        # JSON counters (the Go llm-proxy's fields) kept as plain ints.
        self.counts = dict.fromkeys(
            (
                "request_count",
                "error_count",
                "cache_hits",
                "cache_misses",
                "cache_bypass",
                "cache_stores",
            ),
            0,
        )
        self.in_flight: dict[int, RequestRecord] = {}
        #: Labelled children by label values: C{metric.labels(...)} costs a
        #: lock and several conversions on every call.
        self._children: dict[tuple[Any, ...], Any] = {}

        self.uptime = Gauge("llm_proxy_uptime_seconds", "Seconds since start.", registry=r)
        self.uptime.set_function(self.uptime_seconds)
        self._requests = FastCounter(
            "llm_proxy_requests",
            "Proxied requests that finished, by provider and status class.",
            ["provider", "status_class"],
            registry=r,
        )
        self._errors = FastCounter(
            "llm_proxy_errors",
            "Proxied requests answered with status >= 400 or failed, by provider and kind.",
            ["provider", "kind"],
            registry=r,
        )
        self._duration = FastHistogram(
            "llm_proxy_request_duration_seconds",
            "Time from request arrival to the last response byte.",
            ["provider", "streamed"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._ttfb = FastHistogram(
            "llm_proxy_upstream_ttfb_seconds",
            "Upstream time to first byte (request sent to response headers).",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._overhead = FastHistogram(
            "llm_proxy_overhead_seconds",
            "Time spent inside llmproxy itself (X-Proxy-Overhead-Ms).",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        in_flight = Gauge(
            "llm_proxy_in_flight_requests", "Proxied requests in progress.", registry=r
        )
        in_flight.set_function(lambda: len(self.in_flight))
        in_flight_streams = Gauge(
            "llm_proxy_in_flight_streams", "Streaming responses in progress.", registry=r
        )
        in_flight_streams.set_function(self.in_flight_streams)
        self._cache = {
            name: FastCounter(f"llm_proxy_cache_{name}", help_, registry=r)
            for name, help_ in (
                ("hits", "Responses served from the cache (conditional hits included)."),
                ("misses", "Cacheable lookups that found nothing usable."),
                ("bypass", "Entries found but not shareable with this request."),
                ("stores", "Entries written to the cache."),
                ("errors", "Cache backend failures (the request went upstream)."),
            )
        }
        self._events_published = Counter(
            "llm_proxy_events_published", "Events accepted by the event bus.", registry=r
        )
        self._events_dropped = Counter(
            "llm_proxy_events_dropped",
            "Events the bus had to drop, by reason.",
            ["reason"],
            registry=r,
        )
        self._token_cache = FastCounter(
            "llm_proxy_token_cache_lookups",
            "Token validation cache lookups, by result (hit/miss).",
            ["result"],
            registry=r,
        )
        self._ratelimit_rejected = Counter(
            "llm_proxy_ratelimit_rejected",
            "Requests refused by a rate limit, by scope (global/ip/token).",
            ["scope"],
            registry=r,
        )
        self._ratelimit_degraded = Counter(
            "llm_proxy_ratelimit_degraded",
            "Rate-limit checks decided without Redis, by outcome (fallback/fail_open/fail_closed).",
            ["outcome"],
            registry=r,
        )
        self._redis_errors = Counter(
            "llm_proxy_redis_errors",
            "Redis calls that failed or timed out, by component.",
            ["component"],
            registry=r,
        )
        self._invalidations = Counter(
            "llm_proxy_invalidations",
            "Cache invalidations exchanged with other instances, by direction.",
            ["direction"],
            registry=r,
        )
        if process_metrics:
            ProcessCollector(registry=r)
            GCCollector(registry=r)

    # -- values ----------------------------------------------------------------

    def uptime_seconds(self) -> float:
        return max(0.0, self.clock.seconds() - self.started)

    def in_flight_streams(self) -> int:
        return sum(1 for record in self.in_flight.values() if record.streamed)

    def json_snapshot(self) -> dict[str, Any]:
        """The Go llm-proxy's C{/metrics} fields, plus in-flight gauges."""
        return {
            "uptime_seconds": self.uptime_seconds(),
            **self.counts,
            "in_flight_requests": len(self.in_flight),
            "in_flight_streams": self.in_flight_streams(),
        }

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    # -- proxied requests ----------------------------------------------------

    def request_started(self, record: RequestRecord) -> None:
        self.in_flight[id(record)] = record

    def _child(self, metric: Any, *labels: str) -> Any:
        """C{metric.labels(*labels)}, made once per distinct label values."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request_finished(self, record: RequestRecord) -> None:
        self.in_flight.pop(id(record), None)
        provider = self._provider(record.provider)
        self.counts["request_count"] += 1
        self._child(self._requests, provider, status_class(record.status)).inc()
        if record.status >= 400 or record.error_kind is not None or record.status == 0:
            self.counts["error_count"] += 1
            kind = record.error_kind or ("upstream_status" if record.status else "no_response")
            self._child(self._errors, provider, self._error_kind(kind)).inc()
        duration = record.duration
        if duration is not None:
            self._child(self._duration, provider, "true" if record.streamed else "false").observe(
                max(0.0, duration)
            )
        ttfb = record.upstream_ttfb
        if ttfb is not None:
            self._child(self._ttfb, provider).observe(max(0.0, ttfb))
        overhead = record.overhead
        if overhead is None:
            overhead = _overhead_from_headers(record)
        if overhead is None and record.finished_at is not None:
            # No header recorded: count what is known to be ours.
            end = (
                record.upstream_started_at
                if record.upstream_started_at is not None
                else record.finished_at
            )
            overhead = max(0.0, end - record.received_at)
        if overhead is not None:
            self._overhead.observe(overhead)

    # -- other components ------------------------------------------------------

    def cache_hit(self) -> None:
        self.counts["cache_hits"] += 1
        self._cache["hits"].inc()

    def cache_miss(self) -> None:
        self.counts["cache_misses"] += 1
        self._cache["misses"].inc()

    def cache_bypass(self) -> None:
        self.counts["cache_bypass"] += 1
        self._cache["bypass"].inc()

    def cache_store(self) -> None:
        self.counts["cache_stores"] += 1
        self._cache["stores"].inc()

    def cache_error(self) -> None:
        self._cache["errors"].inc()

    def event_published(self, count: int = 1) -> None:
        self._events_published.inc(count)

    def event_dropped(self, reason: str = "buffer_full", count: int = 1) -> None:
        self._child(self._events_dropped, self._reason(reason)).inc(count)

    def token_cache_hit(self) -> None:
        self._child(self._token_cache, "hit").inc()

    def token_cache_miss(self) -> None:
        self._child(self._token_cache, "miss").inc()

    def ratelimit_rejected(self, scope: str) -> None:
        self._child(self._ratelimit_rejected, self._reason(scope)).inc()

    def ratelimit_degraded(self, outcome: str) -> None:
        self._child(self._ratelimit_degraded, self._reason(outcome)).inc()

    def redis_error(self, component: str) -> None:
        self._child(self._redis_errors, self._component(component)).inc()

    def invalidation(self, direction: str) -> None:
        """C{direction}: C{published}, C{received} or C{publish_failed}."""
        self._child(self._invalidations, self._reason(direction)).inc()

    # -- web -------------------------------------------------------------------

    def install_routes(self, web: Any, path: str = "/metrics", token: str = "") -> None:
        """Add C{path} (JSON) and C{path/prometheus} (text) to a L{WebApp}."""
        base = "/" + path.strip("/")
        web.add_route(
            base,
            _guarded(token, self._render_json),
            methods=["GET", "HEAD"],
            endpoint="metrics:json",
        )
        web.add_route(
            base + "/prometheus",
            _guarded(token, self._render_prometheus),
            methods=["GET", "HEAD"],
            endpoint="metrics:prometheus",
        )

    def _render_json(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        return json_body(request, 200, self.json_snapshot())

    def _render_prometheus(self, request: Request) -> bytes:
        request.setHeader(b"content-type", PROMETHEUS_CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return self.prometheus_text()


def _guarded(token: str, render: Callable[[Request], bytes]) -> Callable[[Request], bytes]:
    if not token:
        return render
    expected = token.encode("utf-8")

    def guarded(request: Request) -> bytes:
        presented = bearer_token(request)
        if presented is None:
            request.setHeader(b"www-authenticate", b'Bearer realm="metrics"')
            return json_error(
                request, 401, "missing or invalid Authorization header", code="unauthorized"
            )
        if not hmac.compare_digest(presented.encode("utf-8"), expected):
            return json_error(request, 401, "invalid metrics token", code="unauthorized")
        return render(request)

    return guarded


@implementer(IRequestObserver)
@attrs.define
class MetricsObserver:
    """Feeds proxied requests into L{Metrics}; never raises into the proxy."""

    metrics: Metrics
    #: Only times, status and the overhead are read, never bodies or usage.
    wants_bodies = False

    def request_started(self, record: RequestRecord) -> None:
        self.metrics.request_started(record)

    def request_finished(self, record: RequestRecord) -> None:
        try:
            self.metrics.request_finished(record)
        except Exception:  # metrics must never break a response
            log.failure("recording request metrics failed")


def sum_samples(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    """Total of the C{name} samples matching C{labels} (for tests and the JSON view)."""
    total = 0.0
    wanted = labels or {}
    families: Iterable[Any] = metrics.registry.collect()
    for family in families:
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in wanted.items()):
                total += sample.value
    return total


def install_metrics(web: Any, config: Any, metrics: Metrics) -> bool:
    """
    Serve C{metrics} on C{web} as C{config} says (C{ENABLE_METRICS},
    C{METRICS_PATH}, C{METRICS_TOKEN}); True when the routes were added.
    """
    if not config.enable_metrics:
        return False
    metrics.install_routes(web, config.metrics_path, config.metrics_token)
    return True
