"""The circuit breaker's counting, on a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.proxy.breaker import CircuitBreaker


class BreakerTests(SynchronousTestCase):
    def test_opens_after_threshold_and_closes_after_cooldown(self) -> None:
        clock = Clock()
        breaker = CircuitBreaker(clock, threshold=3, cooldown=10.0)
        for status in (502, 503, 504):
            self.assertTrue(breaker.allow())
            breaker.record(status)
        self.assertFalse(breaker.allow())
        clock.advance(9.9)
        self.assertFalse(breaker.allow())
        clock.advance(0.1)
        self.assertTrue(breaker.allow())
        # Closed again with a fresh count.
        breaker.record(502)
        self.assertTrue(breaker.allow())

    def test_other_statuses_reset_the_count(self) -> None:
        breaker = CircuitBreaker(Clock(), threshold=2, cooldown=10.0)
        for status in (502, 200, 502, 401, 504, 429):
            breaker.record(status)
        self.assertTrue(breaker.allow())
        breaker.record(500)  # a plain 500 is the provider's answer, not an outage
        breaker.record(502)
        breaker.record(502)
        self.assertFalse(breaker.allow())

    def test_threshold_zero_disables(self) -> None:
        breaker = CircuitBreaker(Clock(), threshold=0)
        for _ in range(100):
            breaker.record(503)
        self.assertTrue(breaker.allow())
