"""Metrics: JSON and Prometheus routes, request observation, bounded labels."""

from __future__ import annotations

import json
import time
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from llmproxy.config import Config
from llmproxy.metrics import (
    MAX_LABEL_VALUES,
    Metrics,
    MetricsObserver,
    install_metrics,
    overhead_header,
    proxy_overhead_seconds,
    sum_samples,
)
from llmproxy.proxy.record import IRequestObserver, RequestRecord
from llmproxy.web.app import WebApp
from llmproxy.web.root import Root

BASE = {"MANAGEMENT_TOKEN": "mt-secret-value"}
REFERENCE_FIELDS = (
    "uptime_seconds",
    "request_count",
    "error_count",
    "cache_hits",
    "cache_misses",
    "cache_bypass",
    "cache_stores",
)


class _Proxy(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"proxied"


def record(
    provider: str = "openai",
    status: int = 200,
    start: float = 100.0,
    token_hash: str | None = None,
    **kw: Any,
) -> RequestRecord:
    return RequestRecord(
        request_id="req-" + str(start),
        method="POST",
        path="/v1/chat/completions",
        received_at=start,
        received_at_wall=1_700_000_000.0,
        provider=provider,
        status=status,
        token_hash=token_hash,
        **kw,
    )


class RoutesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.metrics = Metrics(self.clock)

    def client(self, **env: str) -> StubTreq:
        config = Config.from_env(dict(BASE, **env))
        web = WebApp(clock=self.clock)
        install_metrics(web, config, self.metrics)
        return StubTreq(Root(web.resource(), _Proxy()))

    def get(self, client: StubTreq, path: str, **kw: Any) -> tuple[Any, bytes]:
        response = self.successResultOf(client.get("http://x" + path, **kw))
        return response, self.successResultOf(response.content())

    def test_json_fields(self) -> None:
        observer = MetricsObserver(self.metrics)
        ok = record(finished_at=101.0)
        observer.request_started(ok)
        observer.request_finished(ok)
        failed = record(status=502, start=102.0, finished_at=103.0, error_kind="upstream_timeout")
        observer.request_started(failed)
        observer.request_finished(failed)
        self.metrics.cache_hit()
        self.metrics.cache_miss()
        self.metrics.cache_miss()
        self.metrics.cache_bypass()
        self.metrics.cache_store()
        self.clock.advance(12.5)

        response, body = self.get(self.client(), "/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        data = json.loads(body)
        for field in REFERENCE_FIELDS:
            self.assertIsInstance(data[field], (int, float), field)
        self.assertEqual(data["uptime_seconds"], 12.5)
        self.assertEqual(data["request_count"], 2)
        self.assertEqual(data["error_count"], 1)
        self.assertEqual(
            (data["cache_hits"], data["cache_misses"], data["cache_bypass"], data["cache_stores"]),
            (1, 2, 1, 1),
        )

    def test_prometheus_text(self) -> None:
        observer = MetricsObserver(self.metrics)
        r = record(
            finished_at=100.9,
            upstream_started_at=100.01,
            upstream_headers_at=100.51,
            streamed=True,
        )
        observer.request_started(r)
        self.metrics.event_dropped("buffer_full")
        self.metrics.token_cache_hit()
        self.metrics.ratelimit_rejected("token")
        response, body = self.get(self.client(), "/metrics/prometheus")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"),
            ["text/plain; version=0.0.4; charset=utf-8"],
        )
        text = body.decode()
        self.assertIn("# TYPE llm_proxy_requests_total counter", text)
        self.assertIn("llm_proxy_in_flight_requests 1.0", text)
        self.assertIn("llm_proxy_in_flight_streams 1.0", text)
        self.assertIn('llm_proxy_events_dropped_total{reason="buffer_full"} 1.0', text)
        self.assertIn('llm_proxy_token_cache_lookups_total{result="hit"} 1.0', text)
        self.assertIn('llm_proxy_ratelimit_rejected_total{scope="token"} 1.0', text)
        self.assertIn("# TYPE llm_proxy_upstream_ttfb_seconds histogram", text)
        self.assertIn("# TYPE llm_proxy_overhead_seconds histogram", text)
        self.assertIn("llm_proxy_uptime_seconds", text)
        observer.request_finished(r)
        _, body = self.get(self.client(), "/metrics/prometheus")
        text = body.decode()
        self.assertIn('llm_proxy_requests_total{provider="openai",status_class="2xx"} 1.0', text)
        self.assertIn('llm_proxy_upstream_ttfb_seconds_count{provider="openai"} 1.0', text)
        self.assertIn('llm_proxy_upstream_ttfb_seconds_bucket{le="0.5",provider="openai"}', text)
        self.assertIn("llm_proxy_in_flight_streams 0.0", text)

    def test_metrics_path_changed(self) -> None:
        client = self.client(METRICS_PATH="/internal/stats/")
        response, body = self.get(client, "/internal/stats")
        self.assertEqual(response.code, 200)
        self.assertIn("request_count", json.loads(body))
        response, body = self.get(client, "/internal/stats/prometheus")
        self.assertEqual(response.code, 200)
        self.assertIn(b"# TYPE llm_proxy_requests_total counter", body)
        response, _ = self.get(client, "/metrics")
        self.assertEqual(response.code, 404)

    def test_disabled(self) -> None:
        client = self.client(ENABLE_METRICS="false")
        for path in ("/metrics", "/metrics/prometheus"):
            response, body = self.get(client, path)
            self.assertEqual(response.code, 404)
            self.assertEqual(json.loads(body)["code"], "not_found")

    def test_bearer_protection(self) -> None:
        client = self.client(METRICS_TOKEN="scrape-secret")
        for path in ("/metrics", "/metrics/prometheus"):
            response, body = self.get(client, path)
            self.assertEqual(response.code, 401)
            self.assertNotIn(b"scrape-secret", body)
            response, body = self.get(
                client, path, headers={"Authorization": "Bearer wrong-secret"}
            )
            self.assertEqual(response.code, 401)
            self.assertEqual(json.loads(body)["error"], "invalid metrics token")
            response, _ = self.get(client, path, headers={"Authorization": "Bearer scrape-secret"})
            self.assertEqual(response.code, 200)

    def test_post_not_allowed(self) -> None:
        response = self.successResultOf(self.client().post("http://x/metrics", data=b""))
        self.assertEqual(response.code, 405)


class ObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics(Clock(), process_metrics=False)
        self.observer = MetricsObserver(self.metrics)

    def finish(self, r: RequestRecord) -> None:
        self.observer.request_started(r)
        self.observer.request_finished(r)

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IRequestObserver, self.observer))

    def test_status_classes_and_errors(self) -> None:
        self.finish(record(status=200, finished_at=101))
        self.finish(record(status=404, finished_at=101))
        self.finish(record(status=0, finished_at=101, error_kind="client_aborted"))
        m = self.metrics
        self.assertEqual(sum_samples(m, "llm_proxy_requests_total", {"status_class": "2xx"}), 1)
        self.assertEqual(sum_samples(m, "llm_proxy_requests_total", {"status_class": "4xx"}), 1)
        self.assertEqual(sum_samples(m, "llm_proxy_requests_total", {"status_class": "none"}), 1)
        self.assertEqual(sum_samples(m, "llm_proxy_errors_total", {"kind": "client_aborted"}), 1)
        self.assertEqual(m.json_snapshot()["error_count"], 2)

    def test_labels_bounded_and_free_of_secrets(self) -> None:
        for i in range(MAX_LABEL_VALUES + 40):
            self.finish(
                record(
                    provider=f"provider-{i}",
                    finished_at=101,
                    token_hash=f"sk-secret-{i}",
                    project_id=f"project-{i}",
                )
            )
        providers = set()
        text = self.metrics.prometheus_text().decode()
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                providers.add(sample.labels.get("provider"))
                for value in sample.labels.values():
                    self.assertNotIn("sk-", value)
                    self.assertNotIn("project-", value)
        providers.discard(None)
        self.assertEqual(len(providers), MAX_LABEL_VALUES + 1)
        self.assertIn("other", providers)
        self.assertNotIn("sk-secret", text)
        self.assertEqual(
            sum_samples(self.metrics, "llm_proxy_requests_total", {"provider": "other"}), 40
        )

    def test_observer_never_raises(self) -> None:
        broken = record(finished_at=101)
        broken.response_headers = [(b"X-Proxy-Overhead-Ms", b"not-a-number")]
        self.finish(broken)
        self.assertEqual(self.metrics.json_snapshot()["request_count"], 1)

    def test_overhead_from_header(self) -> None:
        r = record(finished_at=105.0, upstream_started_at=100.5, upstream_headers_at=104.0)
        r.response_headers = [(b"x-proxy-overhead-ms", b"3.50")]
        self.finish(r)
        self.assertEqual(sum_samples(self.metrics, "llm_proxy_overhead_seconds_sum"), 0.0035)


