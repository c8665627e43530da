"""
The streaming proxy against a real in-process fake upstream, over real TCP
(and TLS): forwarding, streaming, errors, timeouts, disconnects.
"""

from __future__ import annotations

import datetime
import gc
import io
import json
import uuid
from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from llmproxy.invalidation import InvalidationHub
from llmproxy.proxy.breaker import CircuitBreaker
from llmproxy.proxy.record import RequestRecord
from llmproxy.proxy.resource import ProxyResource, Upstream
from llmproxy.proxy.service import UpstreamClientService
from llmproxy.store.memory import MemoryStore
from llmproxy.store.records import Project, Token
from llmproxy.testing.fake_upstream import FakeUpstream
from llmproxy.testing.tls import make_test_pki
from llmproxy.tokens.format import generate_token, hash_token, obfuscate_token
from llmproxy.tokens.usage import UsageFlusher
from llmproxy.tokens.validator import TokenValidator
from llmproxy.web.app import WebApp
from llmproxy.web.root import Root
from llmproxy.web.site import LLMProxyRequest, LLMProxySite
from tests.support import BodyCollector

UPSTREAM_KEY = "sk-upstream-0123456789abcdef"
NOW = datetime.datetime.now(datetime.UTC)


class RecordingObserver:
    def __init__(self) -> None:
        self.started: list[RequestRecord] = []
        self.finished: list[RequestRecord] = []
        self.finished_d: list[defer.Deferred[RequestRecord]] = []

    def request_started(self, record: RequestRecord) -> None:
        self.started.append(record)

    def request_finished(self, record: RequestRecord) -> None:
        self.finished.append(record)
        waiting, self.finished_d = self.finished_d, []
        for d in waiting:
            d.callback(record)

    def next_finished(self) -> defer.Deferred[RequestRecord]:
        d: defer.Deferred[RequestRecord] = defer.Deferred()
        self.finished_d.append(d)
        return d


class ChunkCounter:
    """A per-chunk tap that counts what it saw."""

    def __init__(self) -> None:
        self.chunks = 0
        self.bytes = 0
        self.ended: bool | None = None

    def data_received(self, chunk: bytes) -> None:
        self.chunks += 1
        self.bytes += len(chunk)

    def body_ended(self, complete: bool) -> None:
        self.ended = complete


@attrs.define
class Harness:
    """A proxy listening on 127.0.0.1 in front of one upstream URL."""

    store: MemoryStore
    hub: InvalidationHub
    usage: UsageFlusher
    validator: TokenValidator
    client: UpstreamClientService
    resource: ProxyResource
    site: LLMProxySite
    url: str
    observer: RecordingObserver
    breaker: CircuitBreaker
    breaker_clock: Clock
    taps: list[ChunkCounter]
    project: Project

    def add_token(self, **kw: Any) -> tuple[str, Token]:
        secret = generate_token()
        fields: dict[str, Any] = dict(
            id=str(uuid.uuid4()),
            token_hash=hash_token(secret),
            display=obfuscate_token(secret),
            project_id=self.project.id,
            is_active=True,
            created_at=NOW,
        )
        fields.update(kw)
        token = Token(**fields)
        self.store.tokens[token.id] = token
        return secret, token


async def make_harness(
    test: TestCase,
    upstream_url: str,
    *,
    trust_root: Any = None,
    header_timeout: float = 30.0,
    idle_timeout: float = 300.0,
    connect_timeout: float = 5.0,
    max_concurrent: int = 100,
    max_response_capture: int = 262144,
    site_timeout: float = 60 * 60,
) -> Harness:
    store = MemoryStore()
    project = Project(
        id=str(uuid.uuid4()),
        name="p1",
        api_key=UPSTREAM_KEY,
        is_active=True,
        created_at=NOW,
        updated_at=NOW,
    )
    await store.create_project(project)
    hub = InvalidationHub()
    usage = UsageFlusher(store, reactor, flush_interval=5.0)
    validator = TokenValidator(store, reactor, usage=usage, hub=hub)
    client = UpstreamClientService(
        reactor,
        max_per_host=max_concurrent,
        connect_timeout=connect_timeout,
        max_concurrent=max_concurrent,
        trust_root=trust_root,
    )
    client.startService()
    test.addCleanup(client.stopService)
    observer = RecordingObserver()
    breaker_clock = Clock()
    breaker = CircuitBreaker(breaker_clock, threshold=5, cooldown=30.0, name="openai")
    taps: list[ChunkCounter] = []

    def tap_factory(record: RequestRecord, response: Any) -> ChunkCounter:
        tap = ChunkCounter()
        taps.append(tap)
        return tap

    resource = ProxyResource(
        reactor=reactor,
        upstream=Upstream("openai", upstream_url, header_timeout),
        client=client,
        validator=validator,
        breaker=breaker,
        observers=[observer],
        taps=[tap_factory],
        idle_timeout=idle_timeout,
        max_response_capture=max_response_capture,
    )
    site = LLMProxySite(
        Root(WebApp(clock=reactor).resource(), resource),
        clock=reactor,
        max_request_size=50 * 1024 * 1024,
        idle_timeout=site_timeout,
    )
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return Harness(
        store=store,
        hub=hub,
        usage=usage,
        validator=validator,
        client=client,
        resource=resource,
        site=site,
        url=f"http://127.0.0.1:{port.getHost().port}",
        observer=observer,
        breaker=breaker,
        breaker_clock=breaker_clock,
        taps=taps,
        project=project,
    )


