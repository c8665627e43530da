"""
The in-process backend: an LRU bounded by entry count and total bytes
(C{HTTP_CACHE_MAX_ENTRIES}, C{HTTP_CACHE_MAX_BYTES}). Expired entries are
dropped when met; otherwise the least recently used entry goes first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from llmproxy.cache.entry import CachedResponse
from llmproxy.cache.interface import ICacheBackend
from llmproxy.cache.policy import index_method

_Slot = tuple[str, str]  # (primary, variant)


@implementer(ICacheBackend)
class MemoryCacheBackend:
    name = "memory"

    def __init__(self, clock: IReactorTime, max_entries: int, max_bytes: int) -> None:
        self.clock = clock
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[_Slot, CachedResponse] = OrderedDict()
        self._by_primary: dict[str, set[str]] = {}
        self._by_url: dict[tuple[str, str], set[_Slot]] = {}
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, primary: str) -> defer.Deferred[list[CachedResponse]]:
        now = self.clock.seconds()
        found = []
        for variant in list(self._by_primary.get(primary, ())):
            slot = (primary, variant)
            entry = self._entries[slot]
            if not entry.fresh(now):
                self._remove(slot)
                continue
            self._entries.move_to_end(slot)
            found.append(entry)
        return defer.succeed(found)

    def put(self, entry: CachedResponse, now: float) -> defer.Deferred[bool]:
        if not entry.fresh(now) or entry.size > self.max_bytes:
            return defer.succeed(False)
        slot = (entry.primary, entry.variant)
        if slot in self._entries:
            self._remove(slot)
        self._entries[slot] = entry
        self.bytes += entry.size
        self._by_primary.setdefault(entry.primary, set()).add(entry.variant)
        self._by_url.setdefault((index_method(entry.method), entry.url), set()).add(slot)
        self._make_room(now)
        return defer.succeed(slot in self._entries)

    def purge(self, method: str, url: str) -> defer.Deferred[int]:
        slots = self._by_url.get((index_method(method.upper()), url), set())
        return defer.succeed(self._remove_all(list(slots)))

    def purge_prefix(self, prefix: str) -> defer.Deferred[int]:
        slots = [
            s for (_, url), group in self._by_url.items() if url.startswith(prefix) for s in group
        ]
        return defer.succeed(self._remove_all(slots))

    def ping(self) -> defer.Deferred[Any]:
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    # -- internals -------------------------------------------------------------

    def _remove_all(self, slots: list[_Slot]) -> int:
        now = self.clock.seconds()
        removed = 0
        for slot in slots:
            entry = self._entries.get(slot)
            if entry is not None:
                removed += 1 if entry.fresh(now) else 0
                self._remove(slot)
        return removed

    def _make_room(self, now: float) -> None:
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            slot = next(iter(self._entries))
            self._remove(slot)
            self.evictions += 1

    def _remove(self, slot: _Slot) -> None:
        entry = self._entries.pop(slot, None)
        if entry is None:
            return
        self.bytes -= entry.size
        primary, variant = slot
        variants = self._by_primary.get(primary)
        if variants is not None:
            variants.discard(variant)
            if not variants:
                del self._by_primary[primary]
        key = (index_method(entry.method), entry.url)
        group = self._by_url.get(key)
        if group is not None:
            group.discard(slot)
            if not group:
                del self._by_url[key]
