"""The proxy's side of instrumentation: one event per finished request."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from llmproxy.events.bus import IEventBus
from llmproxy.events.schema import event_from_record
from llmproxy.events.usage import ensure_usage
from llmproxy.proxy.record import IRequestObserver, RequestRecord

log = Logger()


@implementer(IRequestObserver)
class EventPublisher:
    """
    Builds the event of every finished proxied request and hands it to the
    bus. Runs after the response ended and never raises into the proxy.
    Cache hits are published too (C{cache_status} says so), unlike the Go
    llm-proxy. With an in-memory bus that nobody subscribes to (no
    C{FILE_EVENT_LOG}) no event is built at all.
    """

    def __init__(self, bus: IEventBus, config: Any) -> None:
        self.bus = bus
        self.config = config
        self.enabled = bool(getattr(config, "observability_enabled", True))

    @property
    def wants_bodies(self) -> bool:
        """Whether an event would be built (the proxy skips capturing bodies otherwise)."""
        return self.enabled and bool(getattr(self.bus, "listening", True))

    def request_started(self, record: RequestRecord) -> None:
        pass

    def request_finished(self, record: RequestRecord) -> None:
        if not self.wants_bodies:
            return
        try:
            ensure_usage(record)
            event = event_from_record(record, self.config)
        except Exception:
            log.failure(
                "building the event of request {request_id} failed", request_id=record.request_id
            )
            return
        try:
            self.bus.publish(event)
        except Exception:
            log.failure(
                "publishing the event of request {request_id} failed", request_id=record.request_id
            )