def client_agent(test: TestCase) -> Agent:
    pool = HTTPConnectionPool(reactor, persistent=False)
    return Agent(reactor, pool=pool)


def chat(stream: bool = False, **extra: Any) -> bytes:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    body.update(extra)
    return json.dumps(body).encode()


async def call(
    agent: Agent,
    url: str,
    *,
    method: bytes = b"POST",
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[bytes, list[bytes]] | None = None,
) -> tuple[Any, bytes]:
    h = Headers(headers or {})
    if token is not None:
        h.setRawHeaders(b"authorization", [b"Bearer " + token.encode()])
    if body is not None and not h.hasHeader(b"content-type"):
        h.setRawHeaders(b"content-type", [b"application/json"])
    producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
    response = await agent.request(method, url.encode(), h, producer)
    collector = BodyCollector()
    response.deliverBody(collector)
    await collector.done
    if not collector.reason.check(ResponseDone, PotentialDataLoss):
        collector.reason.raiseException()
    return response, collector.data


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


class ForwardingTests(TestCase):
    timeout = 30

    async def setUp(self) -> None:  # type: ignore[override]
        self.fake = FakeUpstream(clock=reactor)
        listening = self.fake.listen(reactor)
        self.addCleanup(listening.stop)
        self.h = await make_harness(self, listening.url)
        self.agent = client_agent(self)
        self.secret, self.token = self.h.add_token()

    async def test_chat_completion_passes_through(self) -> None:
        response, body = await call(
            self.agent, self.h.url + "/v1/chat/completions", token=self.secret, body=chat()
        )
        self.assertEqual(response.code, 200)
        data = json.loads(body)
        self.assertEqual(data["object"], "chat.completion")
        self.assertEqual(data["model"], "gpt-4o")
        self.assertEqual(header(response, "x-proxy"), "llm-proxy")
        for name in (
            "x-proxy-received-at",
            "x-proxy-first-response-at",
            "x-proxy-final-response-at",
            "x-upstream-request-stop",
            "x-upstream-request-start",
        ):
            self.assertIsNotNone(header(response, name), name)
        seen = self.fake.last_request
        self.assertEqual(seen.header("authorization"), "Bearer " + UPSTREAM_KEY)
        self.assertEqual(seen.header("x-proxy"), "llm-proxy")
        self.assertEqual(seen.header("x-proxy-version"), "0.1.0")
        self.assertEqual(seen.header("x-proxy-id"), self.h.project.id)
        self.assertEqual(seen.header("x-request-id"), header(response, "x-request-id"))
        self.assertEqual(seen.header("x-forwarded-for"), "127.0.0.1")
        self.assertTrue(seen.header("x-upstream-request-start").isdigit())  # type: ignore[union-attr]
        self.assertEqual(json.loads(seen.body)["model"], "gpt-4o")
        overhead = float(header(response, "x-proxy-overhead-ms") or "-1")
        self.assertTrue(0 <= overhead < 10_000, overhead)

    async def test_headers_replaced_stripped_and_repeated(self) -> None:
        response, body = await call(
            self.agent,
            self.h.url + "/v1/chat/completions?fake_echo=1&x=1",
            token=self.secret,
            body=chat(),
            headers={
                b"x-request-id": [b"mine"],
                b"x-real-ip": [b"10.0.0.1"],
                b"x-forwarded-for": [b"1.2.3.4"],
                b"cf-connecting-ip": [b"1.2.3.4"],
                b"x-multi": [b"a", b"b"],
                b"connection": [b"x-secret-hop"],
                b"x-secret-hop": [b"1"],
                b"openai-organization": [b"org-1"],
            },
        )
        self.assertEqual(response.code, 200)
        echo = json.loads(body)
        seen = self.fake.last_request
        self.assertEqual(echo["path"], "/v1/chat/completions")
        self.assertIn("x=1", echo["query"])
        self.assertNotEqual(seen.header("x-request-id"), "mine")
        self.assertEqual(seen.header("x-request-id"), header(response, "x-request-id"))
        self.assertIsNone(seen.header("x-real-ip"))
        self.assertIsNone(seen.header("cf-connecting-ip"))
        self.assertIsNone(seen.header("x-secret-hop"))
        self.assertEqual(seen.header_values("x-forwarded-for"), ["127.0.0.1"])
        self.assertEqual(seen.header_values("x-multi"), ["a", "b"])
        self.assertEqual(seen.header("openai-organization"), "org-1")
        self.assertEqual(seen.header_values("authorization"), ["Bearer " + UPSTREAM_KEY])

    async def test_large_request_body_arrives_intact(self) -> None:
        import hashlib

        payload = json.dumps({"model": "gpt-4o", "input": "x" * (3 * 1024 * 1024)}).encode()
        response, body = await call(
            self.agent,
            self.h.url + "/v1/embeddings?fake_echo=1",
            token=self.secret,
            body=payload,
        )
        self.assertEqual(response.code, 200)
        echo = json.loads(body)
        self.assertEqual(echo["body_length"], len(payload))
        self.assertEqual(echo["body_sha256"], hashlib.sha256(payload).hexdigest())

    async def test_upstream_status_passes_through(self) -> None:
        response, body = await call(
            self.agent,
            self.h.url + "/v1/chat/completions",
            token=self.secret,
            body=chat(),
            headers={b"x-fake-error-status": [b"418"]},
        )
        self.assertEqual(response.code, 418)
        self.assertIn(b"error", body)
        self.assertEqual(header(response, "x-proxy"), "llm-proxy")
        self.assertIsNotNone(header(response, "x-upstream-request-stop"))

    async def test_get_models(self) -> None:
        response, body = await call(
            self.agent, self.h.url + "/v1/models", method=b"GET", token=self.secret
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["object"], "list")
        self.assertEqual(self.fake.last_request.method, b"GET")

    async def test_preflight_needs_no_token(self) -> None:
        response, body = await call(
            self.agent, self.h.url + "/v1/anything", method=b"OPTIONS", body=None
        )
        self.assertEqual(response.code, 204)
        self.assertEqual(self.fake.requests, [])

    async def test_observer_sees_a_full_record(self) -> None:
        finished = self.h.observer.next_finished()
        response, body = await call(
            self.agent, self.h.url + "/v1/chat/completions", token=self.secret, body=chat()
        )
        record = await finished
        self.assertEqual(len(self.h.observer.started), 1)
        self.assertEqual(record.status, 200)
        self.assertEqual(record.provider, "openai")
        self.assertEqual(record.project_id, self.h.project.id)
        self.assertEqual(record.token_id, self.token.id)
        self.assertEqual(record.token_hash, self.token.token_hash)
        self.assertEqual(record.request_id, header(response, "x-request-id"))
        self.assertEqual(record.response_body, body)
        self.assertEqual(json.loads(record.request_body)["model"], "gpt-4o")
        self.assertFalse(record.streamed)
        self.assertIsNone(record.error_kind)
        self.assertIsNotNone(record.upstream_ttfb)
        self.assertIsNotNone(record.duration)
        self.assertEqual(self.h.taps[0].bytes, len(body))
        self.assertIs(self.h.taps[0].ended, True)

    async def test_unlimited_usage_is_batched(self) -> None:
        for _ in range(3):
            await call(
                self.agent, self.h.url + "/v1/chat/completions", token=self.secret, body=chat()
            )
        self.assertEqual(self.h.store.tokens[self.token.id].request_count, 0)
        await self.h.usage.flush()
        stored = self.h.store.tokens[self.token.id]
        self.assertEqual(stored.request_count, 3)
        self.assertIsNotNone(stored.last_used_at)


class StreamingTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.fake = FakeUpstream(clock=reactor)
        listening = self.fake.listen(reactor)
        self.addCleanup(listening.stop)
        self.h = await make_harness(self, listening.url, idle_timeout=2.0)
        self.agent = client_agent(self)
        self.secret, self.token = self.h.add_token()

    async def open_stream(self, **knobs: str) -> Any:
        h = Headers({b"authorization": [b"Bearer " + self.secret.encode()]})
        h.setRawHeaders(b"content-type", [b"application/json"])
        for k, v in knobs.items():
            h.setRawHeaders(b"x-fake-" + k.replace("_", "-").encode(), [v.encode()])
        return await self.agent.request(
            b"POST",
            (self.h.url + "/v1/chat/completions").encode(),
            h,
            FileBodyProducer(io.BytesIO(chat(stream=True))),
        )

    async def test_events_arrive_as_the_upstream_sends_them(self) -> None:
        response = await self.open_stream(chunks="5", chunk_delay_ms="300")
        self.assertEqual(response.code, 200)
        self.assertIn("text/event-stream", header(response, "content-type") or "")
        self.assertIsNone(header(response, "x-upstream-request-start"))
        sent_when_first_seen: list[int] = []

        def on_data(collector: BodyCollector, data: bytes) -> None:
            if not sent_when_first_seen and b"data:" in data:
                sent_when_first_seen.append(self.fake.events_sent)

        collector = BodyCollector(on_data)
        response.deliverBody(collector)
        await collector.done
        self.assertTrue(collector.reason.check(ResponseDone, PotentialDataLoss))
        events = [e for e in collector.data.split(b"\n\n") if e.startswith(b"data:")]
        self.assertEqual(events[-1], b"data: [DONE]")
        # 5 content events + role + finish + [DONE]: the first reached the client
        # while the upstream had written only the first one or two.
        self.assertLessEqual(sent_when_first_seen[0], 2)
        self.assertGreater(self.fake.events_sent, 5)
        record = self.h.observer.finished[-1]
        self.assertTrue(record.streamed)
        self.assertIsNone(record.error_kind)

    async def test_client_disconnect_cancels_the_upstream_stream(self) -> None:
        response = await self.open_stream(chunks="50", chunk_delay_ms="50")
        finished = self.h.observer.next_finished()

        def on_data(collector: BodyCollector, data: bytes) -> None:
            if collector.data.count(b"data:") >= 3 and not hasattr(collector, "closed"):
                collector.closed = True  # type: ignore[attr-defined]
                collector.transport.stopProducing()  # type: ignore[union-attr]

        collector = BodyCollector(on_data)
        response.deliverBody(collector)
        await collector.done
        record = await finished
        self.assertEqual(record.error_kind, "client_aborted")
        # Give the upstream a moment to notice the closed connection.
        for _ in range(50):
            if self.fake.disconnects:
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(len(self.fake.disconnects), 1)
        self.assertLess(self.fake.disconnects[0].events_sent, 10)
        self.assertEqual(self.fake.streams_completed, 0)

    async def test_client_disconnect_before_headers_cancels_upstream(self) -> None:
        h = Headers({b"authorization": [b"Bearer " + self.secret.encode()]})
        h.setRawHeaders(b"x-fake-latency-ms", [b"3000"])
        finished = self.h.observer.next_finished()
        d = self.agent.request(b"GET", (self.h.url + "/v1/models").encode(), h)
        for _ in range(100):
            if self.fake.connections_opened:
                break
            await deferLater(reactor, 0.01, lambda: None)
        await deferLater(reactor, 0.1, lambda: None)
        d.cancel()
        with self.assertRaises(ResponseNeverReceived):
            await d
        record = await finished
        self.assertEqual(record.error_kind, "client_aborted")
        for _ in range(100):
            if self.fake.connections_lost:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.fake.connections_lost, 1)

    async def test_upstream_cut_aborts_the_client(self) -> None:
        response = await self.open_stream(chunks="10", cut_after="3")
        collector = BodyCollector()
        response.deliverBody(collector)
        await collector.done
        # Not a clean end: the client sees a failed body, never ResponseDone.
        self.assertFalse(collector.reason.check(ResponseDone, PotentialDataLoss))
        self.assertEqual(collector.data.count(b"data:"), 3)
        self.assertNotIn(b"[DONE]", collector.data)
        record = self.h.observer.finished[-1]
        self.assertEqual(record.error_kind, "upstream_cut")
        self.assertIs(self.h.taps[-1].ended, False)

    async def test_idle_upstream_is_cut_between_chunks(self) -> None:
        # idle timeout is 2 s; events every 3 s: the second never comes through.
        response = await self.open_stream(chunks="5", chunk_delay_ms="3000")
        collector = BodyCollector()
        response.deliverBody(collector)
        await collector.done
        self.assertFalse(collector.reason.check(ResponseDone, PotentialDataLoss))
        self.assertEqual(self.h.observer.finished[-1].error_kind, "upstream_idle_timeout")

    async def test_stream_outlives_the_client_connection_timeout(self) -> None:
        # The client connection's idle timeout (1 s here) is off while a
        # response is being produced: it never cuts a stream.
        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor)
        self.addCleanup(listening.stop)
        self.h = await make_harness(self, listening.url, site_timeout=1.0)
        self.secret, self.token = self.h.add_token()
        response = await self.open_stream(chunks="6", chunk_delay_ms="400")
        collector = BodyCollector()
        response.deliverBody(collector)
        await collector.done
        self.assertTrue(collector.reason.check(ResponseDone, PotentialDataLoss))
        self.assertIn(b"data: [DONE]", collector.data)

    async def test_long_stream_is_not_limited_by_total_duration(self) -> None:
        # 8 events 0.5 s apart = 4 s in total, longer than the 2 s idle timeout.
        response = await self.open_stream(chunks="5", chunk_delay_ms="500")
        collector = BodyCollector()
        response.deliverBody(collector)
        await collector.done
        self.assertTrue(collector.reason.check(ResponseDone, PotentialDataLoss))
        self.assertIn(b"data: [DONE]", collector.data)


