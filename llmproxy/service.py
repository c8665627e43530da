"""
The service tree. Children start in the order they are added and stop one
after another in reverse: the listening port first (in-flight requests get
the drain timeout), then usage, audit and events flush, the store last.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from llmproxy.reopen import LogFiles, reopen_on_hup
from llmproxy.web.clientip import TrustedProxies
from llmproxy.web.site import LLMProxySite
from llmproxy.workers import PARENT_PID_ENV, ParentWatchService

log = Logger()


class SequentialMultiService(service.MultiService):
    """
    A MultiService whose children stop one at a time, in reverse start
    order, each waiting for the previous one (Twisted's own stops them all
    at once). A child that fails to stop is logged and the rest still stop.
    """

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        service.Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("error stopping {name}", name=child.name)


#: The cyclic garbage collector's thresholds once the heap is frozen.
GC_THRESHOLDS = (2_000, 5, 100)


class HeapFreezeService(service.Service):
    """
    Shortly after start, moves every object made so far (modules,
    configuration, the SQL and HTTP machinery: they live as long as the
    process) out of reach of the cyclic garbage collector (C{gc.freeze}),
    and sets the collector's thresholds to L{GC_THRESHOLDS}. Then it hands
    the memory start-up used and freed (migrations, module compilation)
    back to the system (L{release_free_memory}).

    A request in flight is a few hundred objects and a finished one is
    freed by reference counting (it holds no cycle), so what the collector
    finds is mostly live: its passes are pure pauses, as long as the
    generations they scan are large. Young passes every 2,000 allocations
    (Python's default is 700) stay short; 25,000 made each a pause of
    several milliseconds (p99 at one connection 5 ms instead of 0.7 ms).
    The middle generation is scanned every 5 young passes instead of every
    20: with 1,000 open streams its passes took 7-12 ms at 20 and 2-4 ms at
    5. Full passes, which scan every open stream (about 35 ms for 1,000),
    come after 100 middle ones instead of 10, and still only once the
    survivors grew by a quarter (Python's own rule). With Python's defaults
    and no freeze, full passes over 1,000 open streams stalled the reactor
    for 50-150 ms at a time (docs/performance.rst).
    """

    name = "heap-freeze"

    def __init__(self, clock: IReactorTime, delay: float = 2.0) -> None:
        self.clock = clock
        self.delay = delay
        self._call: Any = None

    def startService(self) -> None:
        super().startService()
        self._call = self.clock.callLater(self.delay, self._freeze)

    def stopService(self) -> Any:
        if self._call is not None and self._call.active():
            self._call.cancel()
        return super().stopService()

    def _freeze(self) -> None:
        import gc

        self._call = None
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        release_free_memory()


def release_free_memory() -> bool:
    """
    Return the C heap's free pages to the system (glibc's C{malloc_trim}),
    so they stop counting in the resident set; False where the C library
    has no such call.
    """
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


class LLMProxyService(SequentialMultiService):
    """
    The top of the tree. When twistd parents it to its Application it also
    installs our log observer there, so C{LOG_LEVEL}/C{LOG_FORMAT} apply.
    """

    log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> Any:
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)


def install_stop_once(reactor: Any) -> Any:
    """
    Make repeated SIGTERM/SIGINT harmless: systemd signals every process of
    the unit and the C{--workers} parent forwards the signal too; Twisted's
    own handler would log C{ReactorNotRunning} for the second one. Returns
    the same stop for other reasons to stop (see L{ParentWatchService}).
    """
    import signal

    stopping: list[bool] = []

    def stop() -> None:
        if not stopping and reactor.running:
            stopping.append(True)
            reactor.stop()

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop)

    def install() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) not in (signal.SIG_IGN, None):
                signal.signal(sig, handler)

    reactor.callWhenRunning(install)
    return stop


class DrainingWebService(StreamServerEndpointService):
    """
    Listens on an endpoint; on stop it closes the port, closes idle
    connections, gives in-flight requests (streams included) C{drain_timeout}
    seconds to finish, and only then aborts what is left.
    """

    #: A port that cannot be opened (in use, no permission) stops twistd
    #: with the error instead of leaving a process that serves nothing.
    _raiseSynchronously = True

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        site: LLMProxySite,
        clock: IReactorTime,
        drain_timeout: float,
    ) -> None:
        super().__init__(endpoint, site)
        self.site = site
        self.clock = clock
        self.drain_timeout = drain_timeout
        self._flusher: Any = None

    def privilegedStartService(self) -> None:
        from twisted.internet.error import CannotListenError

        try:
            super().privilegedStartService()
        except CannotListenError as e:
            # One line and a non-zero exit, like a configuration error.
            import sys

            reason = getattr(e, "socketError", None) or e
            sys.stderr.write(
                f"llmproxy: cannot listen on {e.interface or '*'}:{e.port}: {reason}\n"
            )
            raise SystemExit(1)

    def startService(self) -> None:
        super().startService()
        if self.site.access_log.enabled:
            from twisted.internet.task import LoopingCall

            self._flusher = LoopingCall(self.site.access_log.flush)
            self._flusher.clock = self.clock
            self._flusher.start(1.0, now=False)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        yield super().stopService()  # the port is closed: nothing new comes in
        site = self.site
        site.start_draining()
        if site.in_flight:
            log.info(
                "draining {count} in-flight request(s) for up to {timeout}s",
                count=site.in_flight,
                timeout=self.drain_timeout,
            )
            idle = site.when_idle()
            idle.addTimeout(self.drain_timeout, self.clock)  # type: ignore[arg-type]
            try:
                yield idle
            except defer.TimeoutError:
                aborted = site.abort_all()
                log.warn("drain deadline hit; aborted {count} request(s)", count=aborted)
            else:
                log.info("drained all in-flight requests")
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        site.access_log.flush()


def build_service(config: Any, reactor: Any) -> LLMProxyService:
    """
    Assemble the whole daemon from a L{Config}. Sections below are added in
    start order; each component is constructed with what it needs.
    """
    from twisted.internet import endpoints

    from llmproxy.logging import make_observer, open_log_stream
    from llmproxy.tap import with_backlog
    from llmproxy.web.app import WebApp
    from llmproxy.web.root import Root
    from llmproxy.web.site import AccessLog

    top = LLMProxyService()
    top.setName("llmproxy")
    stop = install_stop_once(reactor)
    parent = os.environ.get(PARENT_PID_ENV)
    if parent:  # a --workers worker: stop with the parent that runs it
        ParentWatchService(reactor, int(parent), stop).setServiceParent(top)
    log_files = LogFiles()  # reopened on SIGHUP
    reopen_on_hup(reactor, log_files.reopen)
    log_stream = open_log_stream(config.log_file)
    if log_stream is not None:
        log_files.add("LOG_FILE", log_stream.reopen)
    top.log_observer = make_observer(config.effective_log_level, config.log_format, log_stream)

    web = WebApp(clock=reactor)

    # -- store (first: everything else may use it) --------------------------------
    from llmproxy.store.service import StoreService
    from llmproxy.store.sql import make_store

    store = make_store(config, reactor)  # IStore; opened (migrated) when the tree starts
    StoreService(store).setServiceParent(top)
    web.ready_checks.append(("database", store.ping))

    # -- metrics, rate limits, cross-instance invalidation ------------------------
    from llmproxy.invalidation import InvalidationHub
    from llmproxy.metrics import Metrics, MetricsObserver, install_metrics
    from llmproxy.pubsub import RedisInvalidationBridge, pubsub_address
    from llmproxy.ratelimit import build_rate_limit_policy
    from llmproxy.ratelimit.redis import RedisPoolService
    from llmproxy.redisconn import RedisAddress, connect

    metrics = Metrics(reactor)  # components count through this
    # IRequestObserver list handed to the proxy resource (events and usage add theirs)
    request_observers: list[Any] = []
    if install_metrics(web, config, metrics):  # nothing reads per-request metrics otherwise
        request_observers.append(MetricsObserver(metrics))
    invalidation = InvalidationHub()  # management announces, caches listen
    ratelimit_pool = None
    if config.distributed_rate_limit_enabled:
        ratelimit_pool = connect(RedisAddress.from_config(config))
        RedisPoolService(ratelimit_pool).setServiceParent(top)
    # RateLimitPolicy, or None when no limit is configured
    rate_limits = build_rate_limit_policy(config, reactor, metrics, ratelimit_pool)
    if rate_limits is not None and ratelimit_pool is not None:
        web.ready_checks.append(("ratelimit_redis", rate_limits.limiter.ping))  # type: ignore[attr-defined]
    invalidation_address = pubsub_address(config)
    if invalidation_address is not None:
        invalidation_bridge = RedisInvalidationBridge(
            invalidation,
            invalidation_address,
            reactor,
            reactor,
            metrics=metrics,
            # failed publishes are retried while some cache may still hold the entry
            max_age=max(config.token_cache_ttl, config.active_cache_ttl, config.api_key_cache_ttl),
        )
        invalidation_bridge.setServiceParent(top)
        web.ready_checks.append(("invalidation_pubsub", invalidation_bridge.ready_check))

    # -- event bus (instrumentation: one event per proxied request) ----------------
    from llmproxy.events.service import READY_CHECK_NAME, build_event_bus

    events = build_event_bus(config, reactor, metrics)
    events.service.setServiceParent(top)  # stops after the web drain: queued events go out
    if events.service.file_log is not None:
        log_files.add("FILE_EVENT_LOG", events.service.file_log.reopen)
    if events.ready_check is not None:  # Redis Streams: /ready reports an outage
        web.ready_checks.append((READY_CHECK_NAME, events.ready_check))
    # IRequestObserver: request_finished(record) -> event -> bus (never blocks the response)
    event_publisher = events.publisher
    request_observers.append(event_publisher)

    # -- audit writer and management API -------------------------------------------
    from llmproxy.audit.events import proxy_rejection_hook
    from llmproxy.audit.writer import AuditWriterService
    from llmproxy.web.manage import ManagementAPI

    # audit.record(event) never waits; proxy refusals: audit.proxy_rejection_hook(audit, reactor)
    audit = AuditWriterService(
        reactor,
        store=store if config.audit_store_in_db else None,
        file_path=config.audit_log_file or None,
        create_dir=config.audit_create_dir,
        enabled=config.audit_enabled,
        reactor=reactor,
    )
    audit.setServiceParent(top)  # stops after the web drain, before the store closes
    if audit.file is not None:
        log_files.add("AUDIT_LOG_FILE", audit.reopen)
    management = ManagementAPI(
        store,
        audit,
        invalidation,
        config.management_token,
        reactor,
        max_body=min(config.max_request_size, 1024 * 1024),
    )
    web.mount("/manage/", management.resource())

    # -- HTTP response cache -------------------------------------------------------
    from llmproxy.cache.facade import CacheService, ResponseCache
    from llmproxy.web.cache_purge import CachePurgeHandler

    # ResponseCache the proxy consults; None when HTTP_CACHE_ENABLED=false
    response_cache: ResponseCache | None = None
    if config.http_cache_enabled:
        response_cache = ResponseCache.from_config(config, reactor, metrics=metrics)
        CacheService(response_cache).setServiceParent(top)
        if response_cache.backend.name == "redis":
            web.ready_checks.append(("cache_redis", response_cache.ping))
    CachePurgeHandler(response_cache, config.management_token, reactor, audit=audit).install(web)

    # -- proxy (/v1): usage counters, upstream client, the resource ---------------
    import functools

    from llmproxy.events.usage import make_usage_tap, prepare_request_body
    from llmproxy.proxy.breaker import CircuitBreaker
    from llmproxy.proxy.policy import ProviderPolicy
    from llmproxy.proxy.providers import load_providers
    from llmproxy.proxy.resource import ProxyResource, Upstream
    from llmproxy.proxy.service import UpstreamClientService
    from llmproxy.tokens.usage import UsageFlusher
    from llmproxy.tokens.validator import TokenValidator

    usage = UsageFlusher(
        store,
        reactor,
        flush_interval=config.usage_flush_interval,
        buffer_size=config.usage_stats_buffer_size,
    )
    usage.setServiceParent(top)  # stops after the web side: the last counts are written

    # API_CONFIG_PATH (or the built-in OpenAI provider when the file is missing);
    # a broken file raises ConfigError here
    provider = load_providers(config)
    upstream = Upstream(provider.name, provider.origin, provider.timeouts.response_header)
    upstream_client = UpstreamClientService(
        reactor,
        # idle keep-alive connections kept: at least the concurrency, or every
        # request above the provider's setting pays a new TLS handshake
        max_per_host=max(
            provider.connection.max_persistent_per_host, config.max_concurrent_requests
        ),
        idle_connection_timeout=provider.timeouts.idle_connection,
        connect_timeout=config.upstream_connect_timeout,
        max_concurrent=config.max_concurrent_requests,
    )
    upstream_client.setServiceParent(top)
    validator = TokenValidator.from_config(
        config, store, reactor, usage=usage, hub=invalidation, metrics=metrics
    )
    proxy_resource = ProxyResource(
        reactor=reactor,
        upstream=upstream,
        client=upstream_client,
        validator=validator,
        breaker=CircuitBreaker(
            reactor,
            threshold=config.circuit_breaker_threshold,
            cooldown=config.circuit_breaker_cooldown,
            name=upstream.name,
        ),
        policy=ProviderPolicy.from_config(provider, config),
        observers=request_observers,
        # per-chunk usage taps (SSE / JSON) fill record.usage; a stream the proxy
        # asked for usage (STREAM_INCLUDE_USAGE) gets that chunk stripped again
        taps=[make_usage_tap],
        prepare_body=functools.partial(prepare_request_body, config=config),
        audit=proxy_rejection_hook(audit, reactor),  # refused tokens are audited
        cache=response_cache,
        rate_limits=rate_limits,
        enforce_project_active=config.enforce_project_active,
        idle_timeout=provider.idle_timeout(config),
        max_request_capture=config.observability_max_request_body_bytes,
        max_response_capture=config.observability_max_response_body_bytes,
    )

    # -- web -------------------------------------------------------------------
    access_log = AccessLog.from_setting(config.access_log, config.log_format)
    if access_log.to_file:
        log_files.add("ACCESS_LOG", access_log.reopen)
    site = LLMProxySite(
        Root(web.resource(), proxy_resource),
        clock=reactor,
        max_request_size=config.max_request_size,
        access_log=access_log,
        # A request's head must arrive within REQUEST_TIMEOUT and its body may
        # not pause for longer; an idle keep-alive connection is closed after
        # twice that (as the Go proxy's server does).
        request_timeout=config.request_timeout,
        idle_timeout=2 * config.request_timeout or None,  # 0: no limits
        trusted_proxies=TrustedProxies(config.trusted_proxies) if config.trusted_proxies else None,
    )
    if config.ip_rate_limit and not config.trusted_proxies:
        log.warn(
            "IP_RATE_LIMIT counts per the first X-Forwarded-For entry, which any client"
            " can set; list the proxies in front of llmproxy in TRUSTED_PROXIES"
        )
    endpoint = endpoints.serverFromString(
        reactor, with_backlog(config.listen_addr, config.listen_backlog)
    )
    web_service = DrainingWebService(endpoint, site, reactor, config.drain_timeout)
    web_service.setName("web")
    web_service.setServiceParent(top)
    HeapFreezeService(reactor).setServiceParent(top)  # after start-up: no long GC pauses
    return top
