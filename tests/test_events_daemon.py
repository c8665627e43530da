"""
Events from a real C{twistd llmproxy} in front of the fake upstream:
FILE_EVENT_LOG with the default in-memory bus, and Redis Streams through an
outage (the proxy keeps serving, /ready says so, events arrive afterwards).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from twisted.internet import reactor, threads
from twisted.trial.unittest import TestCase

from llmproxy.testing.daemon import Daemon, start_daemon
from llmproxy.testing.fake_upstream import FakeUpstream
from tests.redisserver import RedisServer
from tests.support import http_json
from tests.test_e2e_proxy import seed_database

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


def post(
    url: str, token: str, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(payload).encode(),
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            **(headers or {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get(url: str) -> tuple[int, Any]:
    status, _, body = http_json(url, timeout=10)
    return status, body


def read_lines(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


class EventsDaemonCase(TestCase):
    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.fake = FakeUpstream(clock=reactor)
        listening = self.fake.listen(reactor)
        self.addCleanup(listening.stop)
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.db = os.path.join(self.workdir, "llmproxy.db")
        self.project, (self.token,) = await seed_database(self.db, [{}])
        self.events_path = os.path.join(self.workdir, "events", "events.jsonl")
        self.env = {
            "MANAGEMENT_TOKEN": "mt",
            "DATABASE_PATH": self.db,
            "OPENAI_API_URL": listening.url,
            "API_CONFIG_PATH": os.path.join(self.workdir, "no-providers.yaml"),
            "LOG_FORMAT": "text",
            "ACCESS_LOG": "off",
            "FILE_EVENT_LOG": self.events_path,
            "HTTP_CACHE_ENABLED": "false",
        }

    async def start(self, **env: str) -> Daemon:
        daemon: Daemon = await threads.deferToThread(
            start_daemon, self.workdir, dict(self.env, **env)
        )
        self.addCleanup(lambda: threads.deferToThread(daemon.kill))
        return daemon

    async def stop(self, daemon: Daemon) -> None:
        status = await threads.deferToThread(daemon.terminate)
        self.assertEqual(status, 0, daemon.log())


class FileEventLogTests(EventsDaemonCase):
    async def test_stream_and_plain_calls_become_events(self) -> None:
        daemon = await self.start()
        streamed = dict(CHAT, stream=True)
        status, body = await threads.deferToThread(post, daemon.url, self.token, streamed)
        self.assertEqual(status, 200)
        # llmproxy asked the provider for usage, the client did not: no usage chunk
        sent = self.fake.last_request.json()
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        chunks = [
            json.loads(line[6:])
            for line in body.decode().splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
        self.assertTrue(chunks)
        self.assertTrue(all(c["choices"] and "usage" not in c for c in chunks))
        status, _ = await threads.deferToThread(post, daemon.url, self.token, CHAT)
        self.assertEqual(status, 200)
        status, _ = await threads.deferToThread(post, daemon.url, "sk-wrong", CHAT)
        self.assertEqual(status, 401)
        await self.stop(daemon)  # the file log is flushed on stop
        events = read_lines(self.events_path)
        self.assertEqual([e["status"] for e in events], [200, 200, 401])
        stream_event, plain_event, refused = events
        self.assertTrue(stream_event["streamed"])
        self.assertEqual(stream_event["usage"]["source"], "reported")
        self.assertGreater(stream_event["usage"]["completion_tokens"], 0)
        self.assertEqual(stream_event["model"], "gpt-4o-mini")
        self.assertEqual(stream_event["project_id"], self.project.id)
        self.assertNotIn('"choices":[]', stream_event["response_body"]["text"])
        self.assertFalse(plain_event["streamed"])
        self.assertEqual(plain_event["usage"]["source"], "reported")
        self.assertEqual(json.loads(plain_event["request_body"]["text"]), CHAT)
        self.assertIsNone(refused["usage"])
        self.assertIsNotNone(refused["error_kind"])
        self.assertEqual({e["schema_version"] for e in events}, {1})

    async def test_cache_hits_are_published(self) -> None:
        daemon = await self.start(HTTP_CACHE_ENABLED="true")
        opt_in = {"Cache-Control": "public, max-age=60"}
        for _ in range(2):
            status, _ = await threads.deferToThread(post, daemon.url, self.token, CHAT, opt_in)
            self.assertEqual(status, 200)
        self.assertEqual(len(self.fake.requests), 1)
        await self.stop(daemon)
        first, second = read_lines(self.events_path)
        self.assertEqual(second["cache_status"], "hit")
        self.assertNotEqual(first["cache_status"], "hit")
        self.assertIsNone(second["durations"]["upstream_ttfb_ms"])
        self.assertIsNone(second["usage"])  # the provider used no tokens for it
        self.assertEqual(first["usage"]["source"], "reported")
        self.assertNotEqual(second["request_id"], first["request_id"])


class RedisOutageTests(EventsDaemonCase):
    async def test_proxy_serves_while_event_redis_is_down(self) -> None:
        server = RedisServer()
        self.addCleanup(server.cleanup)
        daemon = await self.start(
            LLM_PROXY_EVENT_BUS="redis-streams",
            REDIS_ADDR=f"127.0.0.1:{server.port}",
            REDIS_STREAM_KEY="events-outage",
            FILE_EVENT_LOG="",
        )
        status, _ = await threads.deferToThread(get, daemon.url + "/health")
        self.assertEqual(status, 200)
        status, body = await threads.deferToThread(post, daemon.url, self.token, CHAT)
        self.assertEqual(status, 200, body)
        status, ready = await threads.deferToThread(get, daemon.url + "/ready")
        self.assertEqual(status, 503)
        self.assertIn("event(s) buffered", ready["checks"]["redis-event-bus"])
        await threads.deferToThread(server.start)

        def wait_stream() -> list[Any]:
            import socket

            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
                    s.sendall(b"XLEN events-outage\r\n")
                    reply = s.recv(100)
                if reply.startswith(b":") and int(reply[1:].strip()) >= 1:
                    return [int(reply[1:].strip())]
                time.sleep(0.1)
            return []

        self.assertEqual(await threads.deferToThread(wait_stream), [1])
        _, ready = await threads.deferToThread(get, daemon.url + "/ready")
        self.assertEqual(ready["checks"]["redis-event-bus"], "ok")
        await self.stop(daemon)
        # and a dispatcher delivers it from the stream to a file
        out = os.path.join(self.workdir, "dispatched.jsonl")
        dispatcher: Daemon = await threads.deferToThread(
            start_daemon,
            self.workdir,
            {
                "REDIS_ADDR": f"127.0.0.1:{server.port}",
                "REDIS_STREAM_KEY": "events-outage",
            },
            "llmproxy-dispatcher",
            ["--service", "file", "--endpoint", out, "--flush-interval", "0.2"],
        )
        self.addCleanup(lambda: threads.deferToThread(dispatcher.kill))

        def wait_file() -> list[dict[str, Any]]:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not read_lines(out):
                time.sleep(0.05)
            return read_lines(out)

        (delivered,) = await threads.deferToThread(wait_file)
        self.assertEqual(delivered["path"], "/v1/chat/completions")
        self.assertEqual(delivered["usage"]["source"], "reported")
        await self.stop(dispatcher)
