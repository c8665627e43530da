"""
Configuration: one frozen L{Config} built from environment variables.

Every variable is declared once, in L{_FIELDS}-style attrs metadata on
L{Config}; the environment parser, the plugin option overrides and
``docs/configuration.rst`` (see L{render_rst}) are all derived from that one
declaration so they cannot drift apart.

Unlike the Go project, an unparseable value is a startup error naming the
variable, never a silent fallback to the default.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from llmproxy.web.clientip import parse_trusted_entry


class ConfigError(Exception):
    """A configuration value is missing or invalid; the message names the variable."""


# -- value parsers ----------------------------------------------------------

_TRUE = {"1", "t", "true", "yes", "y", "on"}
_FALSE = {"0", "f", "false", "no", "n", "off"}


def parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r} (use true or false)")


def parse_int(value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"not an integer: {value!r}")


def parse_nonneg_int(value: str) -> int:
    n = parse_int(value)
    if n < 0:
        raise ValueError(f"must be >= 0, got {n}")
    return n


def parse_positive_int(value: str) -> int:
    n = parse_int(value)
    if n <= 0:
        raise ValueError(f"must be > 0, got {n}")
    return n


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str) -> float:
    """
    Parse a Go-style duration (``500ms``, ``1m30s``, ``24h``) into seconds.

    A bare number is taken as seconds, which is what most users mean.
    """
    v = value.strip()
    if not v:
        raise ValueError("empty duration")
    try:
        seconds = float(v)
    except ValueError:
        pass
    else:
        if seconds < 0:
            raise ValueError(f"negative duration: {value!r}")
        return seconds
    pos = 0
    total = 0.0
    for m in _DURATION_PART.finditer(v):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(v) or pos == 0:
        raise ValueError(f"not a duration: {value!r} (examples: 500ms, 30s, 1m30s, 24h)")
    return total


def parse_str(value: str) -> str:
    return value


def parse_csv(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def parse_trusted_proxies(value: str) -> tuple[str, ...]:
    entries = parse_csv(value)
    for entry in entries:
        parse_trusted_entry(entry)
    return entries


def _choice(*choices: str, aliases: Mapping[str, str] | None = None) -> Callable[[str], str]:
    def parse(value: str) -> str:
        v = value.strip().lower()
        v = (aliases or {}).get(v, v)
        if v not in choices:
            raise ValueError(f"unknown value {value!r} (choose one of: {', '.join(choices)})")
        return v

    parse.__doc__ = " | ".join(choices)
    return parse


def parse_listen_addr(value: str) -> str:
    """
    Turn ``LISTEN_ADDR`` into a Twisted endpoint description.

    ``:8080`` and ``127.0.0.1:8080`` (the Go style) become ``tcp:...``;
    anything that already looks like an endpoint string is kept.
    """
    v = value.strip()
    if not v:
        raise ValueError("empty listen address")
    if re.match(r"^(tcp|tcp6|ssl|unix|systemd|tls):", v):
        return v
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not a listen address: {value!r} (examples: :8080, 127.0.0.1:8080)")
    host = host.strip("[]")
    if host:
        return f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"
    return f"tcp:{port}"


# -- the declaration ----------------------------------------------------------


def _var(
    env: str,
    default: Any,
    parse: Callable[[str], Any],
    doc: str,
    *,
    group: str,
    secret: bool = False,
) -> Any:
    return attrs.field(
        default=default,
        metadata={"env": env, "parse": parse, "doc": doc, "group": group, "secret": secret},
    )


CORE = "Core server"
DB = "Database"
LOG = "Logging and audit"
PROXY = "Proxy"
LIMITS = "Rate limits and quotas"
CACHE = "HTTP response cache"
EVENTS = "Events and instrumentation"
METRICS = "Metrics"


@attrs.frozen(repr=False)
class Config:
    # Core server
    management_token: str = _var(
        "MANAGEMENT_TOKEN",
        "",
        parse_str,
        "Bearer secret for ``/manage/*``. Required: the daemon refuses to start without it.",
        group=CORE,
        secret=True,
    )
    listen_addr: str = _var(
        "LISTEN_ADDR",
        "tcp:8080:backlog=1024",
        parse_listen_addr,
        "Default for ``--port``: ``:8080`` style or any Twisted endpoint string.",
        group=CORE,
    )
    listen_backlog: int = _var(
        "LISTEN_BACKLOG",
        1024,
        parse_positive_int,
        "Listen backlog added to ``tcp:`` endpoints that do not name one.",
        group=CORE,
    )
    drain_timeout: float = _var(
        "DRAIN_TIMEOUT",
        30.0,
        parse_duration,
        "Grace period for in-flight requests (streams included) on SIGTERM; ``--drain-timeout``.",
        group=CORE,
    )
    workers: int = _var(
        "WORKERS",
        1,
        parse_positive_int,
        "Worker processes sharing one listening socket (``--workers``); tcp endpoints only.",
        group=CORE,
    )
    request_timeout: float = _var(
        "REQUEST_TIMEOUT",
        30.0,
        parse_duration,
        "Timeout for reading a request from a client (its head must arrive within it "
        "and its body may not pause for longer, else 408; an idle keep-alive connection "
        "is closed after twice it; 0: no limit), and the built-in provider's "
        "response-header timeout. Never limits the length of a streamed answer.",
        group=CORE,
    )
    max_request_size: int = _var(
        "MAX_REQUEST_SIZE",
        10485760,
        parse_positive_int,
        "Largest request body accepted, in bytes; larger bodies get 413 while they arrive.",
        group=CORE,
    )
    max_concurrent_requests: int = _var(
        "MAX_CONCURRENT_REQUESTS",
        100,
        parse_positive_int,
        "Concurrent upstream requests per provider; also sizes the upstream connection pool.",
        group=CORE,
    )
    api_env: str = _var(
        "API_ENV", "development", parse_str, "Free-form environment name (logged).", group=CORE
    )
    enable_streaming: bool = _var(
        "ENABLE_STREAMING", True, parse_bool, "Accepted for compatibility.", group=CORE
    )
    api_config_path: str = _var(
        "API_CONFIG_PATH",
        "./config/api_providers.yaml",
        parse_str,
        "Providers YAML. A missing file selects the built-in OpenAI provider; "
        "an invalid one is a startup error.",
        group=CORE,
    )
    default_api_provider: str = _var(
        "DEFAULT_API_PROVIDER", "openai", parse_str, "Provider to activate.", group=CORE
    )
    openai_api_url: str = _var(
        "OPENAI_API_URL",
        "https://api.openai.com",
        parse_str,
        "Base URL of the built-in OpenAI provider.",
        group=CORE,
    )
    encryption_key: str = _var(
        "ENCRYPTION_KEY",
        "",
        parse_str,
        "Base64 of 32 bytes: AES-256-GCM for provider keys at rest. "
        "Without it a warning is logged at startup.",
        group=CORE,
        secret=True,
    )
    require_encryption_key: bool = _var(
        "REQUIRE_ENCRYPTION_KEY",
        False,
        parse_bool,
        "Refuse to start without ``ENCRYPTION_KEY``.",
        group=CORE,
    )
    debug: bool = _var("DEBUG", False, parse_bool, "Forces ``LOG_LEVEL=debug``.", group=CORE)

    # Database
    db_driver: str = _var(
        "DB_DRIVER",
        "sqlite",
        _choice("sqlite", "postgres", "mysql", aliases={"postgresql": "postgres"}),
        "``sqlite`` | ``postgres`` | ``mysql``.",
        group=DB,
    )
    database_path: str = _var(
        "DATABASE_PATH",
        "./data/llmproxy.db",
        parse_str,
        "SQLite file; its directory is created.",
        group=DB,
    )
    database_url: str = _var(
        "DATABASE_URL",
        "",
        parse_str,
        "DSN for postgres/mysql, e.g. ``postgresql://user@host/db``.",
        group=DB,
        secret=True,
    )
    database_pool_size: int = _var(
        "DATABASE_POOL_SIZE",
        10,
        parse_positive_int,
        "Database connections (and threads) for postgres/mysql.",
        group=DB,
    )
    database_max_idle_conns: int = _var(
        "DATABASE_MAX_IDLE_CONNS", 5, parse_nonneg_int, "Idle pooled connections kept.", group=DB
    )
    database_conn_max_lifetime: float = _var(
        "DATABASE_CONN_MAX_LIFETIME",
        3600.0,
        parse_duration,
        "Pooled connections are recycled after this long.",
        group=DB,
    )

    # Logging and audit
    log_level: str = _var(
        "LOG_LEVEL",
        "info",
        _choice("debug", "info", "warn", "error", aliases={"warning": "warn"}),
        "``debug`` | ``info`` | ``warn`` | ``error``.",
        group=LOG,
    )
    log_format: str = _var(
        "LOG_FORMAT",
        "json",
        _choice("json", "text", aliases={"console": "text"}),
        "``json`` (one object per line) or ``text`` (``console`` is accepted for text).",
        group=LOG,
    )
    log_file: str = _var(
        "LOG_FILE", "", parse_str, "Append logs to this file instead of stdout.", group=LOG
    )
    access_log: str = _var(
        "ACCESS_LOG",
        "-",
        parse_str,
        "One line per HTTP request: ``-`` for stdout, a file path, or ``off``.",
        group=LOG,
    )
    audit_enabled: bool = _var("AUDIT_ENABLED", True, parse_bool, "Master switch.", group=LOG)
    audit_log_file: str = _var(
        "AUDIT_LOG_FILE",
        "./data/audit.log",
        parse_str,
        "JSONL audit file; empty disables only the file sink.",
        group=LOG,
    )
    audit_create_dir: bool = _var(
        "AUDIT_CREATE_DIR", True, parse_bool, "Create the audit file's directory.", group=LOG
    )
    audit_store_in_db: bool = _var(
        "AUDIT_STORE_IN_DB", True, parse_bool, "Also store audit events in the database.", group=LOG
    )

    # Proxy
    enforce_project_active: bool = _var(
        "LLM_PROXY_ENFORCE_PROJECT_ACTIVE",
        True,
        parse_bool,
        "Tokens of an inactive project get 403 ``project_inactive``.",
        group=PROXY,
    )
    active_cache_ttl: float = _var(
        "LLM_PROXY_ACTIVE_CACHE_TTL",
        5.0,
        parse_duration,
        "Backstop TTL of the in-process project cache (changes made through the API "
        "invalidate it at once).",
        group=PROXY,
    )
    active_cache_max: int = _var(
        "LLM_PROXY_ACTIVE_CACHE_MAX", 10000, parse_nonneg_int, "Project cache size.", group=PROXY
    )
    api_key_cache_ttl: float = _var(
        "LLM_PROXY_API_KEY_CACHE_TTL",
        30.0,
        parse_duration,
        "Backstop TTL of the decrypted provider-key cache.",
        group=PROXY,
    )
    api_key_cache_max: int = _var(
        "LLM_PROXY_API_KEY_CACHE_MAX",
        10000,
        parse_nonneg_int,
        "Provider-key cache size.",
        group=PROXY,
    )
    token_cache_ttl: float = _var(
        "TOKEN_CACHE_TTL",
        300.0,
        parse_duration,
        "Backstop TTL of the validated-token cache (revocations invalidate it at once).",
        group=PROXY,
    )
    token_cache_max: int = _var(
        "TOKEN_CACHE_MAX", 10000, parse_nonneg_int, "Validated-token cache size.", group=PROXY
    )
    usage_stats_buffer_size: int = _var(
        "USAGE_STATS_BUFFER_SIZE",
        1000,
        parse_positive_int,
        "Usage updates batched before a flush is forced.",
        group=PROXY,
    )
    usage_flush_interval: float = _var(
        "USAGE_FLUSH_INTERVAL",
        5.0,
        parse_duration,
        "How often batched usage counts are written.",
        group=PROXY,
    )
    upstream_connect_timeout: float = _var(
        "UPSTREAM_CONNECT_TIMEOUT",
        10.0,
        parse_duration,
        "TCP+TLS connect timeout to providers.",
        group=PROXY,
    )
    upstream_idle_timeout: float = _var(
        "UPSTREAM_IDLE_TIMEOUT",
        300.0,
        parse_duration,
        "Longest silence allowed between two chunks of an upstream body.",
        group=PROXY,
    )
    circuit_breaker_threshold: int = _var(
        "CIRCUIT_BREAKER_THRESHOLD",
        5,
        parse_nonneg_int,
        "Consecutive 502/503/504 that open a provider's circuit (0 disables).",
        group=PROXY,
    )
    circuit_breaker_cooldown: float = _var(
        "CIRCUIT_BREAKER_COOLDOWN",
        30.0,
        parse_duration,
        "How long an open circuit refuses requests.",
        group=PROXY,
    )
    stream_include_usage: bool = _var(
        "STREAM_INCLUDE_USAGE",
        True,
        parse_bool,
        "Ask OpenAI chat completions streams for a usage chunk (hidden from clients that "
        "did not ask).",
        group=PROXY,
    )
    cors_allowed_origins: tuple[str, ...] = _var(
        "CORS_ALLOWED_ORIGINS",
        ("*",),
        parse_csv,
        "Origins answered on preflight (``*`` for any), comma-separated.",
        group=PROXY,
    )
    cors_allowed_methods: tuple[str, ...] = _var(
        "CORS_ALLOWED_METHODS",
        ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"),
        parse_csv,
        "``Access-Control-Allow-Methods`` on preflight.",
        group=PROXY,
    )
    cors_allowed_headers: tuple[str, ...] = _var(
        "CORS_ALLOWED_HEADERS",
        ("Authorization", "Content-Type", "X-Requested-With"),
        parse_csv,
        "Default ``Access-Control-Allow-Headers`` when the preflight names none.",
        group=PROXY,
    )
    cors_max_age: float = _var(
        "CORS_MAX_AGE", 86400.0, parse_duration, "``Access-Control-Max-Age``.", group=PROXY
    )

    # Rate limits
    global_rate_limit: int = _var(
        "GLOBAL_RATE_LIMIT",
        0,
        parse_nonneg_int,
        "Requests per window across all tokens (0 = off).",
        group=LIMITS,
    )
    ip_rate_limit: int = _var(
        "IP_RATE_LIMIT",
        0,
        parse_nonneg_int,
        "Requests per window per client IP (0 = off).",
        group=LIMITS,
    )
    trusted_proxies: tuple[str, ...] = _var(
        "TRUSTED_PROXIES",
        (),
        parse_trusted_proxies,
        "Comma-separated addresses and CIDR networks of the proxies in front of "
        "llmproxy (``unix``: connections over a UNIX socket). When set, the client "
        "address (``IP_RATE_LIMIT``, logs, audit) is what these proxies put in "
        "``X-Forwarded-For``/``X-Real-IP``, and other peers' headers are ignored; "
        "when empty, the first ``X-Forwarded-For`` entry is believed, whoever sent it.",
        group=LIMITS,
    )
    token_rate_limit: int = _var(
        "TOKEN_RATE_LIMIT",
        0,
        parse_nonneg_int,
        "Requests per window per token (0 = off; ``DISTRIBUTED_RATE_LIMIT_MAX`` when "
        "distributed limiting is enabled and this is 0).",
        group=LIMITS,
    )
    distributed_rate_limit_enabled: bool = _var(
        "DISTRIBUTED_RATE_LIMIT_ENABLED",
        False,
        parse_bool,
        "Keep rate-limit counters in Redis so every instance shares them.",
        group=LIMITS,
    )
    distributed_rate_limit_prefix: str = _var(
        "DISTRIBUTED_RATE_LIMIT_PREFIX", "ratelimit:", parse_str, "Redis key prefix.", group=LIMITS
    )
    distributed_rate_limit_key_secret: str = _var(
        "DISTRIBUTED_RATE_LIMIT_KEY_SECRET",
        "",
        parse_str,
        "HMAC secret hiding token ids in Redis keys.",
        group=LIMITS,
        secret=True,
    )
    distributed_rate_limit_window: float = _var(
        "DISTRIBUTED_RATE_LIMIT_WINDOW",
        60.0,
        parse_duration,
        "Rate-limit window length.",
        group=LIMITS,
    )
    distributed_rate_limit_max: int = _var(
        "DISTRIBUTED_RATE_LIMIT_MAX",
        60,
        parse_nonneg_int,
        "Per-token requests per window when distributed limiting is enabled.",
        group=LIMITS,
    )
    distributed_rate_limit_fallback: bool = _var(
        "DISTRIBUTED_RATE_LIMIT_FALLBACK",
        True,
        parse_bool,
        "Fall back to in-process counters when Redis is unavailable.",
        group=LIMITS,
    )
    rate_limit_fail_open: bool = _var(
        "RATE_LIMIT_FAIL_OPEN",
        True,
        parse_bool,
        "Admit requests when the rate-limit store is unavailable (quotas always fail closed).",
        group=LIMITS,
    )
    token_cleanup_interval: float = _var(
        "TOKEN_CLEANUP_INTERVAL",
        3600.0,
        parse_duration,
        "Accepted for compatibility.",
        group=LIMITS,
    )

    # HTTP cache
    http_cache_enabled: bool = _var(
        "HTTP_CACHE_ENABLED", True, parse_bool, "Response cache on/off.", group=CACHE
    )
    http_cache_backend: str = _var(
        "HTTP_CACHE_BACKEND",
        "memory",
        _choice("memory", "redis", aliases={"in-memory": "memory"}),
        "``memory`` | ``redis``.",
        group=CACHE,
    )
    http_cache_stream_responses: bool = _var(
        "HTTP_CACHE_STREAM_RESPONSES",
        False,
        parse_bool,
        "Store completed streams for opted-in requests and replay them as streams.",
        group=CACHE,
    )
    http_cache_shared: bool = _var(
        "HTTP_CACHE_SHARED",
        False,
        parse_bool,
        "Share ``public`` entries across projects (the Go project's behaviour). "
        "Off: each project has its own entries.",
        group=CACHE,
    )
    http_cache_max_entries: int = _var(
        "HTTP_CACHE_MAX_ENTRIES", 10000, parse_positive_int, "In-memory LRU entries.", group=CACHE
    )
    http_cache_max_bytes: int = _var(
        "HTTP_CACHE_MAX_BYTES",
        268435456,
        parse_positive_int,
        "In-memory LRU total bytes.",
        group=CACHE,
    )
    http_cache_max_object_bytes: int = _var(
        "HTTP_CACHE_MAX_OBJECT_BYTES",
        1048576,
        parse_positive_int,
        "Largest response stored.",
        group=CACHE,
    )
    http_cache_default_ttl: float = _var(
        "HTTP_CACHE_DEFAULT_TTL",
        0.0,
        parse_duration,
        "TTL for shared-cacheable responses that carry no max-age (0 = do not store).",
        group=CACHE,
    )
    redis_cache_url: str = _var(
        "REDIS_CACHE_URL",
        "",
        parse_str,
        "Redis URL for the cache; default ``redis://REDIS_ADDR/REDIS_DB``.",
        group=CACHE,
        secret=True,
    )
    redis_cache_key_prefix: str = _var(
        "REDIS_CACHE_KEY_PREFIX", "llmproxy:cache:", parse_str, "Cache key prefix.", group=CACHE
    )
    redis_cache_pool_size: int = _var(
        "REDIS_CACHE_POOL_SIZE",
        4,
        parse_positive_int,
        "Redis connections for the cache.",
        group=CACHE,
    )
    redis_cache_timeout: float = _var(
        "REDIS_CACHE_TIMEOUT",
        0.25,
        parse_duration,
        "Deadline of every cache call; past it the request is a miss.",
        group=CACHE,
    )
    redis_scan_count: int = _var(
        "REDIS_SCAN_COUNT", 2048, parse_positive_int, "Batch size for purges.", group=CACHE
    )
    cache_stats_buffer_size: int = _var(
        "CACHE_STATS_BUFFER_SIZE",
        1000,
        parse_positive_int,
        "Cache-hit counts batched before a flush is forced.",
        group=CACHE,
    )

    # Events
    observability_enabled: bool = _var(
        "OBSERVABILITY_ENABLED", True, parse_bool, "Publish one event per request.", group=EVENTS
    )
    observability_buffer_size: int = _var(
        "OBSERVABILITY_BUFFER_SIZE",
        1000,
        parse_positive_int,
        "Bounded event queue; overflow is counted.",
        group=EVENTS,
    )
    observability_max_request_body_bytes: int = _var(
        "OBSERVABILITY_MAX_REQUEST_BODY_BYTES",
        65536,
        parse_nonneg_int,
        "Request body bytes kept in an event.",
        group=EVENTS,
    )
    observability_max_response_body_bytes: int = _var(
        "OBSERVABILITY_MAX_RESPONSE_BODY_BYTES",
        262144,
        parse_nonneg_int,
        "Response body bytes kept in an event.",
        group=EVENTS,
    )
    event_bus: str = _var(
        "LLM_PROXY_EVENT_BUS",
        "in-memory",
        _choice("in-memory", "redis-streams", aliases={"memory": "in-memory"}),
        "``in-memory`` | ``redis-streams``.",
        group=EVENTS,
    )
    file_event_log: str = _var(
        "FILE_EVENT_LOG", "", parse_str, "Write every event as a JSON line here.", group=EVENTS
    )
    redis_addr: str = _var(
        "REDIS_ADDR", "localhost:6379", parse_str, "Shared Redis ``host:port``.", group=EVENTS
    )
    redis_db: int = _var("REDIS_DB", 0, parse_nonneg_int, "Redis database number.", group=EVENTS)
    redis_password: str = _var(
        "REDIS_PASSWORD", "", parse_str, "Redis password.", group=EVENTS, secret=True
    )
    invalidation_pubsub: bool = _var(
        "INVALIDATION_PUBSUB",
        False,
        parse_bool,
        "Share cache invalidations (revocations, token and project changes) with other "
        "instances over Redis pub/sub at ``REDIS_ADDR``; always on when Redis is used for "
        "rate limits, the response cache or events.",
        group=EVENTS,
    )
    redis_stream_key: str = _var(
        "REDIS_STREAM_KEY", "llm-proxy-events", parse_str, "Event stream name.", group=EVENTS
    )
    redis_consumer_group: str = _var(
        "REDIS_CONSUMER_GROUP",
        "llm-proxy-dispatchers",
        parse_str,
        "Consumer group of dispatchers.",
        group=EVENTS,
    )
    redis_consumer_name: str = _var(
        "REDIS_CONSUMER_NAME", "", parse_str, "Consumer name (generated when empty).", group=EVENTS
    )
    redis_stream_max_len: int = _var(
        "REDIS_STREAM_MAX_LEN",
        10000,
        parse_nonneg_int,
        "Approximate stream length cap (0 = none).",
        group=EVENTS,
    )
    redis_stream_block_time: float = _var(
        "REDIS_STREAM_BLOCK_TIME", 5.0, parse_duration, "XREADGROUP block time.", group=EVENTS
    )
    redis_stream_claim_time: float = _var(
        "REDIS_STREAM_CLAIM_TIME",
        30.0,
        parse_duration,
        "Idle time after which another consumer's pending events are claimed.",
        group=EVENTS,
    )
    redis_stream_batch_size: int = _var(
        "REDIS_STREAM_BATCH_SIZE", 100, parse_positive_int, "Events read per call.", group=EVENTS
    )
    log_binary_responses: bool = _var(
        "LOG_BINARY_RESPONSES", False, parse_bool, "Keep binary bodies in events.", group=EVENTS
    )

    # Metrics
    enable_metrics: bool = _var(
        "ENABLE_METRICS", True, parse_bool, "Serve the metrics endpoints.", group=METRICS
    )
    metrics_path: str = _var(
        "METRICS_PATH",
        "/metrics",
        parse_str,
        "JSON metrics path; Prometheus text is at ``<path>/prometheus``.",
        group=METRICS,
    )
    metrics_token: str = _var(
        "METRICS_TOKEN",
        "",
        parse_str,
        "When set, metrics require ``Authorization: Bearer <token>``.",
        group=METRICS,
        secret=True,
    )

    def __repr__(self) -> str:
        shown = []
        for f in attrs.fields(Config):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "<set>"
            shown.append(f"{f.name}={value!r}")
        return f"Config({', '.join(shown)})"

    @property
    def effective_log_level(self) -> str:
        return "debug" if self.debug else self.log_level

    @property
    def redis_host_port(self) -> tuple[str, int]:
        host, _, port = self.redis_addr.rpartition(":")
        return (host or "localhost", int(port) if port.isdigit() else 6379)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str],
        overrides: Mapping[str, Any] | None = None,
        require_management_token: bool = True,
    ) -> Config:
        """
        Build a L{Config} from C{environ} (usually C{os.environ}) and
        C{overrides} (already-parsed values keyed by attribute name).
        Commands that never serve HTTP (``llmproxy migrate``) pass
        C{require_management_token=False}.

        @raise ConfigError: naming the first bad variable.
        """
        values: dict[str, Any] = {}
        for f in attrs.fields(cls):
            env = f.metadata["env"]
            if env in environ:
                raw = environ[env]
                try:
                    values[f.name] = f.metadata["parse"](raw)
                except ValueError as e:
                    raise ConfigError(f"{env}: {e}")
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = value
        config = cls(**values)
        config.validate(require_management_token)
        return config

    def validate(self, require_management_token: bool = True) -> None:
        if require_management_token and not self.management_token:
            raise ConfigError("MANAGEMENT_TOKEN: required (set a long random secret)")
        if self.db_driver in ("postgres", "mysql") and not self.database_url:
            raise ConfigError(f"DATABASE_URL: required when DB_DRIVER={self.db_driver}")
        if self.require_encryption_key and not self.encryption_key:
            raise ConfigError("ENCRYPTION_KEY: required because REQUIRE_ENCRYPTION_KEY=true")
        if not self.metrics_path.startswith("/") or self.metrics_path.rstrip("/") == "":
            raise ConfigError(
                f"METRICS_PATH: must start with / and not be /: {self.metrics_path!r}"
            )


def env_names() -> list[str]:
    return [f.metadata["env"] for f in attrs.fields(Config)]


def render_rst() -> str:
    """The body of ``docs/configuration.rst``, generated from L{Config}."""
    out = [
        "Configuration",
        "=============",
        "",
        ".. This file is generated by ``python -m llmproxy.config > docs/configuration.rst``;",
        "   a test fails when it drifts from ``llmproxy/config.py``.",
        "",
        "Every setting is an environment variable (the names and defaults of the Go",
        "llm-proxy, so an existing ``.env`` keeps working). Plugin options",
        "(``twistd llmproxy --help``) override them. A value that cannot be parsed stops",
        "startup with one line naming the variable and a non-zero exit status.",
        "",
        "Durations take Go syntax (``500ms``, ``30s``, ``1m30s``, ``24h``) or plain seconds.",
        "Booleans take ``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``t``/``f``).",
        "",
    ]
    groups: dict[str, list[attrs.Attribute[Any]]] = {}
    for f in attrs.fields(Config):
        groups.setdefault(f.metadata["group"], []).append(f)
    for group, fields in groups.items():
        out += [group, "-" * len(group), ""]
        out += [".. list-table::", "   :header-rows: 1", "   :widths: 30 20 50", ""]
        out += ["   * - Variable", "     - Default", "     - Meaning"]
        for f in fields:
            default = f.default
            if isinstance(default, bool):
                shown = "true" if default else "false"
            elif isinstance(default, tuple):
                shown = ",".join(default) or "(empty)"
            elif default == "":
                shown = "(empty)"
            else:
                shown = str(default)
            out += [
                f"   * - ``{f.metadata['env']}``",
                f"     - ``{shown}``" if shown != "(empty)" else "     - (empty)",
                f"     - {f.metadata['doc']}",
            ]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render_rst())
