"""
The dispatcher loop: read events, batch them (by size, or every
C{flush_interval} seconds), deliver each batch to the sink, and acknowledge
only what the sink accepted (or refused for good). Retryable failures are
retried with exponential backoff (1 s, 2 s, 4 s ... at most C{max_backoff})
until the sink takes the batch, so delivery is at least once: a batch that
was never acknowledged is read again after a restart.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmproxy.events.dispatcher.sinks import ISink, PermanentError, RetryableError
from llmproxy.events.memory import MemoryEventBus
from llmproxy.events.redis_streams import RedisStreamConsumer, StreamEntry
from llmproxy.logthrottle import LogThrottle

log = Logger()


def consumer_name(service_name: str) -> str:
    import os

    return f"dispatcher-{service_name}-{socket.gethostname()}-{os.getpid()}"


class RedisSource:
    """Events from a Redis Streams consumer group."""

    def __init__(self, consumer: RedisStreamConsumer, pools: list[Any]) -> None:
        self.consumer = consumer
        self.pools = pools

    async def open(self) -> None:
        await self.consumer.ensure_group()

    async def read(self, count: int, wait: float) -> list[StreamEntry]:
        return await self.consumer.read(count, wait)

    async def ack(self, entries: list[StreamEntry]) -> None:
        await self.consumer.ack([e.id for e in entries])

    async def close(self) -> None:
        try:
            await self.consumer.leave()
        except Exception:
            pass  # a consumer left behind only shows up in XINFO CONSUMERS
        for pool in self.pools:
            try:
                await defer.maybeDeferred(pool.disconnect)
            except Exception:
                pass


class MemorySource:
    """Events from an in-process L{MemoryEventBus} (the bus of this same process)."""

    def __init__(self, bus: MemoryEventBus, clock: IReactorTime, capacity: int = 1000) -> None:
        self.clock = clock
        self.capacity = capacity
        self.dropped = 0
        self._queue: deque[StreamEntry] = deque()
        self._waiter: defer.Deferred[None] | None = None
        self._seq = 0
        self._unsubscribe = bus.subscribe(self._receive)

    def _receive(self, event: dict[str, Any]) -> None:
        if len(self._queue) >= self.capacity:
            self.dropped += 1
            return
        self._seq += 1
        self._queue.append(StreamEntry(str(self._seq), event))
        if self._waiter is not None and not self._waiter.called:
            self._waiter.callback(None)

    async def open(self) -> None:
        pass

    async def read(self, count: int, wait: float) -> list[StreamEntry]:
        if not self._queue and wait > 0:
            waiter: defer.Deferred[None] = defer.Deferred()
            self._waiter = waiter

            def wake() -> None:
                if not waiter.called:
                    waiter.callback(None)

            call = self.clock.callLater(wait, wake)
            await waiter
            if call.active():
                call.cancel()
            self._waiter = None
        return [self._queue.popleft() for _ in range(min(count, len(self._queue)))]

    async def ack(self, entries: list[StreamEntry]) -> None:
        pass

    async def close(self) -> None:
        self._unsubscribe()


class Dispatcher(service.Service):
    name = "dispatcher"

    def __init__(
        self,
        source: Any,
        sink: ISink,
        clock: IReactorTime,
        *,
        batch_size: int = 100,
        flush_interval: float = 5.0,
        read_wait: float = 1.0,
        max_backoff: float = 30.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.source = source
        self.sink = sink
        self.clock = clock
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.read_wait = read_wait
        self.max_backoff = max_backoff
        self.stop_timeout = stop_timeout
        self.stats = {"received": 0, "sent": 0, "dropped": 0, "unparseable": 0, "batches": 0}
        self.last_sent_at: float | None = None
        self.started_at = clock.seconds()
        self._stopping = False
        self._sleep: defer.Deferred[Any] | None = None
        self._done: defer.Deferred[None] | None = None
        self._errors = LogThrottle(clock, 30.0)

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.started_at = self.clock.seconds()
        self._done = defer.ensureDeferred(self._run())
        self._done.addErrback(lambda f: log.failure("dispatcher loop crashed", f))

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        self._stopping = True
        if self._sleep is not None:
            self._sleep.cancel()
        if self._done is not None:
            done = self._done
            done.addTimeout(self.stop_timeout, self.clock)  # type: ignore[arg-type]
            try:
                yield done
            except defer.TimeoutError:
                log.warn("dispatcher did not finish its batch in time; it will be read again")
            except Exception:
                pass
        yield defer.ensureDeferred(self.source.close())
        log.info(
            "dispatcher stopped: {sent} sent, {dropped} dropped",
            sent=self.stats["sent"],
            dropped=self.stats["dropped"],
        )

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless stopping; False when the stop cut it short."""
        if self._stopping:
            return False
        self._sleep = task.deferLater(self.clock, seconds, lambda: None)  # type: ignore[arg-type]
        try:
            await self._sleep
        except defer.CancelledError:
            return False
        finally:
            self._sleep = None
        return not self._stopping

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.source.open()
                break
            except Exception as e:
                self._log_error("opening the event source failed", e)
                await self._pause(1.0)
        batch: list[StreamEntry] = []
        first_at = 0.0
        while not self._stopping:
            now = self.clock.seconds()
            wait = self.read_wait
            if batch:
                wait = max(0.0, min(wait, first_at + self.flush_interval - now))
            try:
                entries = await self.source.read(self.batch_size - len(batch), wait)
            except Exception as e:
                self._log_error("reading events failed", e)
                await self._pause(1.0)
                continue
            if batch and entries:  # pending entries re-read after an error
                held = {e.id for e in batch}
                entries = [e for e in entries if e.id not in held]
            if entries and not batch:
                first_at = self.clock.seconds()
            batch += entries
            self.stats["received"] += len(entries)
            due = batch and self.clock.seconds() - first_at >= self.flush_interval
            if len(batch) >= self.batch_size or due:
                batch = await self._deliver(batch)
        if batch:  # stopping: the batch in hand goes out (one attempt per retry budget)
            await self._deliver(batch)

    async def _deliver(self, batch: list[StreamEntry]) -> list[StreamEntry]:
        """Deliver and acknowledge; returns what is left undelivered (on stop)."""
        bad = [e for e in batch if e.event is None]
        if bad:
            self.stats["unparseable"] += len(bad)
            log.warn("skipping {count} unparseable stream entries", count=len(bad))
        pending = [e for e in batch if e.event is not None]
        if bad:
            await self._ack(bad)
        backoff = 1.0
        while pending:
            events = [e.event for e in pending if e.event is not None]
            try:
                dropped = await defer.ensureDeferred(self.sink.send(events))
            except PermanentError as e:
                delivered, refused = pending[: e.done], pending[e.done :]
                self.stats["sent"] += len(delivered)
                self.stats["dropped"] += len(refused)
                log.error(
                    "{sink} refused a batch of {count} event(s) permanently; dropped: {error}",
                    sink=self.sink.name,
                    count=len(refused),
                    error=e,
                )
                await self._ack(pending)
                return []
            except Exception as e:
                done = e.done if isinstance(e, RetryableError) else 0
                if done:
                    self.stats["sent"] += done
                    await self._ack(pending[:done])
                    pending = pending[done:]
                self._log_error(f"{self.sink.name} delivery failed; retrying in {backoff:.0f}s", e)
                if not await self._pause(backoff):
                    log.info(
                        "stopping: {count} undelivered event(s) stay pending for the next run",
                        count=len(pending),
                    )
                    return []
                backoff = min(backoff * 2, self.max_backoff)
                continue
            self.stats["dropped"] += int(dropped or 0)
            self.stats["sent"] += len(events) - int(dropped or 0)
            self.stats["batches"] += 1
            self.last_sent_at = self.clock.seconds()
            await self._ack(pending)
            self._errors.reset()
            return []
        return []

    async def _ack(self, entries: list[StreamEntry]) -> None:
        for attempt in range(5):
            try:
                await self.source.ack(entries)
                return
            except Exception as e:
                self._log_error("acknowledging delivered events failed", e)
                if attempt == 4 or not await self._pause(1.0):
                    return  # they will be delivered again: at least once

    def _log_error(self, message: str, error: BaseException) -> None:
        suppressed = self._errors.ready()
        if suppressed is not None:
            log.warn(
                "{message}: {error} ({suppressed} similar since the last message)",
                message=message,
                error=f"{type(error).__name__}: {error}",
                suppressed=suppressed,
            )
