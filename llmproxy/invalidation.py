"""
Cache invalidation: the management API announces changes here, in-process
caches (validated tokens, projects, provider keys) listen. With Redis
configured a publisher forwards the same announcements to every instance.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.logger import Logger

log = Logger()

#: kind is "token" (key: token hash) or "project" (key: project id).
Listener = Callable[[str, str], None]


@attrs.define
class InvalidationHub:
    _listeners: list[Listener] = attrs.field(factory=list)
    #: Called for local announcements so other instances hear them too.
    _remote: list[Listener] = attrs.field(factory=list)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def add_remote(self, publisher: Listener) -> None:
        self._remote.append(publisher)

    def token_changed(self, token_hash: str) -> None:
        self.announce("token", token_hash)

    def project_changed(self, project_id: str) -> None:
        self.announce("project", project_id)

    def announce(self, kind: str, key: str) -> None:
        """A change made here: apply locally and tell other instances."""
        self.deliver(kind, key)
        for publish in self._remote:
            try:
                publish(kind, key)
            except Exception:
                log.failure("publishing invalidation failed")

    def deliver(self, kind: str, key: str) -> None:
        """A change heard from another instance (or made here)."""
        for listener in self._listeners:
            try:
                listener(kind, key)
            except Exception:
                log.failure("invalidation listener failed")
