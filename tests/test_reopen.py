"""SIGHUP's log file reopening, file by file (the daemon test is in test_e2e_proxy)."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.events.filelog import FileEventLog
from llmproxy.reopen import LogFiles, ReopenableFile
from llmproxy.web.site import AccessLog


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


class ReopenableFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "x.log")

    def test_buffered_lines_go_to_the_moved_file(self) -> None:
        f = ReopenableFile(self.path, "a", encoding="utf-8", buffering=65536)
        f.write("one\n")
        os.rename(self.path, self.path + ".1")
        f.reopen()
        f.write("two\n")
        f.close()
        self.assertEqual((read(self.path + ".1"), read(self.path)), ("one\n", "two\n"))

    def test_a_path_that_cannot_be_opened_keeps_the_old_file(self) -> None:
        f = ReopenableFile(self.path, "a", encoding="utf-8")
        os.rename(self.path, self.path + ".1")
        os.mkdir(self.path)  # the path is now a directory: it cannot be opened as a file
        files = LogFiles()
        files.add("X_LOG", f.reopen)
        files.reopen()
        self.assertEqual(len(self.flushLoggedErrors(IsADirectoryError)), 1)
        f.write("still here\n")
        f.close()
        self.assertEqual(read(self.path + ".1"), "still here\n")

    def test_access_log_writes_what_it_holds_first(self) -> None:
        stream = ReopenableFile(self.path, "a", encoding="utf-8")
        self.addCleanup(stream.close)
        log = AccessLog(stream, "text")
        self.assertTrue(log.to_file)
        log._lines.append("held\n")
        os.rename(self.path, self.path + ".1")
        log.reopen()
        self.assertEqual((read(self.path + ".1"), read(self.path)), ("held\n", ""))

    def test_event_log_writes_what_is_pending_first(self) -> None:
        events = FileEventLog(self.path, Clock())
        events.open()
        events({"n": 1})
        os.rename(self.path, self.path + ".1")
        events.reopen()
        events({"n": 2})
        events.close()
        self.assertEqual((read(self.path + ".1"), read(self.path)), ('{"n":1}\n', '{"n":2}\n'))
