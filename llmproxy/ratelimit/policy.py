"""Which limits apply to a proxied request, from L{Config}."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import defer

from llmproxy.ratelimit.interface import IRateLimiter


@attrs.define
class RateLimitPolicy:
    """
    Checks the global, per-IP and per-token limits (0 = off) in one window
    and returns the decision that matters: the refusal with the longest wait
    when any limit is exceeded, otherwise the one with the fewest requests
    remaining (its numbers go into the C{RateLimit-*} headers).
    """

    limiter: IRateLimiter
    window: float = 60.0
    global_limit: int = 0
    ip_limit: int = 0
    token_limit: int = 0
    metrics: Any = None

    @property
    def enabled(self) -> bool:
        return bool(self.global_limit or self.ip_limit or self.token_limit)

    @defer.inlineCallbacks
    def check(self, client_ip: str = "", token_id: str | None = None) -> Any:
        """
        Count this request against every applicable limit.

        @return: Deferred firing with a L{Decision}, or None when no limit
            applies to this request. It never fails.
        """
        checks: list[tuple[str, str, int]] = []
        if self.global_limit:
            checks.append(("global", "global", self.global_limit))
        if self.ip_limit and client_ip:
            checks.append(("ip", "ip:" + client_ip, self.ip_limit))
        if self.token_limit and token_id:
            checks.append(("token", "token:" + token_id, self.token_limit))
        if not checks:
            return None
        results = yield defer.gatherResults(
            [self.limiter.check(key, limit, self.window) for _, key, limit in checks],
            consumeErrors=True,
        )
        decisions = [
            attrs.evolve(d, scope=scope) for (scope, _, _), d in zip(checks, results, strict=True)
        ]
        refused = [d for d in decisions if not d.allowed]
        if refused:
            chosen = max(refused, key=lambda d: (d.retry_after or 0, not d.unavailable))
            if self.metrics is not None and not chosen.unavailable:
                self.metrics.ratelimit_rejected(chosen.scope)
            return chosen
        return min(decisions, key=lambda d: (d.remaining, -d.reset_seconds))


def build_rate_limit_policy(
    config: Any, clock: Any, metrics: Any = None, redis_pool: Any = None
) -> RateLimitPolicy | None:
    """
    The policy for C{config}, or None when no limit is configured. With
    C{DISTRIBUTED_RATE_LIMIT_ENABLED} the counters live in Redis
    (C{redis_pool} must be given), falling back to in-process counters
    when C{DISTRIBUTED_RATE_LIMIT_FALLBACK} is on.
    """
    from llmproxy.ratelimit.memory import MemoryRateLimiter
    from llmproxy.ratelimit.redis import RedisRateLimiter

    token_limit = config.token_rate_limit
    if not token_limit and config.distributed_rate_limit_enabled:
        token_limit = config.distributed_rate_limit_max
    if not (config.global_rate_limit or config.ip_rate_limit or token_limit):
        return None
    limiter: IRateLimiter = MemoryRateLimiter(clock)
    if config.distributed_rate_limit_enabled:
        if redis_pool is None:
            raise ValueError("a Redis pool is required for distributed rate limiting")
        limiter = RedisRateLimiter(
            redis_pool,
            clock,
            fail_open=config.rate_limit_fail_open,
            fallback=limiter if config.distributed_rate_limit_fallback else None,
            prefix=config.distributed_rate_limit_prefix,
            key_secret=config.distributed_rate_limit_key_secret,
            metrics=metrics,
        )
    return RateLimitPolicy(
        limiter=limiter,
        window=config.distributed_rate_limit_window,
        global_limit=config.global_rate_limit,
        ip_limit=config.ip_rate_limit,
        token_limit=token_limit,
        metrics=metrics,
    )
