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
