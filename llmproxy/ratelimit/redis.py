"""
Fixed-window counters in Redis, shared by every instance. One EVAL does
INCR and, for a new key, EXPIRE: atomic and a single round trip, so a
crash can never leave a counter without a TTL.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from llmproxy.ratelimit.interface import Decision, IRateLimiter, decide, fixed_window
from llmproxy.redisconn import RedisOutage, call_with_timeout

log = Logger()

INCR_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return count
"""


@implementer(IRateLimiter)
class RedisRateLimiter:
    """
    Key: C{<prefix><id>:<window_start>} where C{<id>} is the caller's key,
    or the first 16 hex characters of its HMAC-SHA256 when C{key_secret} is
    set (as the Go llm-proxy). Every call has a C{timeout}; after a failure
    Redis is skipped for C{retry_interval} seconds, then tried again. While
    it is away a check uses C{fallback} (in-process counters) when given,
    else admits (C{fail_open}) or refuses with C{unavailable=True}.
    """

    def __init__(
        self,
        pool: Any,
        clock: IReactorTime,
        timeout: float = 0.25,
        fail_open: bool = True,
        fallback: IRateLimiter | None = None,
        prefix: str = "ratelimit:",
        key_secret: str = "",
        metrics: Any = None,
        retry_interval: float = 1.0,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.timeout = timeout
        self.fail_open = fail_open
        self.fallback = fallback
        self.prefix = prefix
        self._secret = key_secret.encode("utf-8")
        self.metrics = metrics
        self.outage = RedisOutage(
            clock,
            retry_interval,
            "ratelimit",
            metrics,
            down_message="rate-limit Redis unavailable ({error}); {mode} "
            "({suppressed} similar failures since the last message)",
            logger=log,
            back_message="Redis is back: rate limits are shared again",
        )

    @property
    def available(self) -> bool:
        return self.outage.available

    def redis_key(self, key: str, window_start: int) -> str:
        ident = key
        if self._secret:
            ident = hmac.new(self._secret, key.encode("utf-8"), hashlib.sha256).hexdigest()[:16]
        return f"{self.prefix}{ident}:{window_start}"

    @defer.inlineCallbacks
    def check(self, key: str, limit: int, window: float) -> Any:
        now = self.clock.seconds()
        start, reset = fixed_window(now, window)
        if self.outage.skip():
            result = yield self._degraded(key, limit, window, reset)
            return result
        ttl = max(1, math.ceil(window)) + 1  # the window plus a second, as the Go llm-proxy
        try:
            d = self.pool.eval(INCR_SCRIPT, [self.redis_key(key, start)], [ttl])
            count = yield call_with_timeout(d, self.timeout, self.clock)
            count = int(count)
        except Exception as e:
            self.outage.failed(e, mode=self._mode())
            result = yield self._degraded(key, limit, window, reset)
            return result
        self.outage.succeeded()
        return decide(count, limit, reset)

    def _mode(self) -> str:
        if self.fallback is not None:
            return "counting in process"
        return "admitting requests" if self.fail_open else "refusing requests"

    @defer.inlineCallbacks
    def _degraded(self, key: str, limit: int, window: float, reset: int) -> Any:
        if self.fallback is not None:
            self._count("fallback")
            result = yield self.fallback.check(key, limit, window)
            return result
        if self.fail_open:
            self._count("fail_open")
            return Decision(allowed=True, limit=limit, remaining=limit, reset_seconds=reset)
        self._count("fail_closed")
        retry = max(1, int(self.outage.retry_interval))
        return Decision(
            allowed=False,
            limit=limit,
            remaining=0,
            reset_seconds=reset,
            retry_after=retry,
            unavailable=True,
        )

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.ratelimit_degraded(outcome)

    def ping(self) -> defer.Deferred[Any]:
        """For C{/ready}: one PING within the timeout."""
        return call_with_timeout(self.pool.ping(), self.timeout * 4, self.clock)  # type: ignore[no-any-return]


class RedisPoolService(service.Service):
    """Owns a txredisapi pool so it is disconnected when the daemon stops."""

    def __init__(self, pool: Any, name: str = "redis-ratelimit") -> None:
        self.pool = pool
        self.name = name

    def stopService(self) -> Any:
        super().stopService()
        return self.pool.disconnect()
