"""A throwaway redis-server on a free port, for outage and recovery tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

from twisted.trial.unittest import SkipTest

from llmproxy.testing.daemon import free_port
from tests.services import in_ci


class RedisServer:
    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            if in_ci():
                raise AssertionError("redis-server is not installed (CI=true)")
            raise SkipTest("redis-server is not installed")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="llmproxy-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
