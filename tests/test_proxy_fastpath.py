"""
Requests answered on the proxy's synchronous path (token and project
already cached) get exactly the answers of the first, uncached request.
"""

from __future__ import annotations

import datetime
import gc
import json
import time
import weakref
from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientCreator, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from llmproxy.proxy.record import RequestRecord
from llmproxy.testing.fake_upstream import FakeUpstream
from tests.test_proxy import call, chat, client_agent, header, make_harness


def same(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without what the fake upstream changes on every request."""
    return {k: v for k, v in answer.items() if k not in ("id", "created")}


class Blind:
    """An observer that reads no bodies (as the metrics observer)."""

    wants_bodies = False

    def __init__(self) -> None:
        self.finished: list[RequestRecord] = []

    def request_started(self, record: RequestRecord) -> None:
        pass

    def request_finished(self, record: RequestRecord) -> None:
        self.finished.append(record)


class _ChatTestCase(TestCase):
    """A fake upstream, the proxy in front of it, and a client for chat completions."""

    timeout = 30

    async def setUp(self) -> None:  # type: ignore[override]
        self.fake = FakeUpstream(clock=reactor)
        listening = self.fake.listen(reactor)
        self.addCleanup(listening.stop)
        self.h = await make_harness(self, listening.url)
        self.agent = client_agent(self)
        self.url = self.h.url + "/v1/chat/completions"


class CachedPathTests(_ChatTestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        self.audited: list[str] = []
        self.h.resource.audit = lambda request, rejection, presented: self.audited.append(
            rejection.code
        )

    async def post(self, secret: str) -> tuple[int, Any, Any]:
        response, body = await call(self.agent, self.url, token=secret, body=chat())
        return response.code, json.loads(body), response

    async def test_expiry_of_a_cached_token_is_checked(self) -> None:
        clock = Clock()
        clock.advance(time.time())
        self.h.validator.clock = clock
        secret, _ = self.h.add_token(
            expires_at=datetime.datetime.fromtimestamp(clock.seconds() + 60, datetime.UTC)
        )
        self.assertEqual((await self.post(secret))[0], 200)
        clock.advance(61)
        status, body, response = await self.post(secret)
        self.assertEqual(
            (status, body), (401, {"error": "Token has expired", "code": "token_expired"})
        )
        self.assertEqual(len(header(response, "x-request-id") or ""), 36)
        self.assertEqual(len(self.fake.requests), 1)
        self.assertEqual(self.audited, ["token_expired"])
        self.assertEqual(self.h.observer.finished[-1].status, 401)

    async def test_cached_inactive_project_is_403_every_time(self) -> None:
        self.h.store.projects[self.h.project.id] = attrs.evolve(self.h.project, is_active=False)
        secret, _ = self.h.add_token()
        answers = [(await self.post(secret))[:2] for _ in range(3)]
        self.assertEqual(
            answers, [(403, {"error": "Project is inactive", "code": "project_inactive"})] * 3
        )
        self.assertEqual(self.fake.requests, [])

    async def test_cached_project_without_key_is_503_every_time(self) -> None:
        self.h.store.projects[self.h.project.id] = attrs.evolve(self.h.project, api_key="")
        secret, _ = self.h.add_token()
        answers = [(await self.post(secret))[:2] for _ in range(3)]
        expected = {
            "error": "Upstream authentication error",
            "description": "failed to load upstream API key",
            "code": "upstream_auth_error",
        }
        self.assertEqual(answers, [(503, expected)] * 3)
        self.assertEqual(self.fake.requests, [])

    async def test_repeated_requests_are_answered_alike(self) -> None:
        secret, token = self.h.add_token()
        answers = [await self.post(secret) for _ in range(3)]
        self.assertEqual([a[0] for a in answers], [200] * 3)
        self.assertEqual([same(a[1]) for a in answers], [same(answers[0][1])] * 3)
        ids = {header(a[2], "x-request-id") for a in answers}
        self.assertEqual(len(ids), 3)
        for upstream in self.fake.requests:
            self.assertEqual(
                upstream.header_values("authorization"), ["Bearer sk-upstream-0123456789abcdef"]
            )
        records = self.h.observer.finished
        self.assertEqual([r.token_id for r in records], [token.id] * 3)
        self.assertEqual([json.loads(r.request_body)["model"] for r in records], ["gpt-4o"] * 3)
        self.assertEqual([json.loads(r.response_body) for r in records], [a[1] for a in answers])

    async def test_without_body_readers_nothing_is_captured(self) -> None:
        blind = Blind()
        self.h.resource.observers = [blind]
        secret, _ = self.h.add_token()
        status, body, _ = await self.post(secret)
        status2, body2, _ = await self.post(secret)
        self.assertEqual((status, status2), (200, 200))
        self.assertEqual(same(body2), same(body))
        self.assertEqual([r.status for r in blind.finished], [200, 200])
        self.assertEqual([r.request_body for r in blind.finished], [b"", b""])
        self.assertEqual([r.response_body for r in blind.finished], [b"", b""])
        self.assertIsNotNone(blind.finished[1].overhead)


def alive(class_name: str) -> int:
    """Instances of a class (by name) the collector tracks right now."""
    return sum(type(o).__name__ == class_name for o in gc.get_objects())


class _Leaver(Protocol):
    """Sends a request, then aborts the connection (after C{wait_for} arrives)."""

    def __init__(self, request: bytes, wait_for: bytes | None) -> None:
        self.request = request
        self.wait_for = wait_for
        self.received = b""
        self.left: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]
        if self.wait_for is None:
            reactor.callLater(0.05, self.transport.abortConnection)  # type: ignore[attr-defined,union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.wait_for is not None and self.wait_for in self.received:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.left.callback(None)


class NoCycleTests(_ChatTestCase):
    """
    A proxied request is freed by reference counting once it is answered:
    nothing it holds points back at it. Each request left in a cycle would
    wait for the cyclic garbage collector, whose passes over thousands of
    such requests paused the reactor for milliseconds under load.
    """

    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        self.requests: list[weakref.ref[Any]] = []
        factory = self.h.site.requestFactory

        def recording(*args: Any, **kwargs: Any) -> Any:
            request = factory(*args, **kwargs)
            self.requests.append(weakref.ref(request))
            return request

        self.h.site.requestFactory = recording
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)

    async def assert_freed(self) -> None:
        for _ in range(250):
            if self.requests and all(ref() is None for ref in self.requests):
                return
            await deferLater(reactor, 0.02, lambda: None)
        alive = [ref() for ref in self.requests if ref() is not None]
        self.fail(f"{len(alive)} of {len(self.requests)} requests still alive without a gc pass")

    async def test_answer(self) -> None:
        secret, _ = self.h.add_token()
        for _ in range(2):  # the first fills the caches, the second is the cached path
            response, _body = await call(self.agent, self.url, token=secret, body=chat())
            self.assertEqual(response.code, 200)
        await self.assert_freed()

    async def test_stream(self) -> None:
        secret, _ = self.h.add_token()
        for _ in range(2):
            response, body = await call(self.agent, self.url, token=secret, body=chat(True))
            self.assertEqual(response.code, 200)
            self.assertIn(b"data: [DONE]", body)
        await self.assert_freed()

    async def test_client_leaves(self) -> None:
        """
        A client that goes away mid-stream or before the answer: its request,
        the body relay and the upstream connection are freed all the same.
        """
        secret, _ = self.h.add_token()
        stream = {"x-fake-chunks": "20", "x-fake-chunk-delay-ms": "50"}
        for knobs, wait_for in ((stream, b"data: "), ({"x-fake-latency-ms": "300"}, None)):
            for _ in range(2):
                await self.leave(secret, knobs, wait_for)
        await self.assert_freed()
        self.assertEqual(alive("BodyRelay"), 0)

        # None of those upstream connections could be kept for another
        # request: they and their TCP transports are gone too.
        def upstream_side() -> int:
            return alive("UpstreamConnection") + alive("EagerClient")

        for _ in range(50):
            if not upstream_side():
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(upstream_side(), 0)

    async def leave(self, secret: str, knobs: dict[str, str], wait_for: bytes | None) -> None:
        """Send a streamed chat completion, then drop the connection."""
        body = chat(True)
        head = "".join(f"{k}: {v}\r\n" for k, v in knobs.items())
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {secret}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{head}\r\n"
        ).encode() + body
        client = _Leaver(request, wait_for)
        port = int(self.h.url.rsplit(":", 1)[1])
        await ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
        await client.left
        await deferLater(reactor, 0.1, lambda: None)

    async def test_upstream_error(self) -> None:
        secret, _ = self.h.add_token()
        headers = {b"x-fake-error-status": [b"500"]}
        for _ in range(2):
            response, _body = await call(
                self.agent, self.url, token=secret, body=chat(), headers=headers
            )
            self.assertEqual(response.code, 500)
        await self.assert_freed()