class UpstreamFailureTests(TestCase):
    timeout = 30

    async def test_connection_refused_is_502(self) -> None:
        from llmproxy.testing.daemon import free_port

        h = await make_harness(self, f"http://127.0.0.1:{free_port()}")
        secret, _ = h.add_token()
        response, body = await call(
            client_agent(self), h.url + "/v1/chat/completions", token=secret, body=chat()
        )
        self.assertEqual(response.code, 502)
        data = json.loads(body)
        self.assertEqual(data["error"], "Proxy error")
        self.assertEqual(data["code"], "upstream_unreachable")
        self.assertEqual(h.observer.finished[-1].error_kind, "upstream_unreachable")

    async def test_slow_headers_are_504(self) -> None:
        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor)
        self.addCleanup(listening.stop)
        h = await make_harness(self, listening.url, header_timeout=0.3)
        secret, _ = h.add_token()
        response, body = await call(
            client_agent(self),
            h.url + "/v1/chat/completions",
            token=secret,
            body=chat(),
            headers={b"x-fake-latency-ms": [b"3000"]},
        )
        self.assertEqual(response.code, 504)
        data = json.loads(body)
        self.assertEqual((data["error"], data["code"]), ("Request timeout", "timeout"))
        for _ in range(100):
            if fake.connections_lost:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(fake.connections_lost, 1)

    async def test_breaker_opens_after_five_failures_and_closes_after_cooldown(self) -> None:
        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor)
        self.addCleanup(listening.stop)
        h = await make_harness(self, listening.url)
        secret, _ = h.add_token()
        agent = client_agent(self)
        url = h.url + "/v1/chat/completions"
        failing = {b"x-fake-error-status": [b"504"]}
        for _ in range(5):
            response, _body = await call(agent, url, token=secret, body=chat(), headers=failing)
            self.assertEqual(response.code, 504)
        response, body = await call(agent, url, token=secret, body=chat())
        self.assertEqual(response.code, 503)
        self.assertEqual(
            json.loads(body),
            {"error": "Upstream unavailable (circuit breaker open)", "code": "circuit_open"},
        )
        self.assertEqual(len(header(response, "x-request-id") or ""), 36)
        self.assertEqual(len(fake.requests), 5)
        # Even preflights and unauthenticated requests are refused while open.
        response, _ = await call(agent, url, method=b"OPTIONS")
        self.assertEqual(response.code, 503)
        h.breaker_clock.advance(30)
        response, _ = await call(agent, url, token=secret, body=chat())
        self.assertEqual(response.code, 200)
        self.assertEqual(len(fake.requests), 6)

    async def test_success_resets_the_failure_count(self) -> None:
        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor)
        self.addCleanup(listening.stop)
        h = await make_harness(self, listening.url)
        secret, _ = h.add_token()
        agent = client_agent(self)
        url = h.url + "/v1/chat/completions"
        failing = {b"x-fake-error-status": [b"502"]}
        for _ in range(4):
            await call(agent, url, token=secret, body=chat(), headers=failing)
        await call(agent, url, token=secret, body=chat())
        for _ in range(4):
            await call(agent, url, token=secret, body=chat(), headers=failing)
        response, _ = await call(agent, url, token=secret, body=chat())
        self.assertEqual(response.code, 200)


