"""
The event bus seam: where the proxy's instrumentation events go. An
in-memory bus (one process, the default) and a Redis Streams bus (shared by
every instance, read by dispatchers) implement L{IEventBus}.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class IEventBus(Interface):
    published = Attribute("Events accepted so far (int).")
    dropped = Attribute("Events lost so far: full buffer, or undeliverable on stop (int).")
    listening = Attribute("False when no one would receive an event (it is not built then).")

    def publish(event: dict[str, Any]) -> None:
        """Queue one event; never blocks, never raises (a full buffer drops and counts)."""

    def start() -> None:
        """Begin delivering."""

    def stop() -> Any:
        """Deliver what is queued (bounded time), then stop; may return a Deferred."""

    def stats() -> dict[str, Any]:
        """Counters for logs and metrics: published, dropped, queued, ..."""
