"""The non-proxy web surface: health, readiness, request ids, JSON 404s, body cap."""

from __future__ import annotations

import io
import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from llmproxy.web.app import WebApp
from llmproxy.web.root import Root
from llmproxy.web.site import AccessLog, LLMProxySite
from tests.support import LineSink


class _Echo(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"proxied:" + request.uri


def make_client(web: WebApp) -> StubTreq:
    return StubTreq(Root(web.resource(), _Echo()))


class HealthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.web = WebApp(clock=self.clock)
        self.client = make_client(self.web)

    def get(self, path: str, **kw: Any) -> tuple[Any, Any]:
        response = self.successResultOf(self.client.get("http://x" + path, **kw))
        body = self.successResultOf(response.content())
        return response, body

    def test_health(self) -> None:
        response, body = self.get("/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        data = json.loads(body)
        self.assertEqual(data["status"], "ok")
        self.assertEqual(data["version"], "0.1.0")
        self.assertTrue(data["timestamp"].endswith("Z"))

    def test_live(self) -> None:
        response, body = self.get("/live")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body), {"status": "alive"})

    def test_ready_without_checks(self) -> None:
        response, body = self.get("/ready")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["status"], "ready")

    def test_ready_names_failing_dependency(self) -> None:
        def ok() -> defer.Deferred[None]:
            return defer.succeed(None)

        def broken() -> defer.Deferred[None]:
            return defer.fail(ConnectionRefusedError("connection refused"))

        self.web.ready_checks += [("database", ok), ("redis", broken)]
        response, body = self.get("/ready")
        self.assertEqual(response.code, 503)
        data = json.loads(body)
        self.assertEqual(data["checks"]["database"], "ok")
        self.assertIn("redis", data["error"])
        self.assertNotEqual(data["checks"]["redis"], "ok")

    def test_ready_times_out(self) -> None:
        self.web.ready_checks.append(("slow", lambda: defer.Deferred()))
        d = self.client.get("http://x/ready")
        self.assertNoResult(d)
        self.clock.advance(self.web.ready_timeout + 0.1)
        self.client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 503)
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(body["checks"]["slow"], "timed out")

    def test_ready_checks_run_at_once(self) -> None:
        """Two slow dependencies: the answer comes after one deadline, not two."""
        self.web.ready_checks += [("a", lambda: defer.Deferred()), ("b", lambda: defer.Deferred())]
        d = self.client.get("http://x/ready")
        self.clock.advance(self.web.ready_timeout + 0.1)
        self.client.flush()
        response = self.successResultOf(d)
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(body["checks"], {"a": "timed out", "b": "timed out"})

    def test_unknown_path_json_404(self) -> None:
        for path in ("/does-not-exist", "/", "/v2/models", "/health/x"):
            response, body = self.get(path)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
            self.assertEqual(json.loads(body)["error"], "not found")

    def test_v1_goes_to_proxy(self) -> None:
        response, body = self.get("/v1/models?x=1")
        self.assertEqual(body, b"proxied:/v1/models?x=1")

    def test_request_id_echoed(self) -> None:
        response, _ = self.get(
            "/health", headers={"X-Request-ID": "abc", "X-Correlation-ID": "corr-1"}
        )
        self.assertEqual(response.headers.getRawHeaders("x-request-id"), ["abc"])
        self.assertEqual(response.headers.getRawHeaders("x-correlation-id"), ["corr-1"])

    def test_request_id_generated(self) -> None:
        response, _ = self.get("/nothing-here")
        rid = response.headers.getRawHeaders("x-request-id")[0]
        cid = response.headers.getRawHeaders("x-correlation-id")[0]
        self.assertEqual(len(rid), 36)
        self.assertEqual(len(cid), 36)
        self.assertNotEqual(rid, cid)


