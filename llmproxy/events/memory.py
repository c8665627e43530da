"""The in-process event bus: a bounded queue fanned out to subscribers."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from llmproxy.events.bus import IEventBus
from llmproxy.logthrottle import LogThrottle

log = Logger()

Subscriber = Callable[[dict[str, Any]], Any]


@implementer(IEventBus)
class MemoryEventBus:
    """
    C{publish} appends to a queue of at most C{capacity} events (beyond
    that the event is dropped and counted); the queue is handed to every
    subscriber on the next reactor turn, so publishing never runs a
    subscriber inside the proxy's response path. Without subscribers
    nothing is queued.
    """

    def __init__(self, clock: IReactorTime, capacity: int = 1000, metrics: Any = None) -> None:
        self.clock = clock
        self.capacity = capacity
        self.metrics = metrics
        self.published = 0
        self.dropped = 0
        self.delivered = 0
        self._queue: deque[dict[str, Any]] = deque()
        self._subscribers: list[Subscriber] = []
        self._call: IDelayedCall | None = None
        self._throttle = LogThrottle(clock, 60.0)
        self._stopped = False

    @property
    def listening(self) -> bool:
        """Whether anyone receives events (without subscribers, building one is wasted)."""
        return bool(self._subscribers)

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Receive every later event; returns a function that unsubscribes."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def publish(self, event: dict[str, Any]) -> None:
        if not self._subscribers:
            self.published += 1
            self._count_published()
            return
        if len(self._queue) >= self.capacity:
            self.dropped += 1
            if self.metrics is not None:
                self.metrics.event_dropped("buffer_full")
            suppressed = self._throttle.ready()
            if suppressed is not None:
                log.warn(
                    "event buffer full ({capacity}); event dropped "
                    "({suppressed} more dropped since the last message)",
                    capacity=self.capacity,
                    suppressed=suppressed,
                )
            return
        self._queue.append(event)
        self.published += 1
        self._count_published()
        if self._call is None and not self._stopped:
            self._call = self.clock.callLater(0, self._deliver)

    def _count_published(self) -> None:
        if self.metrics is not None:
            self.metrics.event_published()

    def _deliver(self) -> None:
        self._call = None
        queue, self._queue = self._queue, deque()
        for event in queue:
            for subscriber in list(self._subscribers):
                try:
                    subscriber(event)
                except Exception:
                    log.failure("event subscriber {subscriber!r} failed", subscriber=subscriber)
            self.delivered += 1

    def start(self) -> None:
        self._stopped = False

    def stop(self) -> None:
        """Hand what is queued to the subscribers now."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._deliver()

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "in-memory",
            "published": self.published,
            "dropped": self.dropped,
            "delivered": self.delivered,
            "queued": len(self._queue),
        }
