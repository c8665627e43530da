"""
C{FILE_EVENT_LOG}: every event as one JSON line in a file, written by the
daemon itself (no dispatcher needed).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llmproxy.reopen import ReopenableFile

log = Logger()


def event_line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


class FileEventLog:
    """
    Appends events to C{path}. Lines are buffered and written once a
    second (cheap appends on the reactor thread), and on L{close}, which
    also fsyncs.
    """

    def __init__(self, path: str, clock: IReactorTime, interval: float = 1.0) -> None:
        self.path = path
        self.clock = clock
        self.interval = interval
        self.written = 0
        self._pending: list[bytes] = []
        self._file: ReopenableFile | None = None
        self._loop: LoopingCall | None = None

    def open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._file = ReopenableFile(self.path, "ab")
        self._loop = LoopingCall(self.flush)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def __call__(self, event: dict[str, Any]) -> None:
        """A bus subscriber."""
        try:
            self._pending.append(event_line(event))
        except (TypeError, ValueError):
            log.failure("event not serialisable; not written to {path}", path=self.path)

    def flush(self) -> None:
        if not self._pending or self._file is None:
            return
        lines, self._pending = self._pending, []
        try:
            self._file.write(b"".join(lines))
            self._file.flush()
            self.written += len(lines)
        except OSError as e:
            log.error(
                "writing {count} event(s) to {path} failed: {error}",
                count=len(lines),
                path=self.path,
                error=e,
            )

    def reopen(self) -> None:
        """Write what is pending to the old file, then go on in a new one (SIGHUP)."""
        if self._file is None:
            return
        self.flush()
        self._file.reopen()

    def close(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.flush()
        if self._file is not None:
            try:
                os.fsync(self._file.fileno())
            except OSError:
                pass
            self._file.close()
            self._file = None
