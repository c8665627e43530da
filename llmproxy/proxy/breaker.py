"""
A per-provider circuit breaker: after C{threshold} consecutive 502/503/504
answers the provider is left alone for C{cooldown} seconds, and every
request is answered 503 at once without touching it.
"""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

FAILURE_STATUSES = frozenset({502, 503, 504})


@attrs.define
class CircuitBreaker:
    clock: IReactorTime
    #: Consecutive failures that open the circuit; 0 disables the breaker.
    threshold: int = 5
    cooldown: float = 30.0
    name: str = ""
    failures: int = 0
    opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allow(self) -> bool:
        """May a request go ahead? The first request after the cooldown closes the circuit."""
        if self.opened_at is None:
            return True
        if self.clock.seconds() - self.opened_at >= self.cooldown:
            log.info("circuit for {provider} closed after cooldown", provider=self.name)
            self.opened_at = None
            self.failures = 0
            return True
        return False

    def record(self, status: int) -> None:
        """Count the final status of a request that the breaker let through."""
        if self.threshold <= 0:
            return
        if status in FAILURE_STATUSES:
            self.failures += 1
            if self.opened_at is None and self.failures >= self.threshold:
                self.opened_at = self.clock.seconds()
                log.warn(
                    "circuit for {provider} opened after {failures} consecutive failures; "
                    "refusing requests for {cooldown}s",
                    provider=self.name,
                    failures=self.failures,
                    cooldown=self.cooldown,
                )
        else:
            self.failures = 0