class OverheadTests(SynchronousTestCase):
    def test_no_upstream(self) -> None:
        r = record(start=10.0)
        self.assertEqual(overhead_header(r, now=10.0125), (b"X-Proxy-Overhead-Ms", b"12.50"))

    def test_upstream_time_excluded(self) -> None:
        r = record(start=10.0, upstream_started_at=10.002, upstream_headers_at=12.0)
        self.assertAlmostEqual(proxy_overhead_seconds(r, 12.001), 0.003)
        name, value = overhead_header(r, now=12.001)
        self.assertEqual(value, b"3.00")

    def test_waiting_for_upstream(self) -> None:
        r = record(start=10.0, upstream_started_at=10.004)
        self.assertAlmostEqual(proxy_overhead_seconds(r, 11.0), 0.004)


class IsolationTests(SynchronousTestCase):
    def test_two_instances_do_not_share(self) -> None:
        a, b = Metrics(Clock()), Metrics(Clock())
        a.cache_hit()
        self.assertEqual(a.json_snapshot()["cache_hits"], 1)
        self.assertEqual(b.json_snapshot()["cache_hits"], 0)
        self.assertIn(b"llm_proxy_cache_hits_total 0.0", b.prometheus_text())


class FastHistogramTests(SynchronousTestCase):
    def test_exposed_exactly_as_prometheus_client_exposes_a_histogram(self) -> None:
        from prometheus_client import CollectorRegistry, Histogram, generate_latest

        from llmproxy.metrics import LATENCY_BUCKETS, FastHistogram

        stock, fast = CollectorRegistry(), CollectorRegistry()
        labelled = (
            Histogram("x_seconds", "doc", ["provider"], buckets=LATENCY_BUCKETS, registry=stock),
            FastHistogram("x_seconds", "doc", ["provider"], buckets=LATENCY_BUCKETS, registry=fast),
        )
        plain = (
            Histogram("y_seconds", "doc", buckets=(0.1, 1), registry=stock),
            FastHistogram("y_seconds", "doc", buckets=(0.1, 1), registry=fast),
        )
        for value in (0.0, 0.001, 0.005, 0.3, 7.0, 400.0):
            for h in labelled:
                h.labels("openai").observe(value)
            for g in plain:
                g.observe(value)
        expected = [
            line
            for line in generate_latest(stock).decode().splitlines()
            if "_created" not in line  # the creation time is not kept
        ]
        self.assertEqual(generate_latest(fast).decode().splitlines(), expected)


