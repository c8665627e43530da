"""--workers N: one socket, N worker daemons, supervised by the parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.testing.daemon import Daemon, start_daemon
from llmproxy.workers import ParentWatchService, parse_tcp_endpoint


def worker_pids(parent: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(parent)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


class ParseTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(parse_tcp_endpoint("tcp:8080"), ("0.0.0.0", 8080, 1024))
        self.assertEqual(
            parse_tcp_endpoint("tcp:8080:interface=127.0.0.1:backlog=50"),
            ("127.0.0.1", 8080, 50),
        )
        self.assertRaises(ValueError, parse_tcp_endpoint, "unix:/tmp/s")


class _NoReactor:
    def callWhenRunning(self, f: object) -> None:
        pass


class WorkerCacheTTLTests(SynchronousTestCase):
    """Workers that cannot hear each other's invalidations keep caches for 1 s at most."""

    def worker_env(self, **env: str) -> dict[str, str]:
        from llmproxy.config import Config
        from llmproxy.tap import Options, build_worker_pool

        missing = os.path.join(self.mktemp(), "none.yaml")
        config = Config.from_env(
            {"MANAGEMENT_TOKEN": "mt-workers", "API_CONFIG_PATH": missing, "WORKERS": "2", **env}
        )
        options = Options()
        options["config"] = config
        (pool,) = list(build_worker_pool(config, options, _NoReactor()))
        return dict(pool.worker_env)

    def test_without_redis(self) -> None:
        self.assertEqual(self.worker_env()["TOKEN_CACHE_TTL"], "1.0")

    def test_redis_cache_that_is_switched_off_shares_nothing(self) -> None:
        env = self.worker_env(HTTP_CACHE_BACKEND="redis", HTTP_CACHE_ENABLED="false")
        self.assertEqual(env["LLM_PROXY_ACTIVE_CACHE_TTL"], "1.0")

    def test_with_redis_pubsub(self) -> None:
        for setting in ({"HTTP_CACHE_BACKEND": "redis"}, {"INVALIDATION_PUBSUB": "true"}):
            self.assertNotIn("TOKEN_CACHE_TTL", self.worker_env(**setting))


class ParentWatchTests(SynchronousTestCase):
    def test_stops_once_when_the_parent_is_gone(self) -> None:
        clock = Clock()
        parent = [4242]
        stops: list[bool] = []
        watch = ParentWatchService(
            clock, 4242, lambda: stops.append(True), getppid=lambda: parent[0]
        )
        watch.startService()
        clock.advance(5)
        self.assertEqual(stops, [])
        parent[0] = 1  # reparented: the parent died
        clock.advance(1)
        clock.advance(5)
        self.assertEqual(stops, [True])
        watch.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class WorkersEndToEndTests(SynchronousTestCase):
    def start_pool(self) -> tuple[Daemon, list[int]]:
        """A C{--workers 2} daemon once both workers run, and their pids."""
        workdir = self.mktemp()
        os.makedirs(workdir)
        daemon = start_daemon(
            workdir,
            {"MANAGEMENT_TOKEN": "mt", "LOG_FORMAT": "text", "ACCESS_LOG": "off"},
            args=["--workers", "2"],
        )
        self.addCleanup(daemon.kill)
        deadline = time.monotonic() + 20
        while len(worker_pids(daemon.process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = worker_pids(daemon.process.pid)
        self.assertEqual(len(workers), 2, daemon.log())
        self.addCleanup(_kill_all, workers)  # never leave a worker behind a failed test
        return daemon, workers

    def test_two_workers_serve_restart_and_stop(self) -> None:
        daemon, workers = self.start_pool()
        for _ in range(10):
            with urllib.request.urlopen(daemon.url + "/health", timeout=5) as r:
                self.assertEqual(json.loads(r.read())["status"], "ok")

        # A worker that dies is replaced.
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = worker_pids(daemon.process.pid)
            if len(now) == 2 and workers[0] not in now:
                break
            time.sleep(0.1)
        now = worker_pids(daemon.process.pid)
        self.assertEqual(len(now), 2, daemon.log())
        self.assertNotIn(workers[0], now)
        with urllib.request.urlopen(daemon.url + "/health", timeout=5) as r:
            self.assertEqual(r.status, 200)

        # SIGHUP (logrotate) reaches the workers, which reopen their files and
        # go on (once the new worker is up: one still starting ignores it).
        deadline = time.monotonic() + 20
        while daemon.log().count("LLMProxySite starting on") < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        daemon.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while daemon.log().count("SIGHUP: reopened") < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(daemon.log().count("SIGHUP: reopened"), 3, daemon.log())
        self.assertEqual(worker_pids(daemon.process.pid), now)
        with urllib.request.urlopen(daemon.url + "/health", timeout=5) as r:
            self.assertEqual(r.status, 200)

        self.assertEqual(daemon.terminate(), 0, daemon.log())
        self.assertEqual(worker_pids(daemon.process.pid), [])
        self.assertNotIn("Traceback", daemon.log())

    def test_workers_stop_when_the_parent_is_killed(self) -> None:
        daemon, workers = self.start_pool()
        # SIGKILL: the parent can pass nothing on; the workers notice by themselves.
        daemon.kill()
        deadline = time.monotonic() + 20
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertFalse([pid for pid in workers if _running(pid)], daemon.log())
        self.assertEqual(daemon.log().count("is gone; stopping this worker"), 2, daemon.log())


def _running(pid: int) -> bool:
    """Whether C{pid} is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)
