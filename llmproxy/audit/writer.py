"""
The audit writer: callers hand over events and never wait; the service
writes them in batches to a JSONL file and/or the database.

File writes happen on one dedicated worker thread, one batch at a time:
each batch is a single C{write} of all its lines, a flush and an C{fsync},
so a slow disk or fsync delays audit lines, never HTTP requests. One
thread keeps the lines in order. Database writes go through the store's
batched C{insert_audit_events} (which runs on the store's own threads).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import IO, Any

from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from llmproxy.audit.events import event_line
from llmproxy.store.interface import IStore
from llmproxy.store.records import AuditEvent

log = Logger()

#: Run a blocking callable somewhere that is not the reactor thread.
BlockingRunner = Callable[..., "defer.Deferred[Any]"]


class JsonlFile:
    """An append-only JSONL file; every method blocks and runs off the reactor."""

    def __init__(self, path: str, create_dir: bool) -> None:
        self.path = path
        self.create_dir = create_dir
        self._file: IO[bytes] | None = None

    def _open(self) -> IO[bytes]:
        if self._file is None:
            directory = os.path.dirname(os.path.abspath(self.path))
            if self.create_dir:
                os.makedirs(directory, exist_ok=True)
            self._file = open(self.path, "ab")
        return self._file

    def write_lines(self, lines: Sequence[bytes]) -> None:
        f = self._open()
        f.write(b"".join(lines))
        f.flush()
        os.fsync(f.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class AuditWriterService(service.Service):
    """
    Public API: L{record} (enqueue, never blocks, never fails) and L{flush}
    (a Deferred that fires once everything queued so far is written).

    @param store: where C{insert_audit_events} sends rows; None disables
        the database sink.
    @param file_path: the JSONL file; None or empty disables the file sink.
    @param enabled: False drops every event (C{AUDIT_ENABLED=false}).
    @param run_blocking: runs the file writes; by default a one-thread pool
        owned by this service.
    """

    name = "audit"

    def __init__(
        self,
        clock: IReactorTime,
        *,
        store: IStore | None = None,
        file_path: str | None = None,
        create_dir: bool = True,
        enabled: bool = True,
        batch_size: int = 200,
        flush_interval: float = 0.2,
        max_queue: int = 100_000,
        reactor: IReactorThreads | None = None,
        run_blocking: BlockingRunner | None = None,
    ) -> None:
        self.clock = clock
        self.store = store
        self.file = JsonlFile(file_path, create_dir) if file_path else None
        self.enabled = enabled and (store is not None or self.file is not None)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self.dropped = 0
        self._reactor = reactor
        self._run_blocking = run_blocking
        self._pool: ThreadPool | None = None
        self._queue: list[AuditEvent] = []
        self._timer: IDelayedCall | None = None
        self._writing = False
        self._waiters: list[defer.Deferred[None]] = []
        self._stopped = False

    # -- public API ----------------------------------------------------------------

    def record(self, event: AuditEvent) -> None:
        """Queue one event. Returns at once; writing happens in the background."""
        if not self.enabled:
            return
        if self._stopped:
            self.dropped += 1
            log.warn("audit event {action} after stop was dropped", action=event.action)
            return
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.error("audit queue full; {dropped} event(s) dropped", dropped=self.dropped)
            return
        self._queue.append(event)
        if not self.running:
            return  # written once the service starts
        if len(self._queue) >= self.batch_size:
            self._kick()
        elif self._timer is None:
            self._timer = self.clock.callLater(self.flush_interval, self._on_timer)

    def flush(self) -> defer.Deferred[None]:
        """Write everything queued so far (and whatever is being written)."""
        return defer.ensureDeferred(self._drain())

    def reopen(self) -> defer.Deferred[None]:
        """
        Write what is queued to the file as it is, then close it, so the
        next batch opens it again at its path (SIGHUP, after logrotate
        moved it).
        """
        return defer.ensureDeferred(self._reopen())

    async def _reopen(self) -> None:
        await self.flush()
        if self.file is not None and self._run_blocking is not None:
            await self._run_blocking(self.file.close)

    @property
    def pending(self) -> int:
        return len(self._queue)

    # -- service -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        if self.file is not None and self._run_blocking is None:
            if self._reactor is None:
                raise ValueError("AuditWriterService needs a reactor or run_blocking")
            self._pool = ThreadPool(minthreads=0, maxthreads=1, name="audit-file")
            self._pool.start()
            reactor, pool = self._reactor, self._pool
            self._run_blocking = lambda f, *a: threads.deferToThreadPool(reactor, pool, f, *a)
        if self._queue:
            self._kick()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        queued = len(self._queue)
        try:
            yield self.flush()
        finally:
            self._stopped = True
            if self.file is not None and self._run_blocking is not None:
                yield self._run_blocking(self.file.close)
            if self._pool is not None:
                self._pool.stop()
                self._pool = None
                self._run_blocking = None
        log.info("audit writer stopped; flushed {count} queued event(s)", count=queued)

    # -- internals -----------------------------------------------------------------

    def _on_timer(self) -> None:
        self._timer = None
        self._kick()

    def _kick(self) -> None:
        if not self._writing:
            self.flush()

    async def _drain(self) -> None:
        # One writer at a time keeps file order; later callers wait for it
        # and then write what is still queued.
        while self._writing:
            waiter: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(waiter)
            await waiter
        if not self._queue:
            return
        if self.file is not None and self._run_blocking is None:
            return  # not started yet: the queue is written by startService
        self._writing = True
        try:
            while self._queue:
                batch = self._queue[: self.batch_size * 5]
                del self._queue[: len(batch)]
                await self._write(batch)
        finally:
            self._writing = False
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                w.callback(None)

    async def _write(self, batch: list[AuditEvent]) -> None:
        if self.file is not None:
            lines = [
                json.dumps(event_line(e), separators=(",", ":"), default=str).encode() + b"\n"
                for e in batch
            ]
            try:
                assert self._run_blocking is not None
                await self._run_blocking(self.file.write_lines, lines)
            except Exception:
                log.failure(
                    "writing {count} audit event(s) to {path} failed",
                    count=len(batch),
                    path=self.file.path,
                )
        if self.store is not None:
            try:
                await self.store.insert_audit_events(batch)
            except Exception:
                log.failure(
                    "storing {count} audit event(s) in the database failed", count=len(batch)
                )