class FastCounterTests(SynchronousTestCase):
    def test_exposed_exactly_as_prometheus_client_exposes_a_counter(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, generate_latest

        from llmproxy.metrics import FastCounter

        stock, fast = CollectorRegistry(), CollectorRegistry()
        labelled = (
            Counter("x_requests", "doc", ["provider", "status_class"], registry=stock),
            FastCounter("x_requests", "doc", ["provider", "status_class"], registry=fast),
        )
        plain = (
            Counter("y_hits_total", "doc", registry=stock),
            FastCounter("y_hits_total", "doc", registry=fast),
        )
        unused = (
            Counter("z_lookups", "doc", ["result"], registry=stock),
            FastCounter("z_lookups", "doc", ["result"], registry=fast),
        )
        for labels, amount in ((("openai", "2xx"), 1), (("openai", "5xx"), 2.5), (("x", "2xx"), 1)):
            for c in labelled:
                c.labels(*labels).inc(amount)
        for c in plain:
            c.inc()
            c.inc(3)
            self.assertRaises(ValueError, c.inc, -1)
        self.assertRaises(ValueError, unused[1].labels, "hit", "extra")

        def lines(registry: CollectorRegistry) -> list[str]:
            # the creation times differ by the microseconds between the two
            return [
                line.rsplit(" ", 1)[0] if "_created" in line else line
                for line in generate_latest(registry).decode().splitlines()
            ]

        self.assertEqual(lines(fast), lines(stock))
        created = [
            float(line.rsplit(" ", 1)[1])
            for line in generate_latest(fast).decode().splitlines()
            if line.startswith("y_hits_created")
        ]
        self.assertEqual(len(created), 1)
        self.assertLess(abs(created[0] - time.time()), 60)
