"""
Graceful shutdown with a stream in flight: SIGTERM lets a streaming answer
finish within the drain timeout and the daemon exits 0; past the drain
timeout the stream is cut (visibly) and the daemon still exits 0.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
from typing import Any

from twisted.internet import reactor, threads
from twisted.trial.unittest import TestCase

from llmproxy.testing.daemon import Daemon, start_daemon
from llmproxy.testing.fake_upstream import FakeUpstream
from tests.test_e2e_proxy import seed_database

BODY = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}'


def stream_through(daemon: Daemon, token: str, chunks: int, delay_ms: int, sigterm: Any) -> dict:
    """
    POST a streaming chat completion; after the first event call
    C{sigterm()}; read until the end. Returns what the client saw.
    """
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=BODY,
            headers={
                "Authorization": "Bearer " + token,
                "Content-Type": "application/json",
                "X-Fake-Chunks": str(chunks),
                "X-Fake-Chunk-Delay-Ms": str(delay_ms),
            },
        )
        response = conn.getresponse()
        seen = b""
        signalled = False
        complete = True
        while True:
            try:
                line = response.readline()
            except (http.client.IncompleteRead, ConnectionError):
                complete = False
                break
            if not line:
                break
            seen += line
            if not signalled and line.startswith(b"data:"):
                signalled = True
                sigterm()
        return {
            "status": response.status,
            "events": seen.count(b"data:"),
            "done": b"data: [DONE]" in seen,
            "complete": complete,
        }
    finally:
        conn.close()


class ShutdownTests(TestCase):
    timeout = 120

    async def start(self, drain: str) -> tuple[Daemon, str]:
        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor)
        self.addCleanup(listening.stop)
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        db = os.path.join(workdir, "llmproxy.db")
        _, (token,) = await seed_database(db, [{}])
        env = {
            "MANAGEMENT_TOKEN": "mt",
            "DATABASE_PATH": db,
            "OPENAI_API_URL": listening.url,
            "API_CONFIG_PATH": os.path.join(workdir, "no-providers.yaml"),
            "LOG_FORMAT": "text",
            "AUDIT_LOG_FILE": os.path.join(workdir, "audit.log"),
        }
        daemon = await threads.deferToThread(
            start_daemon, workdir, env, args=["--drain-timeout", drain]
        )
        self.addCleanup(daemon.kill)
        return daemon, token

    async def test_sigterm_lets_the_stream_finish(self) -> None:
        daemon, token = await self.start("20")
        sent = threading.Event()

        def sigterm() -> None:
            daemon.process.send_signal(signal.SIGTERM)
            sent.set()

        # 2 + 8 + [DONE] events 0.3 s apart: about 3 s of streaming after SIGTERM.
        seen = await threads.deferToThread(stream_through, daemon, token, 8, 300, sigterm)
        self.assertTrue(sent.is_set())
        self.assertEqual(seen["status"], 200)
        self.assertTrue(seen["complete"], seen)
        self.assertTrue(seen["done"], seen)
        status = await threads.deferToThread(daemon.process.wait, 60)
        self.assertEqual(status, 0, daemon.log())
        log = daemon.log()
        self.assertIn("draining 1 in-flight request(s)", log)
        self.assertIn("drained all in-flight requests", log)

    async def test_drain_deadline_cuts_the_stream_and_still_exits_0(self) -> None:
        daemon, token = await self.start("1")

        def sigterm() -> None:
            daemon.process.send_signal(signal.SIGTERM)

        # 40 events 0.3 s apart would take 12 s; the drain gives it 1 s.
        seen = await threads.deferToThread(stream_through, daemon, token, 40, 300, sigterm)
        self.assertEqual(seen["status"], 200)
        self.assertFalse(seen["complete"], seen)
        self.assertFalse(seen["done"], seen)
        self.assertLess(seen["events"], 20)
        status = await threads.deferToThread(daemon.process.wait, 60)
        self.assertEqual(status, 0, daemon.log())
        self.assertIn("drain deadline hit", daemon.log())
