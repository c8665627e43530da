"""
Cross-instance cache invalidation over Redis pub/sub. Announcements made on
this instance's L{InvalidationHub} are published; messages from other
instances are delivered to the local hub, so a revoked token or deactivated
project is refused everywhere within a second. Messages carry the sender's
instance id and own messages are ignored. While Redis is away the in-process
cache TTLs bound how long a stale entry can live, failed publishes are
retried, and once the subscriber is back (it reconnects on its own) the
local hub hears kind C{"all"}: anything may have changed meanwhile.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger

from llmproxy.invalidation import InvalidationHub
from llmproxy.logthrottle import LogThrottle
from llmproxy.redisconn import RedisAddress, call_with_timeout, connect

if TYPE_CHECKING:
    from llmproxy.subscriber import SubscriberFactory

log = Logger()

DEFAULT_CHANNEL = "llmproxy:invalidations"
KINDS = frozenset({"token", "project"})
#: Delivered to the local hub (kind, key ``""``) after the subscription was
#: down: listeners should drop every cached entry.
FLUSH_ALL = "all"


class RedisInvalidationBridge(service.Service):
    """
    Connects C{hub} to every other instance through C{channel}: one pool
    for PUBLISH (each call with C{timeout}) and a separate subscriber
    connection that reconnects with a short backoff.
    """

    name = "invalidation-pubsub"

    def __init__(
        self,
        hub: InvalidationHub,
        address: RedisAddress,
        reactor: IReactorTCP,
        clock: IReactorTime,
        metrics: Any = None,
        channel: str = DEFAULT_CHANNEL,
        timeout: float = 0.5,
        max_age: float = 300.0,
        retry_interval: float = 0.5,
        max_pending: int = 10_000,
    ) -> None:
        self.hub = hub
        self.address = address
        self.reactor = reactor
        self.clock = clock
        self.metrics = metrics
        self.channel = channel
        self.timeout = timeout
        self.max_age = max_age
        self.retry_interval = retry_interval
        self.max_pending = max_pending
        self._pending: dict[tuple[str, str], float] = {}
        self._retry: task.LoopingCall | None = None
        self.instance_id = uuid.uuid4().hex
        self.subscribed = False
        self._pool: Any = None
        self._factory: SubscriberFactory | None = None
        self._subscribed_waiters: list[defer.Deferred[None]] = []
        self._publish_log = LogThrottle(clock, 60.0)
        self._was_lost = False
        self._registered = False

    # -- service -----------------------------------------------------------------

    def startService(self) -> None:
        from llmproxy.subscriber import SubscriberFactory

        super().startService()
        self._pool = connect(self.address, poolsize=1)
        # Reconnect as quickly as the subscriber, so publishing resumes with it.
        self._pool._factory.initialDelay = SubscriberFactory.initialDelay
        self._pool._factory.maxDelay = SubscriberFactory.maxDelay
        self._factory = SubscriberFactory(self, self.address.password)
        endpoint = endpoints.TCP4ClientEndpoint(
            self.reactor, self.address.host, self.address.port, timeout=2
        )
        self._factory.startConnecting(endpoint)
        if not self._registered:
            self.hub.add_remote(self.publish)
            self._registered = True

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        factory, self._factory = self._factory, None
        pool, self._pool = self._pool, None
        self.subscribed = False
        if self._retry is not None and self._retry.running:
            self._retry.stop()
        if factory is not None:
            yield factory.disconnect()
        if pool is not None:
            yield pool.disconnect()

    # -- publishing ------------------------------------------------------------

    def publish(self, kind: str, key: str) -> None:
        """Hub publisher: tell other instances (never raises, never waits)."""
        if self._pool is None:
            return
        self._send(kind, key).addErrback(self._publish_failed, kind, key)

    def _send(self, kind: str, key: str) -> defer.Deferred[Any]:
        message = json.dumps({"i": self.instance_id, "k": kind, "key": key})
        d = call_with_timeout(self._pool.publish(self.channel, message), self.timeout, self.clock)
        d.addCallback(self._published)
        return d  # type: ignore[no-any-return]

    def _published(self, _: Any) -> None:
        if self.metrics is not None:
            self.metrics.invalidation("published")

    def _publish_failed(self, failure: Any, kind: str, key: str) -> None:
        if self.metrics is not None:
            self.metrics.redis_error("pubsub")
            self.metrics.invalidation("publish_failed")
        suppressed = self._publish_log.ready()
        if suppressed is not None:
            log.warn(
                "publishing an invalidation to Redis failed ({error}); retrying until Redis "
                "is back ({suppressed} similar failures since the last message)",
                error=failure.type.__name__,
                suppressed=suppressed,
            )
        if len(self._pending) < self.max_pending or (kind, key) in self._pending:
            self._pending.setdefault((kind, key), self.clock.seconds())
        if self._retry is None or not self._retry.running:
            self._retry = task.LoopingCall(self._retry_pending)
            self._retry.clock = self.clock
            self._retry.start(self.retry_interval, now=False)

    @defer.inlineCallbacks
    def _retry_pending(self) -> Any:
        """
        Publish what failed before. Announcements older than C{max_age} (the
        longest cache TTL) are dropped: every cache has expired them anyway.
        """
        if self._pool is None:
            return
        now = self.clock.seconds()
        for item, first in list(self._pending.items()):
            if now - first > self.max_age:
                del self._pending[item]
        for kind, key in list(self._pending):
            try:
                yield self._send(kind, key)
            except Exception:
                return  # still down; the next tick tries again
            self._pending.pop((kind, key), None)
        if not self._pending and self._retry is not None and self._retry.running:
            self._retry.stop()
            log.info("pending invalidations published after a Redis outage")

    # -- subscribing -----------------------------------------------------------

    def subscriber_connected(self, conn: Any) -> None:
        d = call_with_timeout(conn.subscribe(self.channel), self.timeout * 4, self.clock)
        d.addCallbacks(self._subscribed, self._subscribe_failed, errbackArgs=(conn,))

    def _subscribed(self, _: Any) -> None:
        self.subscribed = True
        if self._was_lost:
            # Announcements made while we were away are lost (pub/sub keeps
            # nothing): let every cache drop what it holds.
            log.info("invalidation subscriber reconnected to Redis; flushing local caches")
            self._was_lost = False
            self.hub.deliver(FLUSH_ALL, "")
        waiters, self._subscribed_waiters = self._subscribed_waiters, []
        for w in waiters:
            w.callback(None)

    def _subscribe_failed(self, failure: Any, conn: Any) -> None:
        if self.metrics is not None:
            self.metrics.redis_error("pubsub")
        log.warn("subscribing to invalidations failed: {error}", error=failure.type.__name__)
        if conn.transport is not None:
            conn.transport.loseConnection()  # the factory reconnects

    def subscriber_lost(self) -> None:
        if self.subscribed and self.running:
            log.warn(
                "invalidation subscriber lost its Redis connection; reconnecting "
                "(cache TTLs bound staleness meanwhile)"
            )
            if self.metrics is not None:
                self.metrics.redis_error("pubsub")
            self._was_lost = True
        self.subscribed = False

    def when_subscribed(self) -> defer.Deferred[None]:
        """Fires once the subscription is active (immediately if it is)."""
        if self.subscribed:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._subscribed_waiters.append(d)
        return d

    def message_received(self, message: Any) -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        try:
            data = json.loads(message)
            sender, kind, key = data["i"], data["k"], data["key"]
        except (TypeError, ValueError, KeyError):
            log.warn("ignoring malformed invalidation message")
            return
        if sender == self.instance_id:
            return
        if kind not in KINDS or not isinstance(key, str):
            log.warn("ignoring invalidation of unknown kind {kind!r}", kind=str(kind)[:32])
            return
        if self.metrics is not None:
            self.metrics.invalidation("received")
        self.hub.deliver(kind, key)

    # -- readiness -------------------------------------------------------------

    def ready_check(self) -> defer.Deferred[None]:
        """
        For C{/ready}: fails while the subscription is down, and while Redis
        does not answer a PING (a hung Redis keeps the subscription open).
        """
        if not self.subscribed or self._pool is None:
            return defer.fail(RuntimeError("not subscribed to Redis invalidations"))
        d = call_with_timeout(self._pool.ping(), self.timeout * 2, self.clock)
        d.addCallback(lambda _: None)
        return d  # type: ignore[no-any-return]


def pubsub_address(config: Any) -> RedisAddress | None:
    """
    The Redis to share invalidations through, or None when this instance
    uses Redis for nothing (then it is assumed to run alone).
    """
    shared = (
        config.invalidation_pubsub
        or config.distributed_rate_limit_enabled
        or config.event_bus == "redis-streams"
    )
    if shared:
        return RedisAddress.from_config(config)
    if not (config.http_cache_enabled and config.http_cache_backend == "redis"):
        return None
    if config.redis_cache_url:
        try:
            return RedisAddress.from_url(config.redis_cache_url)
        except ValueError:
            return None  # the cache logs why and keeps its entries in memory
    return RedisAddress.from_config(config)
