"""
SIGHUP reopens the daemon's log files (C{LOG_FILE}, C{ACCESS_LOG},
C{AUDIT_LOG_FILE}, C{FILE_EVENT_LOG}), as logrotate's C{postrotate} and
systemd's C{ExecReload} expect of a daemon. Without a handler the signal
would end the process on the spot: streams cut, queued usage counts and
audit events lost.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class ReopenableFile:
    """
    A file opened for appending, which L{reopen} closes and opens again at
    its path (a new file once logrotate has moved the old one away).
    Writers use it as the file itself.
    """

    def __init__(self, path: str, mode: str = "a", **kwargs: Any) -> None:
        self.path = path
        self._mode = mode
        self._kwargs = kwargs
        self._file: IO[Any] = open(path, mode, **kwargs)

    def write(self, data: Any) -> int:
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()

    def reopen(self) -> None:
        """
        What is buffered goes to the old file; later writes to a new one.
        If the path cannot be opened, writing goes on to the old file.
        """
        self._file.flush()
        new = open(self.path, self._mode, **self._kwargs)
        old, self._file = self._file, new
        old.close()


class LogFiles:
    """The daemon's log files, reopened together by L{reopen}."""

    def __init__(self) -> None:
        self._reopeners: list[tuple[str, Callable[[], Any]]] = []

    def add(self, what: str, reopen: Callable[[], Any]) -> None:
        self._reopeners.append((what, reopen))

    def reopen(self) -> None:
        for what, reopen in self._reopeners:
            try:
                result = reopen()
            except Exception:
                log.failure(_FAILED, what=what)
                continue
            if isinstance(result, Deferred):  # the audit file closes in its own thread
                result.addErrback(_log_failure, what)
        log.info("SIGHUP: reopened {count} log file(s)", count=len(self._reopeners))


_FAILED = "reopening {what} failed; still writing to the old file"


def _log_failure(failure: Failure, what: str) -> None:
    log.failure(_FAILED, failure, what=what)


def reopen_on_hup(reactor: Any, reopen: Callable[[], Any]) -> None:
    """
    From now on SIGHUP calls C{reopen} in the reactor thread (once it runs).
    Installed at once, not when the reactor starts, to leave the signal's
    default action (ending the process) as short a time as possible.
    """

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(reopen)

    signal.signal(signal.SIGHUP, handler)