class SiteTests(SynchronousTestCase):
    def make_site(self, limit: int = 10) -> tuple[LLMProxySite, LineSink]:
        stream = LineSink()
        self.clock = Clock()
        site = LLMProxySite(
            Root(WebApp(clock=self.clock).resource(), _Echo()),
            clock=self.clock,
            max_request_size=limit,
            access_log=AccessLog(stream, "json"),  # type: ignore[arg-type]
        )
        return site, stream

    def connect(self, site: LLMProxySite) -> tuple[Any, StringTransport]:
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_declared_length_too_large(self) -> None:
        site, stream = self.make_site(10)
        channel, transport = self.connect(site)
        channel.dataReceived(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n"
        )
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out)
        body = json.loads(out.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(body["code"], "request_too_large")
        site.access_log.flush()
        self.assertIn('"status_code":413', "".join(stream.lines))

    def test_chunked_body_too_large(self) -> None:
        site, _ = self.make_site(10)
        channel, transport = self.connect(site)
        channel.dataReceived(
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n"
        )
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out)
        self.assertNotIn(b"proxied:", out)

    def test_body_within_limit(self) -> None:
        site, stream = self.make_site(10)
        channel, transport = self.connect(site)
        channel.dataReceived(
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789"
        )
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertIn(b"proxied:/v1/x", out)
        site.access_log.flush()
        line = json.loads(stream.lines[0])
        self.assertEqual(
            (line["method"], line["path"], line["status_code"]), ("POST", "/v1/x", 200)
        )

    def test_bodies_in_memory_up_to_100_000_bytes_then_in_a_file(self) -> None:
        seen: list[tuple[bool, bytes]] = []

        class Capture(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                content = request.content
                content.seek(0)
                seen.append((isinstance(content, io.BytesIO), content.read()))
                return b"ok"

        site = LLMProxySite(
            Root(WebApp(clock=Clock()).resource(), Capture()),
            clock=Clock(),
            max_request_size=1_000_000,
        )
        big = b"x" * 100_000
        for head, body in (
            (b"Content-Length: 99999", big[:-1]),
            (b"Content-Length: 100000", big),
            (b"Transfer-Encoding: chunked", b"3\r\nabc\r\n0\r\n\r\n"),
        ):
            channel, transport = self.connect(site)
            channel.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n" + body)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value())
        self.assertEqual(seen, [(True, big[:-1]), (False, big), (False, b"abc")])

    def test_access_log_has_no_query_string(self) -> None:
        site, stream = self.make_site(10)
        channel, transport = self.connect(site)
        channel.dataReceived(b"GET /health?key=sk-secret HTTP/1.1\r\nHost: x\r\n\r\n")
        site.access_log.flush()
        text = "".join(stream.lines)
        self.assertIn('"/health"', text)
        self.assertNotIn("sk-secret", text)

    def test_access_log_lines_are_written_whole_in_batches(self) -> None:
        site, stream = self.make_site(10)
        channel, _ = self.connect(site)
        for _ in range(AccessLog.BATCH - 1):
            channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(stream.lines, [])
        channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual((len(stream.lines), stream.writes), (AccessLog.BATCH, 1))
        channel.dataReceived(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        site.access_log.flush()
        self.assertEqual(json.loads(stream.lines[-1])["path"], "/live")
        self.assertTrue(all(line.endswith("}\n") for line in stream.lines))

    def test_proxy_route_is_reached_directly_with_the_usual_headers(self) -> None:
        site, _ = self.make_site(10)
        for path, proxied in ((b"/v1/x", True), (b"/v1", True), (b"/v1x", False)):
            channel, transport = self.connect(site)
            channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _, body = transport.value().partition(b"\r\n\r\n")
            self.assertEqual(body == b"proxied:" + path, proxied, (path, body))
            self.assertIn(b"\r\nDate: ", head)
            self.assertIn(b"\r\nServer: ", head)

    def test_unparseable_requests_get_json_errors(self) -> None:
        site, _ = self.make_site(10)
        head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
        cases = [
            (head + b"X-Big: " + b"a" * 17000 + b"\r\n\r\n", 431),
            (head + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(17)) + b"\r\n", 431),
            (head + b"".join(b"X-%d: v\r\n" % i for i in range(501)) + b"\r\n", 431),
            (b"GET /v1/" + b"a" * 17000 + b" HTTP/1.1\r\n\r\n", 431),
            (b"GARBAGE\r\n\r\n", 400),
            (b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
        ]
        for request, status in cases:
            channel, transport = self.connect(site)
            channel.dataReceived(request)
            head_out, _, body = transport.value().partition(b"\r\n\r\n")
            self.assertTrue(head_out.startswith(b"HTTP/1.1 %d " % status), head_out)
            self.assertIn(b"content-type: application/json", head_out.lower())
            code = json.loads(body)["code"]
            self.assertEqual(code, "bad_request" if status == 400 else "request_headers_too_large")
            self.assertTrue(transport.disconnecting)

    def test_a_request_must_arrive_within_request_timeout(self) -> None:
        site, _ = self.make_site(100)
        self.assertEqual((site.request_timeout, site.timeOut), (30.0, 60.0))
        # Headers trickling in: 408 REQUEST_TIMEOUT after the first byte.
        channel, transport = self.connect(site)
        channel.dataReceived(b"POST /v1/x HTTP/1.1\r\n")
        self.clock.advance(20)
        channel.dataReceived(b"Host: x\r\n")
        self.clock.advance(9.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 408 Request Timeout"), head)
        self.assertEqual(json.loads(body)["code"], "request_timeout")
        self.assertTrue(transport.disconnecting)

    def test_complete_requests_are_not_timed_out(self) -> None:
        site, _ = self.make_site(100)
        # In one read, and with a body that arrives in pieces within the limit.
        channel, transport = self.connect(site)
        channel.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        self.clock.advance(29)
        channel.dataReceived(b"0123456789")
        channel.dataReceived(b"GET /v1/y HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(59)
        out = transport.value()
        self.assertEqual(out.count(b"HTTP/1.1 200 "), 2, out)
        self.assertNotIn(b"408", out)
        self.assertFalse(transport.disconnecting)
        # An idle keep-alive connection closes after twice REQUEST_TIMEOUT.
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_a_body_may_take_longer_while_it_keeps_arriving(self) -> None:
        site, _ = self.make_site(100)
        channel, transport = self.connect(site)
        channel.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        for piece in (b"01", b"23", b"45", b"67"):  # 80 s in all, never 30 s apart
            self.clock.advance(20)
            channel.dataReceived(piece)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(29)
        channel.dataReceived(b"89")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value())
        # A body that stops arriving gets the 408.
        channel, transport = self.connect(site)
        channel.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01")
        self.clock.advance(30)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value())

    def test_an_answered_request_gets_no_timeout_answer(self) -> None:
        site, _ = self.make_site(10)
        channel, transport = self.connect(site)
        channel.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
        self.clock.advance(30)
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out)
        self.assertNotIn(b"408", out)

    def test_reason_phrases_twisted_lacks(self) -> None:
        class Status(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                code, _, message = request.path.rsplit(b"/", 1)[1].partition(b"-")
                request.setResponseCode(int(code), message or None)
                return b"{}"

        site = LLMProxySite(
            Root(WebApp(clock=Clock()).resource(), Status()), clock=Clock(), max_request_size=10
        )
        lines = []
        for path in (b"429", b"422", b"404", b"599", b"429-Slow%20Down"):
            channel, transport = self.connect(site)
            channel.dataReceived(b"GET /v1/" + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            lines.append(transport.value().split(b"\r\n", 1)[0])
        self.assertEqual(
            lines,
            [
                b"HTTP/1.1 429 Too Many Requests",
                b"HTTP/1.1 422 Unprocessable Entity",
                b"HTTP/1.1 404 Not Found",
                b"HTTP/1.1 599 Unknown Status",
                b"HTTP/1.1 429 Slow%20Down",
            ],
        )

    def test_drain_tracking(self) -> None:
        site, _ = self.make_site(1000)
        pending: defer.Deferred[None] = defer.Deferred()

        class Slow(Resource):
            isLeaf = True

            def render(self, request: Any) -> int:
                def done(_: Any) -> None:
                    request.write(b"done")
                    request.finish()

                pending.addCallback(done)
                from twisted.web.server import NOT_DONE_YET

                return NOT_DONE_YET

        site.resource = Root(WebApp(clock=self.clock).resource(), Slow())
        busy, busy_transport = self.connect(site)
        idle, idle_transport = self.connect(site)
        busy.dataReceived(b"GET /v1/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(site.in_flight, 1)
        idle_result = site.when_idle()
        self.assertNoResult(idle_result)
        site.start_draining()
        self.assertTrue(idle_transport.disconnecting)
        self.assertFalse(busy_transport.disconnecting)
        pending.callback(None)
        self.successResultOf(idle_result)
        self.assertEqual(site.in_flight, 0)
        self.assertIn(b"done", busy_transport.value())