class TLSTests(TestCase):
    timeout = 30

    async def test_verified_tls_upstream(self) -> None:
        pki = make_test_pki()
        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor, context_factory=pki.server_options())
        self.addCleanup(listening.stop)
        h = await make_harness(self, listening.url, trust_root=pki.trust_root())
        secret, _ = h.add_token()
        response, body = await call(
            client_agent(self), h.url + "/v1/chat/completions", token=secret, body=chat()
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["object"], "chat.completion")
        self.assertEqual(fake.last_request.header("authorization"), "Bearer " + UPSTREAM_KEY)

    async def test_wrong_host_certificate_is_502(self) -> None:
        pki = make_test_pki()
        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor, context_factory=pki.wrong_host_options())
        self.addCleanup(listening.stop)
        h = await make_harness(self, listening.url, trust_root=pki.trust_root())
        secret, _ = h.add_token()
        response, body = await call(
            client_agent(self), h.url + "/v1/chat/completions", token=secret, body=chat()
        )
        self.assertEqual(response.code, 502)
        data = json.loads(body)
        self.assertEqual(data["error"], "Proxy error")
        self.assertEqual(data["code"], "upstream_tls_error")
        self.assertEqual(fake.requests, [])

    async def test_untrusted_ca_is_502(self) -> None:
        pki = make_test_pki()
        other = make_test_pki()
        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor, context_factory=pki.server_options())
        self.addCleanup(listening.stop)
        h = await make_harness(self, listening.url, trust_root=other.trust_root())
        secret, _ = h.add_token()
        response, body = await call(
            client_agent(self), h.url + "/v1/chat/completions", token=secret, body=chat()
        )
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["code"], "upstream_tls_error")


