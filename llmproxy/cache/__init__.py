"""The HTTP response cache: rules, memory and Redis backends, and the facade the proxy calls."""

from llmproxy.cache.entry import CachedResponse
from llmproxy.cache.facade import (
    BYPASS,
    CONDITIONAL_HIT,
    HIT,
    MISS,
    REVALIDATE,
    UNCACHEABLE,
    LookupResult,
    ResponseCache,
    StorePlan,
    StreamCapture,
    disabled_headers,
)
from llmproxy.cache.interface import CacheUnavailable, ICacheBackend
from llmproxy.cache.memory import MemoryCacheBackend
from llmproxy.cache.serve import serve_cached

__all__ = [
    "BYPASS",
    "CONDITIONAL_HIT",
    "HIT",
    "MISS",
    "REVALIDATE",
    "UNCACHEABLE",
    "CacheUnavailable",
    "CachedResponse",
    "ICacheBackend",
    "LookupResult",
    "MemoryCacheBackend",
    "ResponseCache",
    "StorePlan",
    "StreamCapture",
    "disabled_headers",
    "serve_cached",
]
