"""
The event bus in the daemon's service tree: built from the configuration,
started after the store, stopped after the web side so that every event of
a drained request is still delivered.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from llmproxy.events.bus import IEventBus
from llmproxy.events.filelog import FileEventLog
from llmproxy.events.memory import MemoryEventBus
from llmproxy.events.publisher import EventPublisher

log = Logger()

#: Name of the C{/ready} check when events go to Redis.
READY_CHECK_NAME = "redis-event-bus"


class EventBusService(service.Service):
    """Owns the bus (and the C{FILE_EVENT_LOG} writer) for their lifetime."""

    name = "event-bus"

    def __init__(self, bus: IEventBus, file_log: FileEventLog | None = None) -> None:
        self.bus = bus
        self.file_log = file_log

    def startService(self) -> None:
        super().startService()
        if self.file_log is not None:
            self.file_log.open()
        self.bus.start()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        try:
            yield defer.maybeDeferred(self.bus.stop)
        except Exception:
            log.failure("stopping the event bus failed")
        stats = self.bus.stats()
        log.info(
            "event bus stopped: {published} published, {dropped} dropped",
            published=stats.get("published"),
            dropped=stats.get("dropped"),
        )
        if self.file_log is not None:
            self.file_log.close()


@attrs.define
class EventSetup:
    """What L{build_event_bus} made: the service, the proxy's observer, a ready check."""

    service: EventBusService
    publisher: EventPublisher
    ready_check: Any = None


def build_event_bus(config: Any, reactor: Any, metrics: Any = None) -> EventSetup:
    """
    The bus named by C{LLM_PROXY_EVENT_BUS}: in-memory by default; Redis
    Streams at C{REDIS_ADDR} otherwise (the proxy starts and serves even
    when that Redis is down). C{FILE_EVENT_LOG} writes every event too.
    """
    file_log = FileEventLog(config.file_event_log, reactor) if config.file_event_log else None
    ready_check = None
    bus: Any
    if config.event_bus == "redis-streams":
        from llmproxy.events.redis_streams import RedisStreamsEventBus
        from llmproxy.redisconn import RedisAddress, connect

        bus = RedisStreamsEventBus(
            # one connection: XADDs pipeline on it in publish order
            connect(RedisAddress.from_config(config), poolsize=1),
            reactor,
            config.redis_stream_key,
            max_len=config.redis_stream_max_len,
            capacity=config.observability_buffer_size,
            metrics=metrics,
        )
        ready_check = bus.ping
        if file_log is not None:
            bus = _Tee(bus, file_log)
    else:
        bus = MemoryEventBus(reactor, config.observability_buffer_size, metrics=metrics)
        if file_log is not None:
            bus.subscribe(file_log)
    # Vocabularies for usage estimates load when first needed (see events.tokenize).
    svc = EventBusService(bus, file_log)
    return EventSetup(svc, EventPublisher(bus, config), ready_check)


@attrs.define
class _Tee:
    """A Redis bus that also writes each event to the local file log."""

    inner: Any
    file_log: FileEventLog
    listening = True

    def publish(self, event: dict[str, Any]) -> None:
        self.file_log(event)
        self.inner.publish(event)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