class AuthTests(TestCase):
    """The reference's token errors, exactly, and nothing reaches the upstream."""

    timeout = 30

    async def setUp(self) -> None:  # type: ignore[override]
        self.fake = FakeUpstream(clock=reactor)
        listening = self.fake.listen(reactor)
        self.addCleanup(listening.stop)
        self.h = await make_harness(self, listening.url)
        self.audited: list[tuple[str, str | None]] = []
        self.h.resource.audit = lambda request, rejection, presented: self.audited.append(
            (rejection.code, presented)
        )
        self.agent = client_agent(self)
        self.url = self.h.url + "/v1/chat/completions"

    async def post(self, token: str | None, **kw: Any) -> tuple[int, Any, Any]:
        headers = kw.pop("headers", None)
        if token is None and headers is None:
            headers = {}
        response, body = await call(
            self.agent, self.url, token=token, body=chat(), headers=headers, **kw
        )
        return response.code, json.loads(body), response

    async def test_refused_requests_are_not_kept(self) -> None:
        """
        Nothing of a refused request outlives it: each refusal is a new
        exception, so the tracebacks (and with them the frames and the
        requests) of earlier refusals are not chained onto a shared one.
        """

        def alive() -> int:
            gc.collect()
            return sum(isinstance(o, LLMProxyRequest) for o in gc.get_objects())

        refusals = [{}, {b"authorization": [b"Basic bXQ="]}, {b"authorization": [b"sk-x"]}]
        for headers in refusals:
            await self.post(None, headers=headers)
        before = alive()
        for _ in range(5):
            for headers in refusals:
                status, body, _response = await self.post(None, headers=headers)
                self.assertEqual((status, body["code"]), (401, "invalid_token"))
        self.assertEqual(alive(), before)

    async def test_missing_authorization(self) -> None:
        status, body, response = await self.post(None)
        self.assertEqual(status, 401)
        self.assertEqual(
            body,
            {
                "error": "Invalid token",
                "description": "missing or invalid authorization header",
                "code": "invalid_token",
            },
        )
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(self.fake.requests, [])
        self.assertEqual(self.audited, [("invalid_token", None)])
        # Refusals carry their own request id and the proxy's overhead too.
        self.assertEqual(len(header(response, "x-request-id") or ""), 36)
        self.assertIsNotNone(header(response, "x-proxy-overhead-ms"))

    async def test_malformed_and_unknown_tokens(self) -> None:
        status, body, _ = await self.post("abc")
        self.assertEqual((status, body["code"]), (401, "invalid_token"))
        status, body, _ = await self.post("sk-" + "A" * 22)
        self.assertEqual(body, {"error": "Token not found", "code": "token_not_found"})
        self.assertEqual(self.fake.requests, [])
        self.assertEqual([c for c, _ in self.audited], ["invalid_token", "token_not_found"])

    async def test_inactive_expired_and_quota(self) -> None:
        inactive, _ = self.h.add_token(is_active=False)
        expired, _ = self.h.add_token(expires_at=NOW - datetime.timedelta(minutes=1))
        limited, limited_token = self.h.add_token(max_requests=2)
        status, body, _ = await self.post(inactive)
        self.assertEqual(
            (status, body), (401, {"error": "Token is inactive", "code": "token_inactive"})
        )
        status, body, _ = await self.post(expired)
        self.assertEqual(
            (status, body), (401, {"error": "Token has expired", "code": "token_expired"})
        )
        self.assertEqual((await self.post(limited))[0], 200)
        self.assertEqual((await self.post(limited))[0], 200)
        status, body, _ = await self.post(limited)
        self.assertEqual(
            (status, body), (429, {"error": "Rate limit exceeded", "code": "rate_limit_exceeded"})
        )
        self.assertEqual(self.h.store.tokens[limited_token.id].request_count, 2)
        self.assertEqual(len(self.fake.requests), 2)
        self.assertEqual(self.h.observer.finished[-1].error_kind, "quota")

    async def test_revocation_is_effective_on_the_next_request(self) -> None:
        secret, token = self.h.add_token()
        self.assertEqual((await self.post(secret))[0], 200)
        self.h.store.tokens[token.id] = attrs.evolve(token, is_active=False)
        self.h.hub.token_changed(token.token_hash)
        status, body, _ = await self.post(secret)
        self.assertEqual((status, body["code"]), (401, "token_inactive"))
        self.assertEqual(len(self.fake.requests), 1)

    async def test_inactive_project_is_403(self) -> None:
        secret, _ = self.h.add_token()
        self.assertEqual((await self.post(secret))[0], 200)
        self.h.store.projects[self.h.project.id] = attrs.evolve(self.h.project, is_active=False)
        self.h.hub.project_changed(self.h.project.id)
        status, body, _ = await self.post(secret)
        self.assertEqual(
            (status, body), (403, {"error": "Project is inactive", "code": "project_inactive"})
        )
        self.assertEqual(len(self.fake.requests), 1)
        # With the guard off the same token goes through.
        self.h.resource.enforce_project_active = False
        self.assertEqual((await self.post(secret))[0], 200)

    async def test_missing_provider_key_is_503(self) -> None:
        self.h.store.projects[self.h.project.id] = attrs.evolve(self.h.project, api_key="")
        secret, _ = self.h.add_token()
        status, body, _ = await self.post(secret)
        self.assertEqual(status, 503)
        self.assertEqual(
            body,
            {
                "error": "Upstream authentication error",
                "description": "failed to load upstream API key",
                "code": "upstream_auth_error",
            },
        )
        self.assertEqual(self.fake.requests, [])


