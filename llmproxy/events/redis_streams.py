"""
Redis Streams event bus, both sides.

Publishing (the proxy): L{RedisStreamsEventBus} queues events in memory
(bounded) and sends them with C{XADD ... MAXLEN ~ N}. While Redis is away
the proxy keeps serving: events wait in the queue, a PING probes Redis with
backoff, and the queue is flushed once it answers. Overflow is counted and
logged, never silent; C{/ready} reports the outage.

Consuming (the dispatcher): L{RedisStreamConsumer} reads through a consumer
group on a connection of its own (a blocking C{XREADGROUP} would stall every
other command on a shared txredisapi pool), re-reads its own pending
entries first, and claims entries left pending by dead consumers.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from llmproxy.events.bus import IEventBus
from llmproxy.logthrottle import LogThrottle
from llmproxy.redisconn import call_with_timeout

log = Logger()


def pool_connected(pool: Any) -> bool:
    """Whether a txredisapi pool holds a live connection right now."""
    connections = getattr(getattr(pool, "_factory", None), "pool", None)
    return True if connections is None else len(connections) > 0


class EventBusUnavailable(Exception):
    """Redis cannot take events right now (they are buffered)."""


@implementer(IEventBus)
class RedisStreamsEventBus:
    """
    @param pool: a txredisapi pool (L{llmproxy.redisconn.connect}) of one
        connection, so events reach the stream in publish order; the bus
        disconnects it on stop.
    @param capacity: events held while Redis is slow or away.
    """

    def __init__(
        self,
        pool: Any,
        clock: IReactorTime,
        stream_key: str,
        *,
        max_len: int = 10000,
        capacity: int = 1000,
        timeout: float = 1.0,
        batch: int = 100,
        retry_initial: float = 0.5,
        retry_max: float = 5.0,
        stop_timeout: float = 5.0,
        metrics: Any = None,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.stream_key = stream_key
        self.max_len = max_len
        self.capacity = capacity
        self.timeout = timeout
        self.batch = batch
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.stop_timeout = stop_timeout
        self.metrics = metrics
        self.published = 0
        self.dropped = 0
        self.sent = 0
        self.available = True
        self._queue: deque[dict[str, Any]] = deque()
        self._sending = False
        self._call: IDelayedCall | None = None
        self._backoff = retry_initial
        self._stopping = False
        self._stopped: defer.Deferred[None] | None = None
        self._inflight = 0
        self._idle: list[defer.Deferred[None]] = []
        self._full_log = LogThrottle(clock, 60.0)
        self._down_log = LogThrottle(clock, 60.0)

    # -- publishing ---------------------------------------------------------------------

    def publish(self, event: dict[str, Any]) -> None:
        if self.queued >= self.capacity:
            self._drop(1, "buffer_full")
            suppressed = self._full_log.ready()
            if suppressed is not None:
                log.warn(
                    "event buffer full ({capacity} waiting for Redis); event dropped "
                    "({suppressed} more dropped since the last message)",
                    capacity=self.capacity,
                    suppressed=suppressed,
                )
            return
        self._queue.append(event)
        self.published += 1
        if self.metrics is not None:
            self.metrics.event_published()
        self._kick()

    listening = True

    @property
    def queued(self) -> int:
        """Events not yet in Redis (waiting, or being sent)."""
        return len(self._queue) + self._inflight

    def _drop(self, count: int, reason: str) -> None:
        self.dropped += count
        if self.metrics is not None:
            self.metrics.event_dropped(reason, count)

    def _kick(self, delay: float = 0.0) -> None:
        if self._sending or self._call is not None:
            return
        self._call = self.clock.callLater(delay, self._run)

    def _run(self) -> None:
        self._call = None
        self._sending = True
        d = defer.ensureDeferred(self._send_all())
        d.addErrback(lambda f: log.failure("event bus sender failed", f))
        d.addBoth(self._sent)

    def _sent(self, _: Any) -> None:
        self._sending = False
        if not self._queue:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)
        elif self.available:
            self._kick()
        else:
            self._kick(self._backoff)
            self._backoff = min(self._backoff * 2, self.retry_max)

    async def _send_all(self) -> None:
        if not self.available or not pool_connected(self.pool):
            # txredisapi queues commands while it has no connection and sends
            # them when Redis returns: an XADD that timed out here would then
            # be written twice. Only a PING waits for the connection.
            try:
                await call_with_timeout(self.pool.ping(), self.timeout, self.clock)
            except Exception as e:
                self._down(e)
                return
            if not self.available:
                self._back()
        while self._queue:
            events = [self._queue.popleft() for _ in range(min(self.batch, len(self._queue)))]
            self._inflight = len(events)
            try:
                results = await defer.DeferredList(
                    [self._xadd(event) for event in events], consumeErrors=True
                )
            finally:
                self._inflight = 0
            failed = [event for event, (ok, _) in zip(events, results, strict=True) if not ok]
            self.sent += len(events) - len(failed)
            if failed:
                self._queue.extendleft(reversed(failed))
                error = next(r for ok, r in results if not ok)
                self._down(error)
                return

    def _xadd(self, event: dict[str, Any]) -> Any:
        try:
            data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError):
            log.failure("event not serialisable; dropped")
            self._drop(1, "invalid")
            return defer.succeed(None)
        args: list[Any] = ["XADD", self.stream_key]
        if self.max_len > 0:
            args += ["MAXLEN", "~", self.max_len]
        args += ["*", "data", data]
        return call_with_timeout(self.pool.execute_command(*args), self.timeout, self.clock)

    def _down(self, failure: BaseException | Any) -> None:
        if self.available:
            self._backoff = self.retry_initial
        self.available = False
        if self.metrics is not None:
            self.metrics.redis_error("events")
        suppressed = self._down_log.ready()
        if suppressed is not None:
            log.warn(
                "event bus Redis unavailable ({error}); {queued} event(s) buffered, retrying",
                error=getattr(failure, "getErrorMessage", lambda: repr(failure))(),
                queued=self.queued,
            )

    def _back(self) -> None:
        self.available = True
        self._backoff = self.retry_initial
        self._down_log.reset()
        log.info(
            "event bus Redis is back; sending {queued} buffered event(s)", queued=len(self._queue)
        )

    # -- readiness and lifecycle ------------------------------------------------------------

    def ping(self) -> defer.Deferred[None]:
        """For C{/ready} ("redis-event-bus"): fails while Redis does not answer."""

        def failed(failure: Any) -> None:
            raise EventBusUnavailable(
                f"Redis not answering ({type(failure.value).__name__}); "
                f"{self.queued} event(s) buffered"
            )

        d = call_with_timeout(self.pool.ping(), self.timeout, self.clock)
        d.addCallbacks(lambda _: None, failed)
        return d  # type: ignore[no-any-return]

    def start(self) -> None:
        self._stopping = False

    async def _drained(self) -> None:
        if not self._queue:
            return
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idle.append(waiter)
        if self._call is not None and self._call.active():
            self._call.reset(0)
        elif not self._sending:
            self._kick()
        await waiter

    def stop(self) -> defer.Deferred[None]:
        """Send what is queued (for at most C{stop_timeout} s), then disconnect."""
        if self._stopped is not None:
            return self._stopped
        self._stopping = True

        async def stop() -> None:
            if self._queue:
                d = defer.ensureDeferred(self._drained())
                d.addTimeout(self.stop_timeout, self.clock)  # type: ignore[arg-type]
                try:
                    await d
                except defer.TimeoutError:
                    pass
            if self._call is not None and self._call.active():
                self._call.cancel()
                self._call = None
            if self._queue:
                lost = len(self._queue)
                self._queue.clear()
                self._drop(lost, "shutdown")
                log.error(
                    "event bus stopped with Redis unavailable: {count} event(s) lost",
                    count=lost,
                )
            disconnect = getattr(self.pool, "disconnect", None)
            if disconnect is not None:
                try:
                    await defer.maybeDeferred(disconnect)
                except Exception:
                    pass

        self._stopped = defer.ensureDeferred(stop())
        return self._stopped

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "redis-streams",
            "published": self.published,
            "dropped": self.dropped,
            "sent": self.sent,
            "queued": self.queued,
            "redis_available": self.available,
        }


# -- consumer side ---------------------------------------------------------------------------


@attrs.frozen
class StreamEntry:
    """One stream message; C{event} is None when it could not be parsed."""

    id: str
    event: dict[str, Any] | None


def _fields_event(fields: Any) -> dict[str, Any] | None:
    if not isinstance(fields, list):
        return None
    values = dict(zip(fields[0::2], fields[1::2], strict=False))
    data = values.get("data")
    if not isinstance(data, str | bytes):
        return None
    try:
        event = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) else None


def parse_entries(reply: Any) -> list[StreamEntry]:
    """C{[[id, [field, value, ...]], ...]} (deleted entries have no fields)."""
    entries = []
    for item in reply or []:
        if not isinstance(item, list) or not item:
            continue
        entries.append(StreamEntry(str(item[0]), _fields_event(item[1] if len(item) > 1 else None)))
    return entries


def parse_read_reply(reply: Any) -> list[StreamEntry]:
    """An XREADGROUP reply: C{[[key, entries]]}, or None on a block timeout."""
    entries: list[StreamEntry] = []
    for stream in reply or []:
        if isinstance(stream, list) and len(stream) > 1:
            entries += parse_entries(stream[1])
    return entries


def _is_busygroup(error: BaseException) -> bool:
    return "BUSYGROUP" in str(error)


class RedisStreamConsumer:
    """
    Reads a stream through a consumer group. C{reader} must be a
    connection of its own (blocking reads); C{pool} carries the other
    commands. Nothing is acknowledged here until L{ack} is called, so an
    entry read but never acked is read again (by this consumer after a
    restart, or claimed by another after C{claim_time}).
    """

    def __init__(
        self,
        reader: Any,
        pool: Any,
        clock: IReactorTime,
        stream_key: str,
        group: str,
        consumer: str,
        *,
        claim_time: float = 30.0,
        timeout: float = 2.0,
    ) -> None:
        self.reader = reader
        self.pool = pool
        self.clock = clock
        self.stream_key = stream_key
        self.group = group
        self.consumer = consumer
        self.claim_time = claim_time
        self.timeout = timeout
        self.claimed = 0
        self._cursor: str | None = "0"  # own pending entries first

    def _call(self, conn: Any, *args: Any, timeout: float | None = None) -> Any:
        return call_with_timeout(
            conn.execute_command(*args), self.timeout if timeout is None else timeout, self.clock
        )

    async def ensure_group(self) -> None:
        """C{XGROUP CREATE <key> <group> 0 MKSTREAM}; an existing group is fine."""
        try:
            await self._call(
                self.pool, "XGROUP", "CREATE", self.stream_key, self.group, "0", "MKSTREAM"
            )
        except Exception as e:
            if not _is_busygroup(e):
                raise

    async def read(self, count: int, block: float) -> list[StreamEntry]:
        """
        Up to C{count} entries: this consumer's own pending ones while any
        are left, then new ones (waiting up to C{block} seconds), then,
        when none came, entries idle longer than C{claim_time} elsewhere.

        After a failure the next call starts again from this consumer's
        pending entries: a read that timed out here may still have been
        executed by Redis, handing entries to this consumer that it never saw.
        A missing group (Redis restarted empty) is created again.
        """
        try:
            return await self._read(count, block)
        except Exception as e:
            self._cursor = "0"
            if "NOGROUP" not in str(e):
                raise
        # The stream or group vanished (a Redis restarted without persistence).
        log.warn("consumer group {group} is missing; creating it again", group=self.group)
        await self.ensure_group()
        return await self._read(count, block)

    async def _read(self, count: int, block: float) -> list[StreamEntry]:
        if not pool_connected(self.reader):
            # txredisapi would queue the read and run it once Redis is back,
            # long after we gave up on it: wait for the connection with a PING.
            await self._call(self.reader, "PING")
        if self._cursor is not None:
            reply = await self._call(
                self.reader,
                "XREADGROUP", "GROUP", self.group, self.consumer,
                "COUNT", count, "STREAMS", self.stream_key, self._cursor,
            )  # fmt: skip
            entries = parse_read_reply(reply)
            if entries:
                self._cursor = entries[-1].id
                return entries
            self._cursor = None
        block_ms = max(1, int(block * 1000))
        reply = await self._call(
            self.reader,
            "XREADGROUP", "GROUP", self.group, self.consumer,
            "COUNT", count, "BLOCK", block_ms, "STREAMS", self.stream_key, ">",
            timeout=block + self.timeout,
        )  # fmt: skip
        entries = parse_read_reply(reply)
        if entries:
            return entries
        return await self.claim(count)

    async def claim(self, count: int) -> list[StreamEntry]:
        """Take over entries that other consumers left pending too long."""
        min_idle = int(self.claim_time * 1000)
        pending = await self._call(
            self.pool, "XPENDING", self.stream_key, self.group, "-", "+", count
        )
        ids = []
        for item in pending or []:
            if not isinstance(item, list) or len(item) < 3:
                continue
            entry_id, owner, idle = item[0], item[1], item[2]
            if str(owner) != self.consumer and int(idle) >= min_idle:
                ids.append(str(entry_id))
        if not ids:
            return []
        reply = await self._call(
            self.pool, "XCLAIM", self.stream_key, self.group, self.consumer, min_idle, *ids
        )
        entries = parse_entries(reply)
        claimed_ids = {e.id for e in entries}
        # Entries trimmed from the stream come back empty: acknowledge them away.
        gone = [i for i in ids if i not in claimed_ids]
        if gone:
            await self.ack(gone)
        if entries:
            self.claimed += len(entries)
            log.info(
                "claimed {count} event(s) left pending by another consumer", count=len(entries)
            )
        return entries

    async def ack(self, ids: list[str]) -> None:
        if ids:
            await self._call(self.pool, "XACK", self.stream_key, self.group, *ids)

    async def leave(self) -> bool:
        """
        On a clean stop: remove this consumer from the group when it holds
        no pending entries (generated names would otherwise pile up there).
        """
        mine = await self._call(
            self.pool, "XPENDING", self.stream_key, self.group, "-", "+", 1, self.consumer
        )
        if mine:
            return False
        await self._call(
            self.pool, "XGROUP", "DELCONSUMER", self.stream_key, self.group, self.consumer
        )
        return True

    async def lag(self) -> dict[str, int]:
        """Pending count (XPENDING) and stream length (XLEN), for health."""
        summary = await self._call(self.pool, "XPENDING", self.stream_key, self.group)
        length = await self._call(self.pool, "XLEN", self.stream_key)
        pending = int(summary[0]) if isinstance(summary, list) and summary else 0
        return {"pending": pending, "length": int(length or 0)}


async def sleep(clock: IReactorTime, seconds: float) -> None:
    await task.deferLater(clock, seconds, lambda: None)  # type: ignore[arg-type]
