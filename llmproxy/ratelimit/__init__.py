"""
Requests-per-window limits: global, per client IP and per token, counted in
process (one instance) or in Redis (every instance shares the counters).
"""

from llmproxy.ratelimit.http import (
    apply_rate_limit_headers,
    rate_limit_error,
    rate_limit_headers,
    rate_limit_refusal,
)
from llmproxy.ratelimit.interface import Decision, IRateLimiter
from llmproxy.ratelimit.memory import MemoryRateLimiter
from llmproxy.ratelimit.policy import RateLimitPolicy, build_rate_limit_policy
from llmproxy.ratelimit.redis import RedisRateLimiter

__all__ = [
    "Decision",
    "IRateLimiter",
    "MemoryRateLimiter",
    "RateLimitPolicy",
    "RedisRateLimiter",
    "apply_rate_limit_headers",
    "build_rate_limit_policy",
    "rate_limit_error",
    "rate_limit_headers",
    "rate_limit_refusal",
]