class CacheTests(TestCase):
    timeout = 30

    async def test_forced_public_get_is_served_from_the_cache(self) -> None:
        from llmproxy.cache.facade import ResponseCache
        from llmproxy.config import Config

        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor)
        self.addCleanup(listening.stop)
        h = await make_harness(self, listening.url)
        h.resource.cache = ResponseCache.from_config(
            Config.from_env({"MANAGEMENT_TOKEN": "mt"}), reactor
        )
        secret, token = h.add_token()
        agent = client_agent(self)
        forced = {b"cache-control": [b"public, max-age=30"]}
        first, body1 = await call(
            agent, h.url + "/v1/models", method=b"GET", token=secret, headers=forced
        )
        second, body2 = await call(agent, h.url + "/v1/models", method=b"GET", token=secret)
        self.assertEqual((first.code, second.code), (200, 200))
        self.assertEqual(body1, body2)
        self.assertEqual(len(fake.requests), 1)
        self.assertIn("stored", header(first, "cache-status") or "")
        self.assertIn("hit", header(second, "cache-status") or "")
        self.assertNotEqual(header(first, "x-request-id"), header(second, "x-request-id"))
        self.assertEqual(h.observer.finished[-1].cache_status, "hit")
        await h.usage.flush()
        stored = h.store.tokens[token.id]
        # The hit is a cache hit, not a request.
        self.assertEqual((stored.request_count, stored.cache_hit_count), (1, 1))


class RateLimitTests(TestCase):
    timeout = 30

    async def test_token_rate_limit_refuses_with_headers(self) -> None:
        from llmproxy.ratelimit.memory import MemoryRateLimiter
        from llmproxy.ratelimit.policy import RateLimitPolicy

        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor)
        self.addCleanup(listening.stop)
        h = await make_harness(self, listening.url)
        h.resource.rate_limits = RateLimitPolicy(
            MemoryRateLimiter(reactor), window=60.0, token_limit=2
        )
        secret, _ = h.add_token()
        agent = client_agent(self)
        url = h.url + "/v1/chat/completions"
        first, _ = await call(agent, url, token=secret, body=chat())
        await call(agent, url, token=secret, body=chat())
        third, body = await call(agent, url, token=secret, body=chat())
        self.assertEqual(first.code, 200)
        self.assertEqual(header(first, "ratelimit-limit"), "2")
        self.assertEqual(third.code, 429)
        data = json.loads(body)
        self.assertEqual(
            (data["error"], data["code"]), ("Rate limit exceeded", "rate_limit_exceeded")
        )
        self.assertIsNotNone(header(third, "retry-after"))
        self.assertEqual(len(fake.requests), 2)
        self.assertEqual(h.observer.finished[-1].error_kind, "rate_limited")


