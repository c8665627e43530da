"""The rate-limiter seam and the decision every limiter returns."""

from __future__ import annotations

import math

import attrs
from twisted.internet import defer
from zope.interface import Interface


@attrs.frozen
class Decision:
    """
    The outcome of one check.

    @ivar reset_seconds: whole seconds until the current window ends.
    @ivar retry_after: whole seconds to wait, set only when not allowed.
    @ivar scope: which limit this is (C{global}, C{ip}, C{token}).
    @ivar unavailable: the counter store could not be asked and the limiter
        is configured to fail closed (answered with 503, not 429).
    """

    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int
    retry_after: int | None = None
    scope: str = ""
    unavailable: bool = False


def fixed_window(now: float, window: float) -> tuple[int, int]:
    """C{(window_start, seconds_until_reset)} for a window aligned to the epoch."""
    length = max(1, math.ceil(window))
    start = int(now // length) * length
    reset = max(1, math.ceil(start + length - now))
    return start, reset


def decide(count: int, limit: int, reset: int) -> Decision:
    """The decision for the C{count}-th request of a window allowing C{limit}."""
    allowed = count <= limit
    return Decision(
        allowed=allowed,
        limit=limit,
        remaining=max(0, limit - count),
        reset_seconds=reset,
        retry_after=None if allowed else reset,
    )


class IRateLimiter(Interface):
    def check(key: str, limit: int, window: float) -> defer.Deferred[Decision]:
        """
        Count one request for C{key} in the current fixed window of
        C{window} seconds and say whether it stays within C{limit}. Never
        fails: a store outage is turned into a decision.
        """
