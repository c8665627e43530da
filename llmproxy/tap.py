"""twistd plugin options and service maker for C{twistd llmproxy}."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from llmproxy.config import Config, ConfigError, parse_duration


def with_backlog(endpoint: str, backlog: int) -> str:
    """Add C{backlog=N} to a C{tcp:} endpoint that does not name one."""
    if re.match(r"^tcp6?:", endpoint) and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={backlog}"
    return endpoint


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the llmproxy daemon. Settings come from environment variables "
        "(see docs/configuration.rst); these options override them."
    )
    optParameters = [
        [
            "port",
            "p",
            None,
            "Endpoint to listen on: tcp:8080, tcp:8080:backlog=2048, ssl:8443:privateKey=...,"
            " unix:/run/llmproxy.sock, systemd:domain=INET:index=0 (default: LISTEN_ADDR).",
        ],
        [
            "drain-timeout",
            None,
            None,
            "Seconds in-flight requests get to finish on SIGTERM (default: DRAIN_TIMEOUT, 30s).",
        ],
        ["api-config", "c", None, "Providers YAML (default: API_CONFIG_PATH)."],
        ["db", None, None, "SQLite database file (default: DATABASE_PATH)."],
        ["log-level", None, None, "debug | info | warn | error (default: LOG_LEVEL)."],
        ["file-event-log", None, None, "Write events as JSON lines here (FILE_EVENT_LOG)."],
        [
            "workers",
            "w",
            None,
            "Worker processes sharing the listening socket (default: WORKERS, 1).",
        ],
    ]

    def postOptions(self) -> None:
        from llmproxy.config import parse_listen_addr

        overrides: dict[str, Any] = {}
        try:
            if self["port"]:
                overrides["listen_addr"] = parse_listen_addr(self["port"])
            if self["drain-timeout"]:
                overrides["drain_timeout"] = parse_duration(self["drain-timeout"])
            if self["api-config"]:
                overrides["api_config_path"] = self["api-config"]
            if self["db"]:
                overrides["database_path"] = self["db"]
            if self["log-level"]:
                overrides["log_level"] = self["log-level"].lower()
            if self["file-event-log"]:
                overrides["file_event_log"] = self["file-event-log"]
            if self["workers"]:
                from llmproxy.config import parse_positive_int

                overrides["workers"] = parse_positive_int(self["workers"])
            self["config"] = Config.from_env(os.environ, overrides)
        except (ConfigError, ValueError) as e:
            # One line naming the problem, no traceback, non-zero exit.
            sys.stderr.write(f"llmproxy: configuration error: {e}\n")
            raise SystemExit(1)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from llmproxy.service import build_service

    config: Config = options["config"]
    try:
        if config.workers > 1:
            return build_worker_pool(config, options, reactor)
        return build_service(config, reactor)
    except ConfigError as e:
        sys.stderr.write(f"llmproxy: configuration error: {e}\n")
        raise SystemExit(1)


def build_worker_pool(config: Config, options: Options, reactor: Any) -> IService:
    """The parent of C{--workers N}: binds the port, runs N worker daemons."""
    from llmproxy.proxy.providers import load_providers

    # Fail here, once and clearly, rather than in every worker.
    load_providers(config)
    from llmproxy.service import LLMProxyService, install_stop_once
    from llmproxy.workers import WorkerPoolService

    passthrough: list[str] = []
    for name in ("drain-timeout", "api-config", "db", "log-level", "file-event-log"):
        if options[name]:
            passthrough += [f"--{name}", options[name]]
    from llmproxy.pubsub import pubsub_address

    env: dict[str, str] = {}
    if pubsub_address(config) is None:
        # Without Redis pub/sub the workers cannot tell each other about a
        # revocation; keep their in-process caches short so every worker
        # enforces it within a second.
        for var, value in (
            ("TOKEN_CACHE_TTL", config.token_cache_ttl),
            ("LLM_PROXY_ACTIVE_CACHE_TTL", config.active_cache_ttl),
            ("LLM_PROXY_API_KEY_CACHE_TTL", config.api_key_cache_ttl),
        ):
            env[var] = str(min(value, 1.0))
    top = LLMProxyService()
    top.setName("llmproxy-workers")
    install_stop_once(reactor)
    from llmproxy.logging import make_observer, open_log_stream
    from llmproxy.reopen import LogFiles, reopen_on_hup

    log_files = LogFiles()
    log_stream = open_log_stream(config.log_file)
    if log_stream is not None:
        log_files.add("LOG_FILE", log_stream.reopen)
    top.log_observer = make_observer(config.effective_log_level, config.log_format, log_stream)
    pool = WorkerPoolService(
        reactor,
        reactor,
        with_backlog(config.listen_addr, config.listen_backlog),
        config.workers,
        passthrough,
        env,
        stop_timeout=config.drain_timeout + 15.0,
    )
    pool.setServiceParent(top)

    def on_hup() -> None:
        # This process reopens its own log file and passes the signal on.
        log_files.reopen()
        pool.signal_workers("HUP")

    reopen_on_hup(reactor, on_hup)
    return top
