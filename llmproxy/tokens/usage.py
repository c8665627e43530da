"""
Batched usage counters for tokens without a quota: request counts, last
use and cache hits are summed in memory and written every
C{USAGE_FLUSH_INTERVAL} (or once C{USAGE_STATS_BUFFER_SIZE} events are
waiting) with one batched store call. Tokens with a quota never come
here: they are counted atomically on every request.
"""

from __future__ import annotations

import datetime
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llmproxy.store.interface import IStore

log = Logger()


class UsageFlusher(service.Service):
    """
    Public API: L{add_request}, L{add_cache_hit} (never block, never
    fail) and L{flush}. Memory is bounded: pending counts are kept per
    token, at most C{max_tokens} distinct tokens; a failed write is merged
    back and retried on the next flush. L{stopService} writes everything
    that is still pending, so a SIGTERM loses no counts.
    """

    name = "usage"

    def __init__(
        self,
        store: IStore,
        clock: IReactorTime,
        *,
        flush_interval: float = 5.0,
        buffer_size: int = 1000,
        max_tokens: int = 100_000,
    ) -> None:
        self.store = store
        self.clock = clock
        self.flush_interval = flush_interval
        self.buffer_size = max(1, buffer_size)
        self.max_tokens = max_tokens
        self.dropped = 0
        # token hash -> (requests, latest use as epoch seconds); datetimes
        # are made once per flush, not once per request
        self._requests: dict[str, tuple[int, float]] = {}
        self._hits: dict[str, int] = {}
        self._events = 0
        self._loop: LoopingCall | None = None
        self._writing: defer.Deferred[None] | None = None
        self._waiters: list[defer.Deferred[None]] = []

    # -- public API --------------------------------------------------------------------

    def add_request(self, token_hash: str, when: datetime.datetime | float | None = None) -> None:
        """
        One proxied request for an unlimited token (request_count += 1,
        last_used_at); C{when} is a datetime or epoch seconds (default now).
        """
        if when is None:
            when = self.clock.seconds()
        elif isinstance(when, datetime.datetime):
            when = when.timestamp()
        current = self._requests.get(token_hash)
        if current is None:
            if not self._room():
                return
            self._requests[token_hash] = (1, when)
        else:
            self._requests[token_hash] = (current[0] + 1, max(current[1], when))
        self._counted()

    def add_cache_hit(self, token_hash: str) -> None:
        """One response served from the cache for this token (cache_hit_count += 1)."""
        if token_hash not in self._hits:
            if not self._room():
                return
            self._hits[token_hash] = 0
        self._hits[token_hash] += 1
        self._counted()

    @property
    def pending(self) -> int:
        """Events counted but not yet written."""
        return self._events

    def flush(self) -> defer.Deferred[None]:
        """Write what is pending now (after any write already under way)."""
        return defer.ensureDeferred(self._flush())

    # -- service -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.flush_interval > 0:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self.clock
            self._loop.start(self.flush_interval, now=False)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        pending = self._events
        yield self.flush()
        if self._events:
            log.error(
                "usage flusher stopped with {count} unwritten event(s): the store failed",
                count=self._events,
            )
        else:
            log.info("usage flusher stopped; wrote {count} pending event(s)", count=pending)

    # -- internals ---------------------------------------------------------------------

    def _room(self) -> bool:
        if len(self._requests) + len(self._hits) < self.max_tokens:
            return True
        self.dropped += 1
        if self.dropped % 1000 == 1:
            log.error(
                "usage buffer full ({max} tokens pending); {dropped} event(s) dropped",
                max=self.max_tokens,
                dropped=self.dropped,
            )
        return False

    def _counted(self) -> None:
        self._events += 1
        if self._events >= self.buffer_size and self._writing is None and self.running:
            self.flush()

    def _tick(self) -> None:
        if self._writing is None and self._events:
            self.flush()

    async def _flush(self) -> None:
        while self._writing is not None:
            waiting: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(waiting)
            await waiting
        if not self._events:
            return
        requests, self._requests = self._requests, {}
        hits, self._hits = self._hits, {}
        self._events = 0
        done: defer.Deferred[None] = defer.Deferred()
        self._writing = done
        try:
            if requests:
                try:
                    await self.store.add_usage(
                        {
                            key: (n, datetime.datetime.fromtimestamp(when, datetime.UTC))
                            for key, (n, when) in requests.items()
                        }
                    )
                except Exception:
                    log.failure("writing usage counts failed; will retry")
                    self._merge_back(requests, {})
                    self._events += sum(n for n, _ in requests.values())
                    requests = {}
            if hits:
                try:
                    await self.store.add_cache_hits(hits)
                except Exception:
                    log.failure("writing cache-hit counts failed; will retry")
                    self._merge_back({}, hits)
                    self._events += sum(hits.values())
        finally:
            self._writing = None
            done.callback(None)
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                w.callback(None)

    def _merge_back(self, requests: dict[str, tuple[int, float]], hits: dict[str, int]) -> None:
        for key, (n, when) in requests.items():
            current = self._requests.get(key)
            if current is None:
                self._requests[key] = (n, when)
            else:
                self._requests[key] = (current[0] + n, max(current[1], when))
        for key, n in hits.items():
            self._hits[key] = self._hits.get(key, 0) + n
