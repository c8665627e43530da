"""
C{twistd llmproxy-dispatcher}: delivers the proxy's events from Redis
Streams to a file, a webhook, Helicone or Lunary. Options override the
environment variables of the Go llm-proxy's dispatcher.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import attrs
from twisted.application import service
from twisted.python import usage

from llmproxy.config import Config, ConfigError, parse_bool, parse_positive_int

SERVICES = ("file", "webhook", "helicone", "lunary")


def _env_config(environ: dict[str, str]) -> Config:
    """The event and Redis settings of L{Config} (no management token needed here)."""
    values: dict[str, Any] = {}
    for f in attrs.fields(Config):
        env = f.metadata["env"]
        if env in environ:
            try:
                values[f.name] = f.metadata["parse"](environ[env])
            except ValueError as e:
                raise ConfigError(f"{env}: {e}")
    return Config(**values)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Read llmproxy's instrumentation events from Redis Streams (REDIS_ADDR, "
        "REDIS_STREAM_KEY, REDIS_CONSUMER_GROUP) and deliver them in batches."
    )
    optParameters = [
        ["service", "s", None, "file | webhook | helicone | lunary (DISPATCHER_SERVICE, file)."],
        ["endpoint", "e", None, "File path or URL (DISPATCHER_ENDPOINT)."],
        ["api-key", "k", None, "API key for helicone/lunary/webhook (LLM_PROXY_API_KEY)."],
        ["batch-size", "b", None, "Events per batch (DISPATCHER_BATCH_SIZE, 100)."],
        ["buffer", None, None, "Accepted for compatibility (DISPATCHER_BUFFER)."],
        ["flush-interval", None, "5", "Seconds before a partial batch is sent."],
        ["port", "p", None, "Optional endpoint for GET /health (e.g. tcp:9090)."],
        ["log-level", None, None, "debug | info | warn | error (LOG_LEVEL)."],
    ]
    optFlags = [
        ["detach", None, "Accepted for compatibility (DISPATCHER_DETACH); runs in the foreground."]
    ]

    def postOptions(self) -> None:
        env = dict(os.environ)
        try:
            self["config"] = _env_config(env)
            self["service"] = (self["service"] or env.get("DISPATCHER_SERVICE") or "file").lower()
            if self["service"] not in SERVICES:
                raise ConfigError(
                    f"--service: unknown {self['service']!r} (choose {', '.join(SERVICES)})"
                )
            self["endpoint"] = self["endpoint"] or env.get("DISPATCHER_ENDPOINT", "")
            self["api-key"] = self["api-key"] or env.get("LLM_PROXY_API_KEY", "")
            self["batch-size"] = parse_positive_int(
                self["batch-size"] or env.get("DISPATCHER_BATCH_SIZE", "100")
            )
            self["buffer"] = parse_positive_int(
                self["buffer"] or env.get("DISPATCHER_BUFFER", "1000")
            )
            self["flush-interval"] = float(self["flush-interval"])
            self["verbose"] = parse_bool(
                env.get("LLM_PROXY_DISPATCHER_VERBOSE", "false") or "false"
            )
            if os.environ.get("LLM_PROXY_EVENT_BUS", "").lower() in ("in-memory", "memory"):
                raise ConfigError(
                    "LLM_PROXY_EVENT_BUS: the in-memory bus lives inside the proxy process; a "
                    "separate dispatcher reads Redis Streams (use FILE_EVENT_LOG in the daemon "
                    "for a local file)"
                )
            from llmproxy.events.dispatcher.sinks import make_sink

            make_sink(self["service"], self["endpoint"], self["api-key"], None)  # validates
        except (ConfigError, ValueError) as e:
            sys.stderr.write(f"llmproxy-dispatcher: configuration error: {e}\n")
            raise SystemExit(1)


#: Health thresholds of the Go llm-proxy's dispatcher.
MAX_LAG = 10000
STALL_SECONDS = 300.0


async def health(dispatcher: Any, clock: Any) -> tuple[int, dict[str, Any]]:
    """
    The dispatcher's counters plus the group's pending entries and the
    stream length; unhealthy (503) when more than L{MAX_LAG} entries wait,
    when entries wait and nothing was delivered for L{STALL_SECONDS}, or
    when Redis does not answer.
    """
    body: dict[str, Any] = {"status": "ok", "service": dispatcher.sink.name}
    body.update(dispatcher.stats)
    consumer = getattr(dispatcher.source, "consumer", None)
    if consumer is None:
        return 200, body
    try:
        lag = await consumer.lag()
    except Exception as e:
        body.update(status="unhealthy", error=f"Redis: {type(e).__name__}")
        return 503, body
    body.update(lag)
    idle = clock.seconds() - (dispatcher.last_sent_at or dispatcher.started_at)
    if lag["pending"] > MAX_LAG or (lag["pending"] > 0 and idle > STALL_SECONDS):
        body["status"] = "unhealthy"
        return 503, body
    return 200, body


class _Health(service.Service):
    """C{GET /health} on C{--port}: see L{health}."""

    def __init__(self, port: str, dispatcher: Any, reactor: Any) -> None:
        from twisted.application import strports
        from twisted.internet import defer
        from twisted.web import resource, server

        class Health(resource.Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> Any:
                def done(result: tuple[int, dict[str, Any]]) -> None:
                    code, body = result
                    request.setResponseCode(code)
                    request.setHeader(b"content-type", b"application/json")
                    request.write(json.dumps(body).encode())
                    request.finish()

                d = defer.ensureDeferred(health(dispatcher, reactor))
                d.addTimeout(5, reactor)
                d.addCallbacks(done, lambda f: done((503, {"status": "unhealthy"})))
                return server.NOT_DONE_YET

        class QuietSite(server.Site):
            def log(self, request: Any) -> None:
                pass  # health probes are not worth a log line each

        self.inner = strports.service(port, QuietSite(Health()), reactor=reactor)

    def startService(self) -> None:
        super().startService()
        self.inner.startService()

    def stopService(self) -> Any:
        super().stopService()
        return self.inner.stopService()


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    from llmproxy.events.dispatcher.service import Dispatcher, RedisSource, consumer_name
    from llmproxy.events.dispatcher.sinks import make_sink
    from llmproxy.events.redis_streams import RedisStreamConsumer
    from llmproxy.logging import make_observer, open_log_stream
    from llmproxy.redisconn import RedisAddress, connect
    from llmproxy.reopen import LogFiles, reopen_on_hup
    from llmproxy.service import LLMProxyService, install_stop_once

    config: Config = options["config"]
    top = LLMProxyService()
    top.setName("llmproxy-dispatcher")
    install_stop_once(reactor)
    level = (options["log-level"] or config.effective_log_level).lower()
    log_files = LogFiles()  # reopened on SIGHUP
    reopen_on_hup(reactor, log_files.reopen)
    log_stream = open_log_stream(config.log_file)
    if log_stream is not None:
        log_files.add("LOG_FILE", log_stream.reopen)
    top.log_observer = make_observer(level, config.log_format, log_stream)
    address = RedisAddress.from_config(config)
    reader = connect(address, poolsize=1)  # blocking XREADGROUP gets its own connection
    pool = connect(address, poolsize=1)
    name = config.redis_consumer_name or consumer_name(options["service"])
    consumer = RedisStreamConsumer(
        reader,
        pool,
        reactor,
        config.redis_stream_key,
        config.redis_consumer_group,
        name,
        claim_time=config.redis_stream_claim_time,
    )
    sink = make_sink(
        options["service"],
        options["endpoint"],
        options["api-key"],
        reactor,
        verbose=options["verbose"],
    )
    dispatcher = Dispatcher(
        RedisSource(consumer, [reader, pool]),
        sink,
        reactor,
        batch_size=options["batch-size"],
        flush_interval=options["flush-interval"],
        read_wait=min(config.redis_stream_block_time, 1.0),
    )
    dispatcher.setServiceParent(top)
    if options["port"]:
        _Health(options["port"], dispatcher, reactor).setServiceParent(top)
    return top
