"""
The upstream HTTP/1.1 client against a real socket server that answers
with scripted bytes: framing (lengths, chunks split anywhere, trailers,
interim answers, bodiless answers, read-until-close), malformed answers,
connection reuse, the stale-connection retry, cancellation and the idle
timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from llmproxy.proxy.client import Origin, UpstreamPool, UpstreamResponse
from tests.support import BodyCollector

#: What the scripted server does with one request: C{(request_bytes, transport)}.
Script = Callable[[bytes, Any], None]


class ScriptedServer(Protocol):
    """Collects one request (head plus Content-Length body) and runs the script on it."""

    def __init__(self, owner: Scripted) -> None:
        self.owner = owner
        self.buf = b""

    def connectionMade(self) -> None:
        self.owner.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buf) < total:
                return
            request, self.buf = self.buf[:total], self.buf[total:]
            self.owner.requests.append(request)
            script = self.owner.scripts.pop(0) if self.owner.scripts else self.owner.default
            script(request, self.transport)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.owner.closed += 1


class Scripted(Factory):
    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.default: Script = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.requests: list[bytes] = []
        self.connections: list[ScriptedServer] = []
        self.closed = 0

    def buildProtocol(self, addr: Any) -> ScriptedServer:
        return ScriptedServer(self)


def answer(*pieces: bytes, close: bool = False) -> Script:
    """Write C{pieces} one write (and one reactor turn) apart, then maybe close."""

    def run(request: bytes, transport: Any) -> None:
        def write(i: int) -> None:
            if i < len(pieces):
                transport.write(pieces[i])
                _writing.append(reactor.callLater(0.001, write, i + 1))
            elif close:
                transport.loseConnection()

        write(0)

    return run


#: Pending scripted writes (cancelled when a test ends).
_writing: list[Any] = []


def close_without_answer(request: bytes, transport: Any) -> None:
    transport.loseConnection()


def silent(request: bytes, transport: Any) -> None:
    pass


class ClientTests(TestCase):
    def setUp(self) -> None:
        self.server = Scripted()
        self.port = reactor.listenTCP(0, self.server, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.clock = Clock()
        port = self.port.getHost().port
        self.pool = UpstreamPool(
            self.clock,
            lambda scheme, host, p: TCP4ClientEndpoint(reactor, "127.0.0.1", port),
            max_idle=4,
            idle_timeout=30.0,
        )
        self.addCleanup(self.close_everything)
        self.origin: Origin = self.pool.origin(b"http", b"127.0.0.1", port)

    async def close_everything(self) -> None:
        while _writing:
            call = _writing.pop()
            if call.active():
                call.cancel()
        await self.pool.close_idle()
        for conn in self.server.connections:
            conn.transport.loseConnection()  # type: ignore[union-attr]
        while self.server.closed < len(self.server.connections):
            await deferLater(0.005)
        await deferLater(0)  # the client side hears its close too

    def script(self, *scripts: Script) -> None:
        self.server.scripts.extend(scripts)

    async def fetch(
        self, method: bytes = b"POST", body: bytes | None = b"{}"
    ) -> tuple[UpstreamResponse, bytes, Failure]:
        headers = Headers({b"Content-Type": [b"application/json"]})
        response = await self.pool.request(self.origin, method, b"/v1/x?y=1", headers, body)
        collector = BodyCollector()
        response.deliverBody(collector)
        reason = await collector.ended()
        return response, collector.data, reason

    # -- the request --------------------------------------------------------------------

    async def test_request_line_host_length_and_headers(self) -> None:
        await self.fetch(body=b'{"a":1}')
        request = self.server.requests[0]
        head, _, body = request.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"POST /v1/x?y=1 HTTP/1.1")
        self.assertIn(b"Host: 127.0.0.1:%d" % self.origin.port, lines)
        self.assertIn(b"Content-Type: application/json", lines)
        self.assertIn(b"Content-Length: 7", lines)
        self.assertEqual(body, b'{"a":1}')

    async def test_empty_post_announces_zero_length_get_does_not(self) -> None:
        await self.fetch(body=None)
        await self.fetch(method=b"GET", body=None)
        self.assertIn(b"\r\nContent-Length: 0\r\n", self.server.requests[0])
        self.assertNotIn(b"Content-Length", self.server.requests[1])

    # -- framing ------------------------------------------------------------------------

    async def test_content_length_body_in_pieces(self) -> None:
        self.script(
            answer(
                b"HTTP/1.1 201 Created\r\nContent-Length: 10\r\nX-A: 1\r\n\r\n01", b"234", b"56789"
            )
        )
        response, body, reason = await self.fetch()
        self.assertEqual((response.code, response.phrase, response.length), (201, b"Created", 10))
        self.assertEqual(response.headers.getRawHeaders(b"x-a"), [b"1"])
        self.assertEqual(body, b"0123456789")
        self.assertTrue(reason.check(ResponseDone))

    async def test_chunked_body_split_at_every_byte(self) -> None:
        raw = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: text/event-stream\r\n\r\n"
            b"6;ext=1\r\ndata: \r\n"
            b"a\r\n0123456789\r\n"
            b"1\r\nZ\r\n"
            b"0\r\nX-Trailer: t\r\n\r\n"
        )
        self.script(answer(*[raw[i : i + 1] for i in range(len(raw))]))
        response, body, reason = await self.fetch()
        self.assertIs(response.length, UNKNOWN_LENGTH)
        self.assertEqual(body, b"data: 0123456789Z")
        self.assertTrue(reason.check(ResponseDone))
        # The connection is whole again: the next request reuses it.
        await self.fetch()
        self.assertEqual(len(self.server.connections), 1)

    async def test_chunks_are_delivered_as_they_arrive(self) -> None:
        release = defer.Deferred[None]()
        parts: list[Any] = []

        def stream(request: bytes, transport: Any) -> None:
            transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            parts.append(transport)

        self.script(stream)
        response = await self.pool.request(self.origin, b"POST", b"/", Headers(), b"{}")
        collector = BodyCollector()
        response.deliverBody(collector)
        while not collector.chunks:
            await deferLater(0.005)
        # The first event is delivered before the stream ends.
        self.assertEqual(collector.chunks, [b"first"])
        parts[0].write(b"6\r\nsecond\r\n0\r\n\r\n")
        release.callback(None)
        reason = await collector.ended()
        self.assertTrue(reason.check(ResponseDone))
        self.assertEqual(collector.data, b"firstsecond")

    async def test_interim_answer_is_skipped(self) -> None:
        self.script(
            answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        )
        response, body, _ = await self.fetch()
        self.assertEqual((response.code, body), (200, b"abc"))

    async def test_bodiless_answers(self) -> None:
        self.script(
            answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"),
        )
        response, body, reason = await self.fetch()
        self.assertEqual((response.code, body, response.length), (204, b"", 0))
        response, body, reason = await self.fetch(method=b"HEAD", body=None)
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"99"])
        self.assertTrue(reason.check(ResponseDone))
        await self.fetch()
        self.assertEqual(len(self.server.connections), 1)

    async def test_body_until_close(self) -> None:
        self.script(answer(b"HTTP/1.1 200 OK\r\n\r\nsome", b" more", close=True))
        response, body, reason = await self.fetch()
        self.assertIs(response.length, UNKNOWN_LENGTH)
        self.assertEqual(body, b"some more")
        self.assertTrue(reason.check(PotentialDataLoss))

    async def test_connection_close_is_honoured(self) -> None:
        self.script(answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"))
        await self.fetch()
        await self.fetch()
        self.assertEqual(len(self.server.connections), 2)

    async def test_cut_body_fails(self) -> None:
        self.script(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", close=True))
        _, body, reason = await self.fetch()
        self.assertEqual(body, b"abc")
        self.assertTrue(reason.check(ResponseFailed))

    async def test_cut_chunked_body_fails(self) -> None:
        self.script(
            answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", close=True)
        )
        _, body, reason = await self.fetch()
        self.assertEqual(body, b"abc")
        self.assertTrue(reason.check(ResponseFailed))

    async def test_malformed_answers_are_never_received(self) -> None:
        for raw in (
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 2x0 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-A: 1\nX-B: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-A: 1\rX-B: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000,
        ):
            self.script(answer(raw))
            with self.assertRaises(ResponseNeverReceived):
                await self.pool.request(self.origin, b"POST", b"/", Headers(), b"{}")

    async def test_malformed_chunk_fails_the_body(self) -> None:
        self.script(answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"))
        _, body, reason = await self.fetch()
        self.assertEqual(body, b"")
        self.assertTrue(reason.check(ResponseFailed))

    # -- the pool -----------------------------------------------------------------------

    async def test_connections_are_reused_and_capped(self) -> None:
        for _ in range(3):
            await self.fetch()
        self.assertEqual(len(self.server.connections), 1)
        self.assertEqual(self.pool.idle_count(self.origin), 1)
        # Six at once need six connections; four stay idle afterwards (max_idle).
        await defer.gatherResults([defer.ensureDeferred(self.fetch()) for _ in range(6)])
        self.assertEqual(len(self.server.connections), 6)
        self.assertEqual(self.pool.idle_count(self.origin), 4)

    async def test_idle_connections_expire(self) -> None:
        await self.fetch()
        self.assertEqual(self.pool.idle_count(self.origin), 1)
        self.clock.advance(31)
        self.assertEqual(self.pool.idle_count(self.origin), 0)
        while self.server.closed < 1:
            await deferLater(0.005)

    async def test_stale_connection_is_retried_for_idempotent_requests_only(self) -> None:
        await self.fetch()
        self.script(close_without_answer)
        response, body, _ = await self.fetch(method=b"GET", body=None)
        self.assertEqual((response.code, body), (200, b"ok"))
        self.assertEqual(len(self.server.requests), 3)
        # A POST is not sent twice.
        self.script(close_without_answer)
        with self.assertRaises(ResponseNeverReceived):
            await self.fetch()
        self.assertEqual(len(self.server.requests), 4)

    async def test_cancel_while_waiting_closes_the_connection(self) -> None:
        self.script(silent)
        d = self.pool.request(self.origin, b"POST", b"/", Headers(), b"{}")
        while not self.server.requests:
            await deferLater(0.005)
        d.cancel()
        with self.assertRaises(defer.CancelledError):
            await d
        while self.server.closed < 1:
            await deferLater(0.005)
        self.assertEqual(self.pool.idle_count(self.origin), 0)

    async def test_stopping_the_body_closes_the_connection(self) -> None:
        self.script(answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"))

        response = await self.pool.request(self.origin, b"POST", b"/", Headers(), b"{}")
        # Stop after the first piece of the body.
        collector = BodyCollector(lambda c, data: c.transport.stopProducing())
        response.deliverBody(collector)
        reason = await collector.ended()
        self.assertTrue(reason.check(ResponseFailed))
        while self.server.closed < 1:
            await deferLater(0.005)
        self.assertEqual(self.pool.idle_count(self.origin), 0)

    async def test_late_reader_gets_the_whole_body(self) -> None:
        self.script(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"))
        response = await self.pool.request(self.origin, b"POST", b"/", Headers(), b"{}")
        await deferLater(0.05)
        collector = BodyCollector()
        response.deliverBody(collector)
        reason = await collector.ended()
        self.assertEqual(collector.data, b"hello")
        self.assertTrue(reason.check(ResponseDone))
        await self.fetch()
        self.assertEqual(len(self.server.connections), 1)

    async def test_refused_connection_fails_with_the_connect_error(self) -> None:
        from twisted.internet.error import ConnectionRefusedError

        await self.port.stopListening()
        with self.assertRaises(ConnectionRefusedError):
            await self.pool.request(self.origin, b"POST", b"/", Headers(), b"{}")

    async def test_close_idle_closes_every_idle_connection(self) -> None:
        await defer.gatherResults([defer.ensureDeferred(self.fetch()) for _ in range(3)])
        self.assertEqual(self.pool.idle_count(self.origin), 3)
        await self.pool.close_idle()
        self.assertEqual(self.pool.idle_count(self.origin), 0)
        while self.server.closed < 3:
            await deferLater(0.005)


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)
