"""In-process fixed-window counters (one instance, or Redis fallback)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from llmproxy.ratelimit.interface import Decision, IRateLimiter, decide, fixed_window


@implementer(IRateLimiter)
class MemoryRateLimiter:
    """
    Fixed windows aligned like the Redis limiter's, so both count the same
    way. At most C{max_keys} counters are kept: finished windows are dropped
    first, then the oldest counters.
    """

    def __init__(self, clock: IReactorTime, max_keys: int = 100_000) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self._counters: dict[str, tuple[int, int]] = {}

    def check(self, key: str, limit: int, window: float) -> defer.Deferred[Decision]:
        return defer.succeed(self.count(key, limit, window))

    def count(self, key: str, limit: int, window: float) -> Decision:
        start, reset = fixed_window(self.clock.seconds(), window)
        current = self._counters.get(key)
        count = current[1] + 1 if current is not None and current[0] == start else 1
        if current is None and len(self._counters) >= self.max_keys:
            self._evict(start)
        self._counters[key] = (start, count)
        return decide(count, limit, reset)

    def _evict(self, start: int) -> None:
        for key in [k for k, (s, _) in self._counters.items() if s != start]:
            del self._counters[key]
        while len(self._counters) >= self.max_keys:
            del self._counters[next(iter(self._counters))]

    def __len__(self) -> int:
        return len(self._counters)
