"""
L{StoreService}: the first child of the daemon's service tree. It opens
the database before anything else starts (migrations, key check) and
closes it last, after usage and audit have flushed.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from llmproxy.config import ConfigError
from llmproxy.store.sql import SQLStore

log = Logger()


class StoreService(service.Service):
    """
    Opens C{store} in C{startService} and closes it in C{stopService}.

    Opening happens on the store's thread pool but C{startService} waits
    for it: twistd starts services before the reactor runs, and nothing may
    listen before the schema is migrated and C{ENCRYPTION_KEY} is verified.
    With C{exit_on_error} a failure prints one line and exits non-zero
    (what twistd users expect), otherwise the exception propagates.
    """

    name = "store"

    def __init__(
        self, store: SQLStore, exit_on_error: bool = True, stderr: IO[str] | None = None
    ) -> None:
        self.store = store
        self.exit_on_error = exit_on_error
        self.stderr = stderr

    def startService(self) -> None:
        try:
            self.store.run_blocking(self.store.prepare)
        except Exception as e:
            self.store.close_blocking()
            if not self.exit_on_error:
                raise
            err = self.stderr or sys.stderr
            if isinstance(e, ConfigError):
                err.write(f"llmproxy: configuration error: {e}\n")
            else:
                err.write(
                    f"llmproxy: cannot open the database: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}\n"
                )
            raise SystemExit(1)
        service.Service.startService(self)

    def stopService(self) -> Any:
        service.Service.stopService(self)
        return defer.maybeDeferred(self.store.close)
