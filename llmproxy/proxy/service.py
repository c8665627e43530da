"""
The upstream HTTP client as a service: one persistent connection pool and
one Agent for the process, a concurrency cap per provider, and cached
connections closed on stop.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,  # type: ignore[attr-defined]
)
from twisted.web.iweb import IAgent

from llmproxy.proxy.forward import CachedEndpointFactory
from llmproxy.web.site import no_delay

log = Logger()


class _QuietClientFactory(_HTTP11ClientFactory):  # type: ignore[misc]
    """The pool's connection factory: no log line per connection, no Nagle delay."""

    noisy = False

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        original_made = protocol.connectionMade

        def connectionMade() -> None:
            original_made()
            no_delay(protocol.transport)

        protocol.connectionMade = connectionMade  # type: ignore[method-assign]
        return protocol


class UpstreamClientService(service.Service):
    """
    Owns the L{HTTPConnectionPool} every proxied request goes through.

    @param max_per_host: idle connections kept per upstream (Twisted's
        default of 2 makes every request above 2 concurrent pay a new TLS
        handshake); size it to the expected concurrency.
    @param idle_connection_timeout: how long an idle pooled connection stays.
    @param connect_timeout: TCP (plus TLS) connect timeout.
    @param max_concurrent: upstream requests in flight per provider; the
        pool caps only idle connections, so this cap is ours.
    @param trust_root: CA used to verify upstream certificates; None means
        the platform's trust store (tests pass their own CA).
    """

    name = "upstream-client"

    def __init__(
        self,
        reactor: Any,
        *,
        max_per_host: int = 100,
        idle_connection_timeout: float = 90.0,
        connect_timeout: float = 10.0,
        max_concurrent: int = 100,
        trust_root: Any = None,
    ) -> None:
        self.reactor = reactor
        self.max_concurrent = max_concurrent
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        # Without this every new upstream connection logs "Starting factory"
        # and "Stopping factory" lines.
        self.pool._factory = _QuietClientFactory
        self.pool.maxPersistentPerHost = max(1, max_per_host)
        self.pool.cachedConnectionTimeout = max(1, round(idle_connection_timeout))
        policy = BrowserLikePolicyForHTTPS(trustRoot=trust_root)
        self.endpoints = CachedEndpointFactory(reactor, policy, connect_timeout)
        self.agent: IAgent = Agent.usingEndpointFactory(reactor, self.endpoints, pool=self.pool)
        self._semaphores: dict[str, defer.DeferredSemaphore] = {}

    def semaphore(self, provider: str) -> defer.DeferredSemaphore:
        """The cap on concurrent upstream requests to C{provider}."""
        sem = self._semaphores.get(provider)
        if sem is None:
            sem = self._semaphores[provider] = defer.DeferredSemaphore(self.max_concurrent)
        return sem

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        log.info("closing idle upstream connections")
        return self.pool.closeCachedConnections()
