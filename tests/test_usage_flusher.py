"""UsageFlusher: batched request counts and cache hits, nothing lost on stop."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.store.memory import MemoryStore
from llmproxy.store.records import Token
from llmproxy.tokens.usage import UsageFlusher

T0 = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.UTC)


class FlakyStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.fail = False
        self.batches: list[dict[str, tuple[int, datetime.datetime]]] = []
        self.hold: defer.Deferred[None] | None = None

    def add_usage(
        self, counts: Mapping[str, tuple[int, datetime.datetime]]
    ) -> defer.Deferred[None]:
        if self.fail:
            return defer.fail(ConnectionError("database down"))
        self.batches.append(dict(counts))
        d = super().add_usage(counts)
        if self.hold is not None:
            hold = self.hold
            return hold.addCallback(lambda _: d)
        return d


class FlusherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0.timestamp())
        self.store = FlakyStore()
        self.hashes = []
        for i in range(3):
            token = Token(
                id=str(uuid.uuid4()),
                token_hash=f"{i:064x}",
                display="sk-x",
                project_id="p",
                is_active=True,
                created_at=T0,
            )
            self.store.tokens[token.id] = token
            self.hashes.append(token.token_hash)
        self.flusher = UsageFlusher(self.store, self.clock, flush_interval=5.0, buffer_size=100)

    def stored(self, i: int) -> Token:
        return next(t for t in self.store.tokens.values() if t.token_hash == self.hashes[i])

    def test_counts_are_summed_and_written_every_interval(self) -> None:
        self.flusher.startService()
        for _ in range(4):
            self.flusher.add_request(self.hashes[0])
        self.clock.advance(1)
        self.flusher.add_request(self.hashes[1])
        self.assertEqual(self.stored(0).request_count, 0)
        self.clock.advance(4)
        self.assertEqual(len(self.store.batches), 1)
        self.assertEqual(self.stored(0).request_count, 4)
        self.assertEqual(self.stored(1).request_count, 1)
        self.assertEqual(self.stored(0).last_used_at, T0)
        self.assertEqual(self.stored(1).last_used_at, T0 + datetime.timedelta(seconds=1))
        self.successResultOf(defer.maybeDeferred(self.flusher.stopService))

    def test_buffer_size_forces_a_flush(self) -> None:
        self.flusher.startService()
        for _ in range(100):
            self.flusher.add_request(self.hashes[2])
        self.assertEqual(self.stored(2).request_count, 100)
        self.assertEqual(self.flusher.pending, 0)
        self.successResultOf(defer.maybeDeferred(self.flusher.stopService))

    def test_stop_writes_everything_pending(self) -> None:
        self.flusher.startService()
        self.flusher.add_request(self.hashes[0])
        self.flusher.add_cache_hit(self.hashes[0])
        self.flusher.add_cache_hit(self.hashes[0])
        self.successResultOf(defer.maybeDeferred(self.flusher.stopService))
        self.assertEqual(self.stored(0).request_count, 1)
        self.assertEqual(self.stored(0).cache_hit_count, 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_waits_for_a_write_in_progress(self) -> None:
        self.flusher.startService()
        self.store.hold = defer.Deferred()
        self.flusher.add_request(self.hashes[0])
        self.clock.advance(5)  # a write starts and hangs
        self.flusher.add_request(self.hashes[0])
        stopped = defer.maybeDeferred(self.flusher.stopService)
        self.assertNoResult(stopped)
        hold, self.store.hold = self.store.hold, None
        hold.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.stored(0).request_count, 2)

    def test_failed_write_is_retried(self) -> None:
        self.flusher.startService()
        self.store.fail = True
        self.flusher.add_request(self.hashes[0])
        self.clock.advance(5)
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.assertEqual(self.flusher.pending, 1)
        self.store.fail = False
        self.flusher.add_request(self.hashes[0])
        self.clock.advance(5)
        self.assertEqual(self.stored(0).request_count, 2)
        self.successResultOf(defer.maybeDeferred(self.flusher.stopService))

    def test_memory_is_bounded(self) -> None:
        flusher = UsageFlusher(self.store, self.clock, flush_interval=5.0, max_tokens=2)
        flusher.add_request("a" * 64)
        flusher.add_request("b" * 64)
        flusher.add_request("c" * 64)  # a third distinct token does not fit
        flusher.add_request("a" * 64)  # known tokens still count
        self.assertEqual(flusher.pending, 3)
        self.assertEqual(flusher.dropped, 1)
