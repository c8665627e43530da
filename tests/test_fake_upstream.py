"""Tests for the fake OpenAI upstream shipped in llmproxy.testing."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import struct
import urllib.request

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseFailed,
)

from llmproxy.testing.daemon import start_daemon
from llmproxy.testing.fake_upstream import FakeUpstream, parse_size
from llmproxy.testing.tls import make_test_pki


def parse_response(raw: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    """Status, headers (lower-case names) and de-chunked body of a raw HTTP/1.1 answer."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if headers.get("transfer-encoding") == ["chunked"]:
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        return status, headers, body
    return status, headers, rest


class Connection:
    """A real HTTPChannel of the fake's Site over a StringTransport."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.transport = StringTransport()
        self.protocol = fake.site().buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def send(
        self,
        method: str,
        path: str,
        body: bytes | dict | None = None,
        headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
    ) -> None:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        body = body or b""
        lines = [f"{method} {path} HTTP/1.1", "Host: upstream.test"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        self.protocol.dataReceived("\r\n".join(lines).encode() + b"\r\n\r\n" + body)

    def response(self) -> tuple[int, dict[str, list[str]], bytes]:
        return parse_response(self.transport.value())

    def json(self) -> object:
        return json.loads(self.response()[2])

    def events(self) -> list[str]:
        """The SSE data payloads written so far."""
        raw = parse_response(self.transport.value())[2].decode()
        return [e[len("data: ") :] for e in raw.split("\n\n") if e.startswith("data: ")]

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say three words"}]}


class JSONEndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeUpstream(clock=self.clock)

    def request(self, method: str, path: str, body=None, headers=()) -> Connection:
        c = Connection(self.fake)
        c.send(method, path, body, list(headers))
        return c

    def test_chat_completion(self) -> None:
        self.clock.advance(1700000000)
        c = self.request("POST", "/v1/chat/completions", CHAT, [("X-Fake-Chunks", "4")])
        status, headers, _ = c.response()
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], ["application/json"])
        body = c.json()
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(body["model"], "gpt-4o-mini")
        self.assertEqual(body["created"], 1700000000)
        self.assertTrue(body["id"].startswith("chatcmpl-"))
        self.assertEqual(body["choices"][0]["message"]["content"], "word0 word1 word2 word3 ")
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        self.assertEqual(
            body["usage"], {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        )

    def test_completions(self) -> None:
        c = self.request(
            "POST", "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "a b"}
        )
        body = c.json()
        self.assertEqual(body["object"], "text_completion")
        self.assertEqual(body["choices"][0]["text"], "word0 word1 word2 ")
        self.assertEqual(body["usage"]["prompt_tokens"], 2)

    def test_embeddings_deterministic(self) -> None:
        req = {"model": "text-embedding-3-small", "input": ["a", "b"], "dimensions": 4}
        first = self.request("POST", "/v1/embeddings", req).json()
        second = self.request("POST", "/v1/embeddings", req).json()
        self.assertEqual(first["data"], second["data"])
        self.assertEqual([d["index"] for d in first["data"]], [0, 1])
        self.assertEqual(len(first["data"][0]["embedding"]), 4)
        self.assertNotEqual(first["data"][0]["embedding"], first["data"][1]["embedding"])
        self.assertEqual(first["usage"], {"prompt_tokens": 2, "total_tokens": 2})
        b64 = self.request("POST", "/v1/embeddings", dict(req, encoding_format="base64")).json()
        decoded = struct.unpack("<4f", base64.b64decode(b64["data"][0]["embedding"]))
        for a, b in zip(decoded, first["data"][0]["embedding"], strict=True):
            self.assertAlmostEqual(a, b, places=5)

    def test_models(self) -> None:
        body = self.request("GET", "/v1/models").json()
        self.assertEqual(body["object"], "list")
        self.assertIn("gpt-4o", [m["id"] for m in body["data"]])
        self.assertEqual(self.request("GET", "/v1/models/gpt-4o").json()["id"], "gpt-4o")
        c = self.request("GET", "/v1/models/nope")
        self.assertEqual(c.response()[0], 404)
        self.assertEqual(c.json()["error"]["code"], "model_not_found")

    def test_unknown_path_and_bad_json(self) -> None:
        c = self.request("GET", "/v1/nothing")
        self.assertEqual(c.response()[0], 404)
        self.assertEqual(c.json()["error"]["type"], "invalid_request_error")
        c = self.request("POST", "/v1/chat/completions", b"{not json")
        self.assertEqual(c.response()[0], 400)
        c = self.request("GET", "/v1/chat/completions")
        self.assertEqual(c.response()[0], 405)

    def test_error_injection_header_and_query(self) -> None:
        c = self.request(
            "POST",
            "/v1/chat/completions",
            CHAT,
            [("X-Fake-Error-Status", "429"), ("X-Fake-Error-Message", "slow down")],
        )
        self.assertEqual(c.response()[0], 429)
        self.assertEqual(
            c.json(),
            {
                "error": {
                    "message": "slow down",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            },
        )
        c = self.request("POST", "/v1/chat/completions?fake_error_status=503", CHAT)
        self.assertEqual(c.response()[0], 503)
        self.assertEqual(c.json()["error"]["type"], "server_error")

    def test_bad_knob(self) -> None:
        c = self.request("GET", "/v1/models", headers=[("X-Fake-Chunks", "many")])
        self.assertEqual(c.response()[0], 400)
        self.assertIn("bad fake knob", c.json()["error"]["message"])

    def test_echo_and_recording(self) -> None:
        body = b'{"model": "x"}'
        c = self.request(
            "POST",
            "/v1/anything/here?a=1&a=2",
            body,
            [
                ("Authorization", "Bearer sk-real"),
                ("X-Multi", "one"),
                ("X-Multi", "two"),
                ("X-Fake-Echo", "1"),
            ],
        )
        self.assertEqual(c.response()[0], 200)
        echo = c.json()
        self.assertEqual(echo["method"], "POST")
        self.assertEqual(echo["path"], "/v1/anything/here")
        self.assertEqual(echo["query"], "a=1&a=2")
        self.assertIn(["authorization", "Bearer sk-real"], echo["headers"])
        multi = [v for k, v in echo["headers"] if k == "x-multi"]
        self.assertEqual(multi, ["one", "two"])
        self.assertEqual(echo["body_sha256"], hashlib.sha256(body).hexdigest())
        self.assertEqual(echo["body_length"], len(body))

        seen = self.fake.last_request
        self.assertEqual(seen.method, b"POST")
        self.assertEqual(seen.path, b"/v1/anything/here")
        self.assertEqual(seen.header("AUTHORIZATION"), "Bearer sk-real")
        self.assertEqual(seen.header_values("x-multi"), ["one", "two"])
        self.assertEqual(seen.json(), {"model": "x"})

    def test_latency_before_headers(self) -> None:
        c = self.request("GET", "/v1/models", headers=[("X-Fake-Latency-Ms", "2000")])
        self.assertEqual(c.transport.value(), b"")
        self.clock.advance(1.9)
        self.assertEqual(c.transport.value(), b"")
        self.clock.advance(0.1)
        self.assertEqual(c.response()[0], 200)

    def test_latency_cancelled_on_disconnect(self) -> None:
        c = self.request("GET", "/v1/models", headers=[("X-Fake-Latency-Ms", "2000")])
        c.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.fake.connections_lost, 1)

    def test_cut_non_streaming(self) -> None:
        c = self.request("POST", "/v1/chat/completions", CHAT, [("X-Fake-Cut-After", "10")])
        status, headers, body = c.response()
        self.assertEqual(status, 200)
        self.assertEqual(len(body), 10)
        self.assertGreater(int(headers["content-length"][0]), 10)
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(self.fake.streams_cut, 1)

    def test_parse_size(self) -> None:
        self.assertEqual(parse_size("5000"), 5000)
        self.assertEqual(parse_size("64KB"), 65536)
        self.assertEqual(parse_size("2mb"), 2 * 1024 * 1024)
        self.assertRaises(ValueError, parse_size, "lots")


class StreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeUpstream(clock=self.clock)

    def stream(self, headers=(), **extra) -> Connection:
        c = Connection(self.fake)
        c.send("POST", "/v1/chat/completions", dict(CHAT, stream=True, **extra), list(headers))
        return c

    def test_stream_shape(self) -> None:
        c = self.stream([("X-Fake-Chunks", "2")])
        status, headers, _ = c.response()
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], ["text/event-stream; charset=utf-8"])
        events = c.events()
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        self.assertEqual(len(chunks), 4)  # role, 2 content, finish: no usage chunk
        self.assertTrue(all(ch["object"] == "chat.completion.chunk" for ch in chunks))
        self.assertEqual(len({ch["id"] for ch in chunks}), 1)
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        self.assertEqual(
            [ch["choices"][0]["delta"].get("content") for ch in chunks[1:3]], ["word0 ", "word1 "]
        )
        self.assertEqual(chunks[3]["choices"][0]["finish_reason"], "stop")
        self.assertNotIn("usage", chunks[3])
        self.assertEqual(self.fake.streams_completed, 1)

    def test_include_usage(self) -> None:
        c = self.stream([("X-Fake-Chunks", "2")], stream_options={"include_usage": True})
        events = c.events()
        self.assertEqual(len(events), 6)  # role, 2 content, finish, usage, [DONE]
        for e in events[:4]:
            self.assertIsNone(json.loads(e)["usage"])
        usage = json.loads(events[-2])
        self.assertEqual(usage["choices"], [])
        self.assertEqual(
            usage["usage"], {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        )
        self.assertEqual(events[-1], "[DONE]")

    def test_pacing_one_event_per_interval(self) -> None:
        c = self.stream([("X-Fake-Chunks", "3"), ("X-Fake-Chunk-Delay-Ms", "50")])
        counts = [len(c.events())]
        for _ in range(6):
            self.clock.advance(0.05)
            counts.append(len(c.events()))
        # role, 3 content: one more per 50 ms; as from OpenAI, the finish
        # chunk and [DONE] come together
        self.assertEqual(counts, [1, 2, 3, 4, 6, 6, 6])
        self.assertEqual(self.fake.streams_completed, 1)

    def test_pacing_usage_chunk_comes_with_the_finish_chunk(self) -> None:
        c = self.stream(
            [("X-Fake-Chunks", "2"), ("X-Fake-Chunk-Delay-Ms", "50")],
            stream_options={"include_usage": True},
        )
        counts = [len(c.events())]
        for _ in range(4):
            self.clock.advance(0.05)
            counts.append(len(c.events()))
        # role, 2 content, then finish, usage and [DONE] at once
        self.assertEqual(counts, [1, 2, 3, 6, 6])
        self.assertEqual(json.loads(c.events()[-2])["choices"], [])
        self.assertEqual(self.fake.streams_completed, 1)

    def test_client_disconnect_is_recorded_and_stops_stream(self) -> None:
        c = self.stream([("X-Fake-Chunks", "10"), ("X-Fake-Chunk-Delay-Ms", "10")])
        self.clock.advance(0.01)
        self.clock.advance(0.01)
        self.assertEqual(len(c.events()), 3)
        c.close()
        self.assertEqual(self.fake.disconnects_mid_stream, 1)
        self.assertEqual(self.fake.disconnects[0].events_sent, 3)
        self.assertEqual(self.fake.disconnects[0].path, b"/v1/chat/completions")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.fake.streams_completed, 0)
        self.assertEqual(self.fake.connections_opened, 1)
        self.assertEqual(self.fake.connections_lost, 1)

    def test_cut_after_k_events(self) -> None:
        c = self.stream([("X-Fake-Chunks", "5"), ("X-Fake-Cut-After", "2")])
        self.assertEqual(len(c.events()), 2)
        self.assertTrue(c.transport.disconnecting)
        self.assertNotIn(b"0\r\n\r\n", c.transport.value())  # no clean chunked end
        self.assertEqual(self.fake.streams_cut, 1)
        self.assertEqual(self.fake.streams_completed, 0)
        c.close()
        self.assertEqual(self.fake.disconnects_mid_stream, 0)

    def test_completions_stream(self) -> None:
        c = Connection(self.fake)
        c.send(
            "POST",
            "/v1/completions",
            {"model": "m", "prompt": "hi", "stream": True},
            [("X-Fake-Chunks", "2")],
        )
        events = c.events()
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(
            [json.loads(e)["choices"][0]["text"] for e in events[:-1]], ["word0 ", "word1 ", ""]
        )


class BigBodyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeUpstream(clock=self.clock)

    def test_big_body_honours_backpressure(self) -> None:
        c = Connection(self.fake)
        c.send("GET", "/v1/models", headers=[("X-Fake-Body-Bytes", "1MB")])
        status, headers, _ = c.response()
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-length"], [str(1024 * 1024)])
        # 16 chunks of 64 KiB per reactor turn: the whole MB went out at once
        self.assertEqual(len(c.response()[2]), 1024 * 1024)
        self.clock.advance(0)
        self.assertEqual(self.fake.streams_completed, 1)

        c2 = Connection(self.fake)
        c2.send("GET", "/v1/models", headers=[("X-Fake-Body-Bytes", "2MB")])
        self.assertEqual(len(c2.response()[2]), 1024 * 1024)
        # the transport's buffer is full: it pauses its producer, the channel
        c2.transport.producer.pauseProducing()
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(len(c2.response()[2]), 1024 * 1024)
        self.assertEqual(self.fake.streams_completed, 1)
        c2.transport.producer.resumeProducing()
        self.clock.advance(0)
        _, _, body = c2.response()
        self.assertEqual(len(body), 2 * 1024 * 1024)
        self.assertEqual(self.fake.streams_completed, 2)

    def test_big_body_disconnect(self) -> None:
        c = Connection(self.fake)
        c.send("GET", "/v1/models", headers=[("X-Fake-Body-Bytes", "4MB")])
        self.assertEqual(len(c.response()[2]), 16 * 64 * 1024)
        c.close()
        self.assertEqual(self.fake.disconnects[0].events_sent, 16)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RealNetworkTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_tcp_and_cut(self):
        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor)
        self.addCleanup(listening.stop)
        self.assertTrue(listening.url.startswith("http://127.0.0.1:"))
        response = yield treq.post(
            listening.url + "/v1/chat/completions",
            json=dict(CHAT, stream=True, stream_options={"include_usage": True}),
            headers={"X-Fake-Chunk-Delay-Ms": "5"},
            persistent=False,
        )
        text = yield response.text()
        self.assertTrue(text.endswith("data: [DONE]\n\n"))
        # compact JSON with "usage" last, as OpenAI writes its chunks
        self.assertIn('"usage":{"prompt_tokens":3', text)
        self.assertIn('"finish_reason":null}],"usage":null}\n\n', text)

        response = yield treq.post(
            listening.url + "/v1/chat/completions",
            json=dict(CHAT, stream=True),
            headers={"X-Fake-Cut-After": "2"},
            persistent=False,
        )
        with self.assertRaises(ResponseFailed):
            yield response.text()
        self.assertEqual(fake.streams_cut, 1)
        self.assertEqual(fake.connections_opened, 2)

    @inlineCallbacks
    def test_tls(self):
        pki = make_test_pki()
        fake = FakeUpstream(clock=reactor)
        good = fake.listen(reactor, context_factory=pki.server_options())
        self.addCleanup(good.stop)
        wrong = fake.listen(reactor, context_factory=pki.wrong_host_options())
        self.addCleanup(wrong.stop)
        self.assertTrue(good.url.startswith("https://localhost:"))
        agent = Agent(
            reactor,
            contextFactory=BrowserLikePolicyForHTTPS(trustRoot=pki.trust_root()),
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        client = treq.client.HTTPClient(agent)
        response = yield client.get(good.url + "/v1/models")
        self.assertEqual(response.code, 200)
        yield response.json()
        failure = None
        try:
            yield client.get(wrong.url + "/v1/models")
        except Exception as e:
            failure = e
        self.assertIsNotNone(failure)
        self.assertIn("VerificationError", repr(failure))


class TwistdPluginTests(SynchronousTestCase):
    def test_twistd_plugin(self) -> None:
        workdir = self.mktemp()
        os.makedirs(workdir)
        daemon = start_daemon(
            workdir, {}, plugin="llmproxy-fake-upstream", health_path="/v1/models"
        )
        try:
            req = urllib.request.Request(
                daemon.url + "/v1/chat/completions",
                data=json.dumps(CHAT).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=5) as r:
                body = json.loads(r.read())
            self.assertEqual(body["object"], "chat.completion")
        finally:
            # twistd re-raises SIGTERM on itself after a clean shutdown
            self.assertIn(daemon.terminate(), (0, -signal.SIGTERM), daemon.log())
            self.assertIn("Server Shut Down.", daemon.log())