class BodyFilterTests(TestCase):
    """The usage chunk the proxy asks for on the client's behalf never reaches it."""

    timeout = 30

    async def test_injected_usage_is_stripped_and_recorded(self) -> None:
        import functools

        from llmproxy.config import Config
        from llmproxy.events.usage import make_usage_tap, prepare_request_body

        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor)
        self.addCleanup(listening.stop)
        h = await make_harness(self, listening.url)
        config = Config.from_env({"MANAGEMENT_TOKEN": "mt", "STREAM_INCLUDE_USAGE": "true"})
        h.resource.prepare_body = functools.partial(prepare_request_body, config=config)
        h.resource.taps.append(make_usage_tap)
        secret, _ = h.add_token()
        agent = client_agent(self)
        finished = h.observer.next_finished()
        response, body = await call(
            agent, h.url + "/v1/chat/completions", token=secret, body=chat(stream=True)
        )
        record = await finished
        self.assertEqual(response.code, 200)
        sent = fake.last_request.json()
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        events = [json.loads(e[6:]) for e in body.split(b"\n\n") if e.startswith(b"data: {")]
        self.assertTrue(events)
        self.assertTrue(all(e["choices"] for e in events), "usage-only chunk leaked")
        self.assertTrue(all("usage" not in e for e in events), "usage: null leaked")
        self.assertIn(b"data: [DONE]", body)
        self.assertTrue(record.usage_injected)
        self.assertIsNotNone(record.usage)
        self.assertEqual(record.usage["source"], "reported")  # type: ignore[index]
        self.assertEqual(record.response_body, body)


class CompressedAnswerTests(TestCase):
    """Usage is read from every answer, whatever codings the client accepts."""

    timeout = 30

    async def test_upstream_is_asked_only_for_codings_the_proxy_reads(self) -> None:
        import gzip

        from llmproxy.events.usage import make_usage_tap

        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor)
        self.addCleanup(listening.stop)
        h = await make_harness(self, listening.url)
        h.resource.taps.append(make_usage_tap)
        secret, _ = h.add_token()
        agent = client_agent(self)
        # What Node's fetch, and httpx with brotli installed, send.
        for accepted, coding in ((b"gzip, deflate, br, zstd", b"gzip"), (b"br, zstd", None)):
            finished = h.observer.next_finished()
            response, body = await call(
                agent,
                h.url + "/v1/chat/completions",
                token=secret,
                body=chat(),
                headers={b"accept-encoding": [accepted], b"x-fake-gzip": [b"1"]},
            )
            record = await finished
            self.assertEqual(response.code, 200)
            self.assertEqual(
                response.headers.getRawHeaders(b"content-encoding"),
                None if coding is None else [coding],
            )
            answer = json.loads(gzip.decompress(body) if coding else body)
            self.assertEqual(record.usage["total_tokens"], answer["usage"]["total_tokens"])  # type: ignore[index]
        asked = [r.header("accept-encoding") for r in fake.requests]
        self.assertEqual(asked, ["gzip, deflate", "identity"])


class PoolTests(TestCase):
    timeout = 30

    async def test_connections_are_reused(self) -> None:
        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor)
        self.addCleanup(listening.stop)
        h = await make_harness(self, listening.url)
        secret, _ = h.add_token()
        agent = client_agent(self)
        for _ in range(5):
            response, _ = await call(
                agent, h.url + "/v1/chat/completions", token=secret, body=chat()
            )
            self.assertEqual(response.code, 200)
        self.assertEqual(fake.connections_opened, 1)

    async def test_concurrency_cap_per_provider(self) -> None:
        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor)
        self.addCleanup(listening.stop)
        h = await make_harness(self, listening.url, max_concurrent=2)
        secret, _ = h.add_token()
        agent = client_agent(self)
        slow = {b"x-fake-latency-ms": [b"200"]}
        results = await defer.gatherResults(
            [
                defer.ensureDeferred(
                    call(
                        agent,
                        h.url + "/v1/chat/completions",
                        token=secret,
                        body=chat(),
                        headers=slow,
                    )
                )
                for _ in range(6)
            ]
        )
        self.assertEqual([r.code for r, _ in results], [200] * 6)
        # Six requests, never more than two at once: two connections did it all.
        self.assertEqual(fake.connections_opened, 2)
