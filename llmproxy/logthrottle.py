"""
One log line per interval for conditions that repeat on every request (Redis
down, a full buffer): the first occurrence is logged at once, later ones are
counted and reported with the next line.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


class LogThrottle:
    def __init__(self, clock: IReactorTime, interval: float = 60.0) -> None:
        self.clock = clock
        self.interval = interval
        self._next = 0.0
        self.suppressed = 0

    def ready(self) -> int | None:
        """
        None when this occurrence should stay quiet; otherwise how many were
        suppressed since the last line (the counter restarts).
        """
        now = self.clock.seconds()
        if now < self._next:
            self.suppressed += 1
            return None
        self._next = now + self.interval
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed

    def reset(self) -> None:
        """The condition ended: log the next occurrence at once."""
        self._next = 0.0
        self.suppressed = 0
