"""
What an operator notices: a port that cannot be opened stops the daemon
with an error instead of leaving a process that serves nothing; a request
the client abandoned still has its access-log line.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llmproxy.testing.daemon import start_daemon
from llmproxy.web.app import WebApp
from llmproxy.web.root import Root
from llmproxy.web.site import AccessLog, LLMProxySite
from tests.support import LineSink


class _Never(Resource):
    """Answers C{/v1/started} with headers and one chunk, then never finishes."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        if request.uri == b"/v1/started":
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"data: 1\n\n")
        return NOT_DONE_YET


class StartupTests(SynchronousTestCase):
    def test_port_in_use_exits_with_error(self) -> None:
        taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        error = self.assertRaises(
            RuntimeError,
            start_daemon,
            workdir,
            {"MANAGEMENT_TOKEN": "acceptance-management-token"},
            port=port,
        )
        self.assertIn("exited with 1", str(error))
        self.assertIn("Address already in use", str(error))


class AbandonedRequestLogTests(SynchronousTestCase):
    def abandon(self, path: bytes) -> dict[str, Any]:
        stream = LineSink()
        clock = Clock()
        site = LLMProxySite(
            Root(WebApp(clock=clock).resource(), _Never()),
            clock=clock,
            max_request_size=1000,
            access_log=AccessLog(stream, "json"),  # type: ignore[arg-type]
        )
        channel = site.buildProtocol(None)
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(stream.lines, [])
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(site.in_flight, 0)
        site.access_log.flush()
        self.assertEqual(len(stream.lines), 1)
        return json.loads(stream.lines[0])  # type: ignore[no-any-return]

    def test_client_gone_before_answer(self) -> None:
        line = self.abandon(b"/v1/waiting")
        self.assertEqual((line["path"], line["status_code"]), ("/v1/waiting", 499))

    def test_client_gone_during_stream(self) -> None:
        line = self.abandon(b"/v1/started")
        self.assertEqual((line["path"], line["status_code"]), ("/v1/started", 200))
        self.assertGreater(line["bytes"], 0)
