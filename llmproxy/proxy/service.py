"""
The upstream HTTP client as a service: one persistent connection pool for
the process, a concurrency cap per provider, and idle connections closed
on stop.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.client import BrowserLikePolicyForHTTPS

from llmproxy.proxy.client import Origin, UpstreamPool
from llmproxy.proxy.forward import CachedEndpointFactory

log = Logger()


class ConcurrencyCap(defer.DeferredSemaphore):
    """A L{defer.DeferredSemaphore} that can also take a free slot without a Deferred."""

    def take_now(self) -> None:
        """Take a slot the caller saw free (C{tokens > 0}, nobody waiting)."""
        assert self.tokens > 0 and not self.waiting
        self.tokens -= 1


class UpstreamClientService(service.Service):
    """
    Owns the L{UpstreamPool} every proxied request goes through.

    @param max_per_host: idle connections kept per upstream (with fewer,
        every request above that concurrency pays a new TLS handshake);
        size it to the expected concurrency.
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
        policy = BrowserLikePolicyForHTTPS(trustRoot=trust_root)
        self.endpoints = CachedEndpointFactory(reactor, policy, connect_timeout)
        self.pool = UpstreamPool(
            reactor,
            self.endpoints.endpoint_for,
            max_idle=max_per_host,
            idle_timeout=max(1.0, idle_connection_timeout),
        )
        self._semaphores: dict[str, ConcurrencyCap] = {}
        #: Send a request upstream; fires with the response once its headers
        #: arrived (see L{UpstreamPool.request}).
        self.request = self.pool.request

    def origin(self, scheme: str, host: str, port: int) -> Origin:
        """The pool's handle for an upstream (made once, used per request)."""
        try:
            host_bytes = host.encode("ascii")
        except UnicodeEncodeError:
            host_bytes = host.encode("idna")
        return self.pool.origin(scheme.encode("ascii"), host_bytes, port)

    def semaphore(self, provider: str) -> ConcurrencyCap:
        """The cap on concurrent upstream requests to C{provider}."""
        sem = self._semaphores.get(provider)
        if sem is None:
            sem = self._semaphores[provider] = ConcurrencyCap(self.max_concurrent)
        return sem

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        log.info("closing idle upstream connections")
        return self.pool.close_idle()
