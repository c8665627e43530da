"""The heap freeze that follows start-up: collector settings and freed memory."""

from __future__ import annotations

import gc
import platform

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.service import HeapFreezeService, release_free_memory


class HeapFreezeTests(SynchronousTestCase):
    def setUp(self) -> None:
        gc.unfreeze()  # a daemon built in this process earlier may have frozen
        thresholds = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *thresholds)
        self.addCleanup(gc.unfreeze)

    def test_freezes_after_delay(self) -> None:
        clock = Clock()
        service = HeapFreezeService(clock, delay=2.0)
        service.startService()
        clock.advance(1.9)
        self.assertEqual(gc.get_freeze_count(), 0)
        clock.advance(0.1)
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertEqual(gc.get_threshold(), (2_000, 5, 100))
        service.stopService()

    def test_stop_before_delay_cancels(self) -> None:
        clock = Clock()
        service = HeapFreezeService(clock)
        service.startService()
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_release_free_memory(self) -> None:
        """Available on glibc (Linux), a harmless no-op elsewhere."""
        released = release_free_memory()
        self.assertEqual(released, platform.libc_ver()[0] == "glibc")
