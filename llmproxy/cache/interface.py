"""
The seam between the cache rules and where entries live: an in-process LRU
(L{llmproxy.cache.memory}) or Redis (L{llmproxy.cache.redis}). Both keep an
index from method and URL to entries, so purges remove what they say.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from llmproxy.cache.entry import CachedResponse


class CacheUnavailable(Exception):
    """The backend could not answer in time; the caller treats it as a miss."""


class ICacheBackend(Interface):
    name = Attribute("Short backend name for logs and /ready: memory | redis.")

    def get(primary: str) -> Deferred[list[CachedResponse]]:
        """
        Every unexpired variant stored under C{primary} (empty when none).
        Fails with L{CacheUnavailable} when the backend is away.
        """

    def put(entry: CachedResponse, now: float) -> Deferred[bool]:
        """
        Store C{entry} until C{entry.expires_at}, replacing the variant with
        the same C{variant} id. False when it was refused (too large, already
        expired); fails with L{CacheUnavailable} when the backend is away.
        """

    def purge(method: str, url: str) -> Deferred[int]:
        """Remove every entry for C{method} and normalised C{url}: all bodies, scopes, variants."""

    def purge_prefix(prefix: str) -> Deferred[int]:
        """Remove every entry whose normalised URL starts with C{prefix} (any method)."""

    def ping() -> Deferred[Any]:
        """Fires when the backend answers (for C{/ready})."""

    def close() -> Deferred[None]:
        """Release connections."""
