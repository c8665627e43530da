"""Log output: level filter, JSON shape, library chatter kept to debug."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.logging import make_observer


class ObserverTests(SynchronousTestCase):
    def emit(self, level: str, fmt: str = "json") -> list[str]:
        out = io.StringIO()
        observer = make_observer(level, fmt, out)
        Logger(namespace="llmproxy.test", observer=observer).info(
            "proxied {method} {path}", method="GET", path="/v1/models"
        )
        Logger(namespace="llmproxy.test", observer=observer).debug("details")
        Logger(
            namespace="twisted.application._client_service.ClientService", observer=observer
        ).info("Scheduling retry 1 to connect")
        observer(
            {
                "log_level": LogLevel.info,
                "log_text": "Discarding dead connection.",
                "log_format": "{log_text}",
                "log_namespace": "log_legacy",
                "log_time": 0,
            }
        )
        Logger(namespace="llmproxy.test", observer=observer).error("broken {what}", what="x")
        return out.getvalue().splitlines()

    def test_json_lines(self) -> None:
        lines = self.emit("info")
        first = json.loads(lines[0])
        self.assertEqual(first["level"], "info")
        self.assertEqual(first["msg"], "proxied GET /v1/models")
        self.assertEqual((first["method"], first["path"]), ("GET", "/v1/models"))
        self.assertTrue(first["ts"].endswith("Z"))
        # debug hidden, chatter hidden, error shown
        self.assertEqual(len(lines), 2, lines)
        self.assertEqual(json.loads(lines[1])["level"], "error")

    def test_debug_shows_everything(self) -> None:
        self.assertEqual(len(self.emit("debug")), 5)

    def test_error_level(self) -> None:
        lines = self.emit("error")
        self.assertEqual([json.loads(x)["msg"] for x in lines], ["broken x"])

    def test_text_format(self) -> None:
        lines = self.emit("info", "text")
        self.assertIn("proxied GET /v1/models", lines[0])
        self.assertFalse(lines[0].startswith("{"))
