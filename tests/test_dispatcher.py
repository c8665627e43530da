"""The dispatcher: sinks against a local HTTP receiver, and the twistd daemon end to end."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from llmproxy.events.dispatcher.service import Dispatcher, MemorySource
from llmproxy.events.dispatcher.sinks import HeliconeSink, LunarySink, WebhookSink
from llmproxy.events.dispatcher.transform import merge_sse
from llmproxy.events.memory import MemoryEventBus
from llmproxy.testing.daemon import start_daemon
from tests.services import REDIS_HOST, REDIS_PORT, require_redis


def event(n: int, **kw: Any) -> dict[str, Any]:
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {n}"}]}
    response = {
        "id": f"c{n}",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
    }
    e = {
        "schema_version": 1,
        "event_id": f"ev-{n}",
        "request_id": f"req-{n}",
        "timestamp": "2026-11-27T10:00:00.000Z",
        "project_id": "p1",
        "token_id": "t1",
        "provider": "openai",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "durations": {"total_ms": 250.0, "upstream_ttfb_ms": 100.0, "proxy_overhead_ms": 1.0},
        "model": "gpt-4o-mini",
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 1,
            "total_tokens": 6,
            "source": "reported",
        },
        "cache_status": None,
        "streamed": False,
        "error_kind": None,
        "request_body": {
            "text": json.dumps(request),
            "encoding": "utf-8",
            "truncated": False,
            "binary": False,
        },
        "response_body": {
            "text": json.dumps(response),
            "encoding": "utf-8",
            "truncated": False,
            "binary": False,
        },
        "response_headers": {"content-type": "application/json"},
    }
    e.update(kw)
    return e


class Receiver(resource.Resource):
    """A local HTTP endpoint answering with the queued status codes (then 200)."""

    isLeaf = True

    def __init__(self, codes: list[int] | None = None) -> None:
        super().__init__()
        self.codes = list(codes or [])
        self.requests: list[tuple[dict[str, str], Any]] = []

    def render_POST(self, request: Any) -> bytes:
        headers = {
            k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append((headers, json.loads(request.content.read())))
        request.setResponseCode(self.codes.pop(0) if self.codes else 200)
        return b"{}"


async def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await task.deferLater(reactor, 0.05, lambda: None)


class SinkTests(TestCase):
    def receiver(self, codes: list[int] | None = None) -> tuple[Receiver, str]:
        receiver = Receiver(codes)
        port = reactor.listenTCP(0, server.Site(receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return receiver, f"http://127.0.0.1:{port.getHost().port}/ingest"

    def http(self) -> Any:
        """A treq client without persistent connections (nothing left open after a test)."""
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    def dispatcher(self, sink: Any, batch_size: int = 3) -> tuple[MemoryEventBus, Dispatcher]:
        bus = MemoryEventBus(reactor)
        d = Dispatcher(
            MemorySource(bus, reactor),
            sink,
            reactor,
            batch_size=batch_size,
            flush_interval=0.2,
            read_wait=0.1,
        )
        d.startService()
        self.addCleanup(d.stopService)
        return bus, d

    @defer.inlineCallbacks
    def test_webhook_batches_with_retry_on_503(self) -> Any:
        receiver, url = self.receiver([503])
        bus, d = self.dispatcher(WebhookSink(url, "secret", self.http()))
        for n in range(3):
            bus.publish(event(n))
        yield defer.ensureDeferred(wait_for(lambda: d.stats["sent"] == 3))
        self.assertEqual(len(receiver.requests), 2)  # refused once, then accepted
        headers, body = receiver.requests[-1]
        self.assertEqual(headers["authorization"], "Bearer secret")
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual([e["event_id"] for e in body], ["ev-0", "ev-1", "ev-2"])
        self.assertEqual(receiver.requests[0][1], body)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_file_sink_from_the_in_process_bus(self) -> Any:
        from llmproxy.events.dispatcher.sinks import FileSink

        path = os.path.join(os.path.abspath(self.mktemp()), "events.jsonl")
        bus, d = self.dispatcher(FileSink(path, reactor), batch_size=2)
        for n in range(3):
            bus.publish(event(n))
        yield defer.ensureDeferred(wait_for(lambda: d.stats["sent"] == 3))
        with open(path, encoding="utf-8") as f:
            self.assertEqual([json.loads(line)["event_id"] for line in f], ["ev-0", "ev-1", "ev-2"])

    @defer.inlineCallbacks
    def test_permanent_400_drops_the_batch(self) -> Any:
        receiver, url = self.receiver([400])
        bus, d = self.dispatcher(WebhookSink(url, "", self.http()))
        for n in range(3):
            bus.publish(event(n))
        yield defer.ensureDeferred(wait_for(lambda: d.stats["dropped"] == 3))
        self.assertEqual(len(receiver.requests), 1)
        self.assertEqual(d.stats["sent"], 0)
        # the next batch goes through
        bus.publish(event(9))
        yield defer.ensureDeferred(wait_for(lambda: d.stats["sent"] == 1))
        self.assertEqual([e["event_id"] for e in receiver.requests[-1][1]], ["ev-9"])

    @defer.inlineCallbacks
    def test_helicone_gets_real_request_response_and_usage(self) -> Any:
        receiver, url = self.receiver([500])  # permanent for Helicone: that event is dropped
        bus, d = self.dispatcher(HeliconeSink(url, "hk", self.http()), batch_size=3)
        base = {"id": "s", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
        first = {"index": 0, "delta": {"role": "assistant", "content": "Hel"}}
        second = {"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}
        chunks = [dict(base, choices=[first]), dict(base, choices=[second])]
        stream = "".join("data: " + json.dumps(c) + "\n\n" for c in chunks) + "data: [DONE]\n\n"
        streamed = event(
            2,
            streamed=True,
            response_headers={"content-type": "text/event-stream"},
            response_body={
                "text": stream,
                "encoding": "utf-8",
                "truncated": False,
                "binary": False,
            },
        )
        bus.publish(event(0))
        bus.publish(event(1, method="OPTIONS"))  # not a model call: skipped
        bus.publish(streamed)
        yield defer.ensureDeferred(wait_for(lambda: d.stats["batches"] == 1))
        self.assertEqual(len(receiver.requests), 2)
        self.assertEqual(d.stats["dropped"], 1)
        headers, payload = receiver.requests[1]
        self.assertEqual(headers["authorization"], "Bearer hk")
        self.assertEqual(payload["providerRequest"]["url"], "/v1/chat/completions")
        self.assertEqual(payload["providerRequest"]["json"]["messages"][0]["content"], "hi 2")
        self.assertEqual(payload["providerRequest"]["meta"]["request_id"], "req-2")
        response = payload["providerResponse"]["json"]
        self.assertEqual(response["choices"][0]["message"]["content"], "Hello")
        self.assertEqual(
            response["usage"], {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
        )
        self.assertEqual(payload["providerResponse"]["status"], 200)
        self.assertEqual(payload["timing"]["endTime"]["milliseconds"], 250)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_lunary_runs(self) -> Any:
        receiver, url = self.receiver()
        bus, d = self.dispatcher(LunarySink(url, "lk", self.http()), batch_size=2)
        bus.publish(event(0))
        bus.publish(event(1, status=429, error_kind=None))
        yield defer.ensureDeferred(wait_for(lambda: d.stats["sent"] == 2))
        headers, runs = receiver.requests[0]
        self.assertEqual(headers["authorization"], "Bearer lk")
        self.assertEqual(
            [(r["event"], r["runId"]) for r in runs],
            [("start", "ev-0"), ("end", "ev-0"), ("start", "ev-1"), ("error", "ev-1")],
        )
        self.assertEqual(runs[0]["input"], [{"role": "user", "content": "hi 0"}])
        self.assertEqual(runs[0]["name"], "gpt-4o-mini")
        self.assertEqual(runs[1]["output"], {"role": "assistant", "content": "hello"})
        self.assertEqual(runs[1]["tokensUsage"], {"prompt": 5, "completion": 1})


class TransformTests(SynchronousTestCase):
    def test_lunary_verbose_adds_response_headers(self) -> None:
        from llmproxy.events.dispatcher.transform import lunary_events

        quiet = lunary_events(event(0))[0]["metadata"]
        loud = lunary_events(event(0), verbose=True)[0]["metadata"]
        self.assertNotIn("response_headers", quiet)
        self.assertEqual(loud["response_headers"], {"content-type": "application/json"})


class MergeTests(SynchronousTestCase):
    def test_merge_sse(self) -> None:
        text = (
            'data: {"id":"a","object":"chat.completion.chunk","model":"m",'
            '"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
            'data: {"id":"a","choices":[],"usage":{"total_tokens":3}}\n\n'
            "data: [DONE]\n\n"
        )
        merged = merge_sse(text)
        assert merged is not None
        self.assertEqual(merged["object"], "chat.completion")
        self.assertEqual(merged["choices"][0]["message"]["content"], "x")
        self.assertEqual(merged["usage"], {"total_tokens": 3})


def redis_command(*args: str) -> Any:
    """One command over a plain socket (the tests here run outside the reactor)."""
    import socket

    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=5) as sock:
        sock.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n") or (reply.startswith(b"$") and reply.count(b"\r\n") < 2):
            reply += sock.recv(65536)
    if reply.startswith(b"-"):
        raise AssertionError(reply.decode())
    return reply


class DispatcherDaemonTests(SynchronousTestCase):
    """C{twistd -n llmproxy-dispatcher --service file} against the real Redis."""

    def setUp(self) -> None:
        require_redis()
        self.key = f"test-dispatch-{uuid.uuid4().hex[:12]}"
        self.addCleanup(redis_command, "DEL", self.key)
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.out = os.path.join(self.workdir, "out", "events.jsonl")
        self.env = {
            "REDIS_ADDR": f"{REDIS_HOST}:{REDIS_PORT}",
            "REDIS_STREAM_KEY": self.key,
            "REDIS_CONSUMER_GROUP": "dispatchers",
            "REDIS_CONSUMER_NAME": "dispatcher-1",
            "REDIS_STREAM_CLAIM_TIME": "1s",
        }

    def start(self, batch_size: int = 5, flush_interval: float = 0.3) -> Any:
        daemon = start_daemon(
            self.workdir,
            self.env,
            plugin="llmproxy-dispatcher",
            args=[
                "--service",
                "file",
                "--endpoint",
                self.out,
                "--batch-size",
                str(batch_size),
                "--flush-interval",
                str(flush_interval),
            ],
        )
        self.addCleanup(daemon.kill)
        return daemon

    def add(self, start: int, count: int) -> None:
        for n in range(start, start + count):
            redis_command("XADD", self.key, "*", "data", json.dumps(event(n)))

    def lines(self) -> list[dict[str, Any]]:
        try:
            with open(self.out, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def wait_lines(self, predicate: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            if predicate(lines):
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(lines)} line(s) arrived")
            time.sleep(0.05)

    def test_file_service_end_to_end(self) -> None:
        self.add(0, 12)
        daemon = self.start()
        lines = self.wait_lines(lambda ls: len(ls) >= 12)
        self.assertEqual([e["event_id"] for e in lines], [f"ev-{n}" for n in range(12)])
        self.add(12, 2)  # a partial batch goes out after the flush interval
        lines = self.wait_lines(lambda ls: len(ls) >= 14)
        self.assertEqual(lines[-1]["event_id"], "ev-13")
        self.assertEqual(daemon.terminate(), 0)
        self.assertEqual(len(self.lines()), 14)  # nothing delivered twice

    def test_sigterm_flushes_the_partial_batch_and_acks_it(self) -> None:
        daemon = self.start(batch_size=100, flush_interval=60)
        self.add(0, 3)
        deadline = time.monotonic() + 10
        while json.loads(self.health(daemon))["received"] < 3:
            self.assertLess(time.monotonic(), deadline, "the dispatcher read nothing")
            time.sleep(0.05)
        self.assertEqual(self.lines(), [])  # still waiting for a full batch
        status = json.loads(self.health(daemon))
        self.assertEqual((status["status"], status["pending"], status["length"]), ("ok", 3, 3))
        self.assertEqual(daemon.terminate(), 0)
        self.assertEqual([e["event_id"] for e in self.lines()], ["ev-0", "ev-1", "ev-2"])
        pending = redis_command("XPENDING", self.key, "dispatchers")
        self.assertTrue(pending.startswith(b"*4\r\n:0\r\n"), pending)

    def health(self, daemon: Any) -> bytes:
        import urllib.request

        with urllib.request.urlopen(daemon.url + "/health", timeout=5) as response:
            return bytes(response.read())

    def test_sigkill_mid_batch_then_restart_delivers_everything(self) -> None:
        self.add(0, 20)
        daemon = self.start(batch_size=7, flush_interval=60)
        self.wait_lines(lambda ls: len(ls) >= 14)  # two full batches went out
        deadline = time.monotonic() + 10
        while json.loads(self.health(daemon))["received"] < 20:
            self.assertLess(time.monotonic(), deadline, "the dispatcher read too little")
            time.sleep(0.05)
        daemon.process.send_signal(signal.SIGKILL)  # six events read, not yet delivered
        daemon.process.wait()
        self.assertEqual(len(self.lines()), 14)
        self.add(20, 10)
        daemon = self.start(batch_size=7)
        wanted = {f"ev-{n}" for n in range(30)}
        lines = self.wait_lines(lambda ls: {e["event_id"] for e in ls} >= wanted)
        self.assertEqual(daemon.terminate(), 0)
        self.assertEqual(len(lines), 30)  # nothing accepted was delivered twice

    def test_bad_service_is_a_one_line_error(self) -> None:
        import subprocess
        import sys

        proc = subprocess.run(
            [sys.executable, "-m", "twisted", "llmproxy-dispatcher", "--service", "nope"],
            capture_output=True,
            text=True,
            cwd=self.workdir,
            timeout=60,
        )
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("unknown 'nope'", proc.stderr)
