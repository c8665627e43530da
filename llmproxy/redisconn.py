"""
Shared Redis plumbing over txredisapi: URL parsing, lazily connecting pools
that reconnect on their own, and a deadline on every call (txredisapi
commands otherwise wait forever while Redis is down).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlparse

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmproxy.logthrottle import LogThrottle

log = Logger()


@attrs.frozen
class RedisAddress:
    host: str = "localhost"
    port: int = 6379
    db: int = 0
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """C{redis://[:password@]host[:port][/db]}; raises ValueError."""
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", ""):
            raise ValueError(f"unsupported Redis URL scheme {parsed.scheme!r}")
        db = 0
        path = (parsed.path or "").strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"Redis database must be a number, got {path!r}")
            db = int(path)
        return cls(
            host=parsed.hostname or "localhost",
            port=parsed.port or 6379,
            db=db,
            password=unquote(parsed.password) if parsed.password else None,
        )

    @classmethod
    def from_config(cls, config: Any) -> RedisAddress:
        host, port = config.redis_host_port
        return cls(host=host, port=port, db=config.redis_db, password=config.redis_password or None)


def connect(address: RedisAddress, poolsize: int = 2, connect_timeout: float = 1.0) -> Any:
    """
    A lazily connecting, self-reconnecting txredisapi pool. Commands sent
    while Redis is away queue until it returns: always wrap them with
    L{call_with_timeout}. Disconnect it on stop (C{pool.disconnect()}).
    """
    import txredisapi

    return txredisapi.lazyConnectionPool(
        host=address.host,
        port=address.port,
        # No SELECT for database 0: txredisapi stops reconnecting for good when a
        # SELECT fails (e.g. the connection drops while Redis restarts).
        dbid=address.db or None,
        poolsize=poolsize,
        reconnect=True,
        password=address.password,
        connectTimeout=connect_timeout,
        replyTimeout=None,
        convertNumbers=False,
    )


def call_with_timeout(d: defer.Deferred[Any], timeout: float, clock: IReactorTime) -> Any:
    """Errback with L{defer.TimeoutError} when C{d} takes longer than C{timeout}."""
    return d.addTimeout(timeout, clock)  # type: ignore[arg-type]


class RedisOutage:
    """
    After a failed call Redis is left alone for C{retry_interval} seconds,
    then one call probes it again; the outage is logged once a minute and
    its end once. Shared by the components that degrade per call (cache,
    rate limits) so each does not keep its own copy of this state.
    """

    def __init__(
        self,
        clock: IReactorTime,
        retry_interval: float,
        component: str,
        metrics: Any = None,
        down_message: str = "",
        back_message: str = "",
        logger: Logger = log,
    ) -> None:
        self.clock = clock
        self.retry_interval = retry_interval
        self.component = component
        self.metrics = metrics
        self.down_message = down_message
        self.back_message = back_message
        self.log = logger
        self.available = True
        self._retry_at = 0.0
        self._log = LogThrottle(clock, 60.0)

    def skip(self) -> bool:
        """True while Redis should not be called; a call after the pause probes it."""
        if self.available:
            return False
        now = self.clock.seconds()
        if now < self._retry_at:
            return True
        self._retry_at = now + self.retry_interval  # this call probes Redis
        return False

    def failed(self, error: BaseException, **fields: Any) -> None:
        """A call failed: pause, count it, log (throttled) C{down_message}."""
        self.available = False
        self._retry_at = self.clock.seconds() + self.retry_interval
        if self.metrics is not None:
            self.metrics.redis_error(self.component)
        suppressed = self._log.ready()
        if suppressed is not None:
            self.log.warn(
                self.down_message, error=type(error).__name__, suppressed=suppressed, **fields
            )

    def succeeded(self) -> None:
        """A call worked: log C{back_message} once if Redis had been away."""
        if not self.available:
            self.available = True
            self._log.reset()
            self.log.info(self.back_message)
