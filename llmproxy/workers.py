"""
``--workers N``: one listening socket shared by N worker processes so every
core of a machine serves requests.

The parent binds the TCP socket once and starts N copies of
``twistd -n llmproxy`` that inherit it as file descriptor 3, the way systemd
socket activation hands sockets over, so each worker simply listens on
``systemd:domain=INET:index=0``. The kernel queues connections on the one
socket and whichever worker is free accepts them. The parent restarts a
worker that dies and, on SIGTERM, passes the signal on and waits for every
worker to drain and exit.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger

log = Logger()

_TCP = re.compile(r"^tcp6?:(?P<port>\d+)(?P<rest>(:.*)?)$")


def parse_tcp_endpoint(description: str) -> tuple[str, int, int]:
    """C{(interface, port, backlog)} of a C{tcp:} endpoint string; ValueError otherwise."""
    m = _TCP.match(description)
    if not m:
        raise ValueError(f"--workers needs a tcp: endpoint, got {description!r}")
    options = dict(
        part.split("=", 1) for part in m.group("rest").split(":") if part and "=" in part
    )
    interface = options.get("interface", "").replace("\\", "") or "0.0.0.0"
    return interface, int(m.group("port")), int(options.get("backlog", "1024"))


def bind_socket(interface: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((interface, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, pool: WorkerPoolService, index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: defer.Deferred[int] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback(code if code is not None else -1)
        self.pool.worker_ended(self, code)


#: Set in each worker's environment: the pid of the process that runs it.
PARENT_PID_ENV = "LLMPROXY_PARENT_PID"


class ParentWatchService(service.Service):
    """
    In a worker: stop (draining, as on SIGTERM) once the parent that runs
    the pool is gone, for instance killed with SIGKILL, which it cannot pass
    on. Without this the workers would go on serving on the shared port,
    and a new pool could not bind it.
    """

    def __init__(
        self,
        clock: IReactorTime,
        parent_pid: int,
        stop: Any,
        interval: float = 1.0,
        getppid: Any = os.getppid,
    ) -> None:
        self.clock = clock
        self.parent_pid = parent_pid
        self.stop = stop
        self.interval = interval
        self._getppid = getppid
        self._loop: Any = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet.task import LoopingCall

        self._loop = LoopingCall(self._check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _check(self) -> None:
        if self._getppid() == self.parent_pid:
            return
        log.warn(
            "the --workers parent (pid {pid}) is gone; stopping this worker", pid=self.parent_pid
        )
        self._loop.stop()
        self.stop()


class WorkerPoolService(service.Service):
    """Binds the port, runs and supervises the worker processes."""

    def __init__(
        self,
        reactor: IReactorProcess,
        clock: IReactorTime,
        endpoint: str,
        workers: int,
        worker_args: Sequence[str],
        worker_env: dict[str, str],
        stop_timeout: float,
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.interface, self.port, self.backlog = parse_tcp_endpoint(endpoint)
        self.workers = workers
        self.worker_args = list(worker_args)
        self.worker_env = worker_env
        self.stop_timeout = stop_timeout
        self._socket: socket.socket | None = None
        self._running: dict[int, tuple[Any, _WorkerProtocol]] = {}
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        self._socket = bind_socket(self.interface, self.port, self.backlog)
        log.info(
            "listening on {interface}:{port} for {n} worker processes",
            interface=self.interface,
            port=self.port,
            n=self.workers,
        )
        for index in range(self.workers):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        assert self._socket is not None
        proto = _WorkerProtocol(self, index)
        env = dict(os.environ)
        env.update(self.worker_env)
        env["LLMPROXY_WORKER_INDEX"] = str(index)
        env[PARENT_PID_ENV] = str(os.getpid())  # see ParentWatchService
        # LISTEN_PID must be the worker's own pid: set it in the shell that
        # then execs the worker (exec keeps the pid). The worker starts with
        # SIGHUP ignored (an ignored signal stays ignored across exec) until
        # it installs its own handler, so a SIGHUP passed on while it starts
        # cannot end it.
        argv = [
            "/bin/sh",
            "-c",
            'trap "" HUP; export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=http; exec "$0" "$@"',
            sys.executable,
            "-c",
            "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
            "-n",
            "--pidfile=",
            "llmproxy",
            "--port",
            "systemd:domain=INET:index=0",
            "--workers",
            "1",
            *self.worker_args,
        ]
        transport = self.reactor.spawnProcess(
            proto,
            argv[0],
            argv,
            env=env,
            childFDs={0: "w", 1: 1, 2: 2, 3: self._socket.fileno()},
        )
        self._running[index] = (transport, proto)
        log.info("worker {index} started (pid {pid})", index=index, pid=transport.pid)

    def signal_workers(self, name: str) -> None:
        """Send every running worker the signal C{name} (C{"HUP"}, C{"TERM"})."""
        for transport, _proto in list(self._running.values()):
            try:
                transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def worker_ended(self, proto: _WorkerProtocol, code: int | None) -> None:
        self._running.pop(proto.index, None)
        if self._stopping:
            return
        log.error(
            "worker {index} exited with {code}; restarting in 1s", index=proto.index, code=code
        )
        self.clock.callLater(1.0, self._respawn, proto.index)

    def _respawn(self, index: int) -> None:
        if not self._stopping and index not in self._running:
            self._spawn(index)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        self._stopping = True
        super().stopService()
        running = list(self._running.values())
        self.signal_workers("TERM")
        ended = defer.DeferredList([p.ended for _, p in running], consumeErrors=True)
        ended.addTimeout(self.stop_timeout, self.clock)  # type: ignore[arg-type]
        try:
            yield ended
        except defer.TimeoutError:
            log.warn("workers did not stop in {t}s; killing them", t=self.stop_timeout)
            for transport, _ in list(self._running.values()):
                try:
                    transport.signalProcess(signal.SIGKILL)
                except Exception:
                    pass
        if self._socket is not None:
            self._socket.close()
            self._socket = None
