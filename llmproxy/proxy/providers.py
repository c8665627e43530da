"""
The providers file (C{API_CONFIG_PATH}): which upstream API this process
serves, and the request policy that guards it.

The schema is the Go llm-proxy's. Two differences, both on purpose:

  - a file that exists but is broken (bad YAML, missing keys, unknown
    C{default_api}, bad durations or glob patterns) stops the daemon with a
    L{ConfigError} naming the file and the problem; the Go project quietly
    fell back to the built-in OpenAI provider, unrestricted. Only a file that
    does not exist selects the built-in provider;
  - every setting has an effect (see docs/providers.rst for how each
    timeout and connection setting maps onto Twisted).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.logger import Logger

from llmproxy.config import Config, ConfigError, parse_duration
from llmproxy.proxy.policy import BadPattern, validate_glob

log = Logger()

#: Endpoints of the built-in OpenAI provider (the Go project's list).
OPENAI_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/edits",
    "/v1/fine-tunes",
    "/v1/files",
    "/v1/images/generations",
    "/v1/audio/transcriptions",
    "/v1/moderations",
)
OPENAI_METHODS = ("GET", "POST", "DELETE")

#: Go's net/http default when C{max_idle_conns_per_host} is 0.
GO_DEFAULT_IDLE_PER_HOST = 2


@attrs.frozen
class Timeouts:
    """
    Provider timeouts, in seconds.

    @ivar request: longest silence between two chunks of the upstream answer
        (headers included): a stalled upstream is cut, a long stream that keeps
        talking never is. None: C{UPSTREAM_IDLE_TIMEOUT}.
    @ivar response_header: longest wait for the upstream's status line and
        headers once the request is sent (0: no limit).
    @ivar idle_connection: how long an unused keep-alive connection to the
        provider stays in the pool (Twisted C{cachedConnectionTimeout}).
    @ivar flush_interval: the longest a chunk may wait before it is written
        to the client. llmproxy writes every chunk as soon as it arrives, so
        this bound always holds; the value is validated and reported.
    """

    request: float | None = None
    response_header: float = 30.0
    idle_connection: float = 90.0
    flush_interval: float = 0.1


@attrs.frozen
class ConnectionLimits:
    """Keep-alive pool sizes, as in Go's C{http.Transport}."""

    max_idle_conns: int = 100
    max_idle_conns_per_host: int = 20

    @property
    def max_persistent_per_host(self) -> int:
        """
        Twisted's C{HTTPConnectionPool.maxPersistentPerHost}.

        One provider is one host, so the total and per-host limits collapse
        into the smaller one; 0 means what it means in Go (no total limit;
        per host, Go's default of 2).
        """
        per_host = self.max_idle_conns_per_host or GO_DEFAULT_IDLE_PER_HOST
        if self.max_idle_conns > 0:
            return min(per_host, self.max_idle_conns)
        return per_host


@attrs.frozen(hash=False)
class Provider:
    """One upstream API and its request policy."""

    name: str
    base_url: str
    scheme: str
    host: str
    port: int
    allowed_endpoints: tuple[str, ...]
    #: upper-case method names
    allowed_methods: tuple[str, ...]
    timeouts: Timeouts = Timeouts()
    connection: ConnectionLimits = ConnectionLimits()
    #: top-level JSON body key -> Go path.Match patterns, in file order
    param_whitelist: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    #: exact Origin values; empty: any origin
    allowed_origins: tuple[str, ...] = ()
    #: lower-case header names every request must carry
    required_headers: tuple[str, ...] = ()
    allowed_methods_bytes: frozenset[bytes] = attrs.field(init=False)
    allowed_endpoints_bytes: tuple[bytes, ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(
            self,
            "allowed_methods_bytes",
            frozenset(m.upper().encode("ascii") for m in self.allowed_methods),
        )
        object.__setattr__(
            self,
            "allowed_endpoints_bytes",
            tuple(e.encode("utf-8") for e in self.allowed_endpoints),
        )

    @property
    def origin(self) -> str:
        """C{scheme://host[:port]}: where requests go (their path is kept as received)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")

    def idle_timeout(self, config: Config) -> float:
        """Silence allowed between upstream chunks: C{timeouts.request} or the daemon default."""
        if self.timeouts.request is not None:
            return self.timeouts.request
        return config.upstream_idle_timeout


@attrs.frozen(hash=False)
class ProvidersConfig:
    """The parsed providers file (or the built-in provider)."""

    #: None when the built-in OpenAI provider is used
    path: str | None
    apis: Mapping[str, Provider]
    default_api: str | None = None
    #: non-fatal remarks (unknown keys, ignored base URL paths) to log at startup
    warnings: tuple[str, ...] = ()

    def select(self, name: str) -> Provider:
        """C{name} if defined, else C{default_api}; otherwise a L{ConfigError}."""
        if name in self.apis:
            return self.apis[name]
        where = self.path or "the built-in providers"
        if self.default_api:
            return self.apis[self.default_api]
        raise ConfigError(
            f"DEFAULT_API_PROVIDER: {name!r} is not defined in {where} "
            f"(defined: {', '.join(sorted(self.apis))}) and there is no default_api"
        )


def parse_base_url(value: str) -> tuple[str, str, int, str]:
    """C{(scheme, host, port, ignored path)} of a provider base URL, or ValueError."""
    split = urlsplit(value.strip())
    scheme = split.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"base_url must start with http:// or https://, got {value!r}")
    if not split.hostname:
        raise ValueError(f"base_url has no host: {value!r}")
    try:
        port = split.port
    except ValueError:
        raise ValueError(f"base_url has a bad port: {value!r}")
    if port is None:
        port = 443 if scheme == "https" else 80
    return scheme, split.hostname, port, split.path.rstrip("/")


def builtin_providers(config: Config) -> ProvidersConfig:
    """The built-in OpenAI provider, used only when the providers file does not exist."""
    try:
        scheme, host, port, path = parse_base_url(config.openai_api_url)
    except ValueError as e:
        raise ConfigError(f"OPENAI_API_URL: {e}")
    warnings: tuple[str, ...] = ()
    if path:
        warnings = (
            f"OPENAI_API_URL: the path {path!r} is ignored; requests keep the path they "
            "arrived with (e.g. /v1/chat/completions)",
        )
    provider = Provider(
        name="openai",
        base_url=config.openai_api_url,
        scheme=scheme,
        host=host,
        port=port,
        allowed_endpoints=OPENAI_ENDPOINTS,
        allowed_methods=OPENAI_METHODS,
        timeouts=Timeouts(
            request=None,
            response_header=config.request_timeout,
            idle_connection=90.0,
            flush_interval=0.1,
        ),
        connection=ConnectionLimits(100, 20),
    )
    return ProvidersConfig(
        path=None, apis={"openai": provider}, default_api="openai", warnings=warnings
    )


class _Invalid(Exception):
    """One problem in the file; C{where} is a dotted path such as apis.openai.timeouts."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)


_TOP_KEYS = {"default_api", "apis"}
_PROVIDER_KEYS = {
    "base_url",
    "allowed_endpoints",
    "allowed_methods",
    "timeouts",
    "connection",
    "param_whitelist",
    "allowed_origins",
    "required_headers",
}
_TIMEOUT_KEYS = {"request", "response_header", "idle_connection", "flush_interval"}
_CONNECTION_KEYS = {"max_idle_conns", "max_idle_conns_per_host"}


def _unknown(where: str, mapping: Mapping[Any, Any], known: set[str], notes: list[str]) -> None:
    for key in mapping:
        if key not in known:
            notes.append(
                f"{where}: unknown key {key!r} ignored (known: {', '.join(sorted(known))})"
            )


def _mapping(where: str, value: Any, required: bool = False) -> Mapping[str, Any]:
    if value is None:
        if required:
            raise _Invalid(where, "missing")
        return {}
    if not isinstance(value, dict):
        raise _Invalid(where, f"must be a mapping, got {type(value).__name__}")
    return value


def _str_list(where: str, value: Any, required: bool) -> tuple[str, ...]:
    if value is None:
        if required:
            raise _Invalid(where, "missing (a list with at least one entry)")
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _Invalid(where, f"must be a list, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise _Invalid(f"{where}[{i}]", f"must be a string, got {item!r}")
        out.append(str(item).strip())
    if required and not out:
        raise _Invalid(where, "must list at least one entry")
    return tuple(out)


def _duration(where: str, value: Any) -> float:
    if isinstance(value, bool):
        raise _Invalid(where, f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise _Invalid(where, f"negative duration: {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise _Invalid(where, f"not a duration: {value!r}")
    try:
        return parse_duration(value)
    except ValueError as e:
        raise _Invalid(where, str(e))


def _count(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Invalid(where, f"must be a whole number >= 0, got {value!r}")
    return value


def _provider(name: str, raw: Any, notes: list[str]) -> Provider:
    where = f"apis.{name}"
    body = _mapping(where, raw, required=True)
    _unknown(where, body, _PROVIDER_KEYS, notes)

    base_url = body.get("base_url")
    if not isinstance(base_url, str) or not base_url.strip():
        raise _Invalid(f"{where}.base_url", "missing (e.g. https://api.openai.com)")
    try:
        scheme, host, port, path = parse_base_url(base_url)
    except ValueError as e:
        raise _Invalid(f"{where}.base_url", str(e))
    if path:
        notes.append(
            f"{where}.base_url: the path {path!r} is ignored; requests keep the path they "
            "arrived with"
        )

    endpoints = _str_list(f"{where}.allowed_endpoints", body.get("allowed_endpoints"), True)
    for i, endpoint in enumerate(endpoints):
        if not endpoint.startswith("/"):
            raise _Invalid(
                f"{where}.allowed_endpoints[{i}]", f"must start with '/', got {endpoint!r}"
            )
    methods = _str_list(f"{where}.allowed_methods", body.get("allowed_methods"), True)
    for i, method in enumerate(methods):
        if not method.isascii() or not method.isalpha():
            raise _Invalid(f"{where}.allowed_methods[{i}]", f"not an HTTP method: {method!r}")
    methods = tuple(dict.fromkeys(m.upper() for m in methods))

    raw_timeouts = _mapping(f"{where}.timeouts", body.get("timeouts"))
    _unknown(f"{where}.timeouts", raw_timeouts, _TIMEOUT_KEYS, notes)
    defaults = Timeouts()
    timeouts = Timeouts(
        request=(
            _duration(f"{where}.timeouts.request", raw_timeouts["request"])
            if raw_timeouts.get("request") is not None
            else None
        ),
        **{
            key: (
                _duration(f"{where}.timeouts.{key}", raw_timeouts[key])
                if raw_timeouts.get(key) is not None
                else getattr(defaults, key)
            )
            for key in ("response_header", "idle_connection", "flush_interval")
        },
    )

    raw_conn = _mapping(f"{where}.connection", body.get("connection"))
    _unknown(f"{where}.connection", raw_conn, _CONNECTION_KEYS, notes)
    conn_defaults = ConnectionLimits()
    connection = ConnectionLimits(
        **{
            key: (
                _count(f"{where}.connection.{key}", raw_conn[key])
                if raw_conn.get(key) is not None
                else getattr(conn_defaults, key)
            )
            for key in ("max_idle_conns", "max_idle_conns_per_host")
        }
    )

    whitelist: dict[str, tuple[str, ...]] = {}
    raw_whitelist = _mapping(f"{where}.param_whitelist", body.get("param_whitelist"))
    for key, patterns in raw_whitelist.items():
        at = f"{where}.param_whitelist.{key}"
        values = _str_list(at, patterns, required=True)
        for i, pattern in enumerate(values):
            try:
                validate_glob(pattern)
            except BadPattern as e:
                raise _Invalid(f"{at}[{i}]", f"bad glob pattern {pattern!r}: {e}")
        whitelist[str(key)] = values

    origins = _str_list(f"{where}.allowed_origins", body.get("allowed_origins"), False)
    for i, origin in enumerate(origins):
        if origin == "*":
            raise _Invalid(
                f"{where}.allowed_origins[{i}]",
                "'*' is not an origin; leave allowed_origins empty to allow any origin",
            )
    required = _str_list(f"{where}.required_headers", body.get("required_headers"), False)

    return Provider(
        name=name,
        base_url=base_url.strip(),
        scheme=scheme,
        host=host,
        port=port,
        allowed_endpoints=endpoints,
        allowed_methods=methods,
        timeouts=timeouts,
        connection=connection,
        param_whitelist=whitelist,
        allowed_origins=origins,
        required_headers=tuple(dict.fromkeys(h.lower() for h in required if h)),
    )


def parse_providers(text: str, path: str) -> ProvidersConfig:
    """Parse and validate the YAML C{text} of C{path}; L{ConfigError} on any problem."""
    import yaml  # here: without a providers file the daemon never loads it

    try:
        raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}")
    notes: list[str] = []
    try:
        top = _mapping("", raw)
        if raw is None:
            raise _Invalid("", "the file is empty (it needs an apis: mapping)")
        _unknown("top level", top, _TOP_KEYS, notes)
        apis_raw = _mapping("apis", top.get("apis"), required=True)
        if not apis_raw:
            raise _Invalid("apis", "no providers defined")
        apis = {str(name): _provider(str(name), body, notes) for name, body in apis_raw.items()}
        default_api = top.get("default_api")
        if default_api is not None:
            if not isinstance(default_api, str):
                raise _Invalid("default_api", f"must be a provider name, got {default_api!r}")
            default_api = default_api.strip() or None
        if default_api is not None and default_api not in apis:
            raise _Invalid(
                "default_api",
                f"{default_api!r} is not one of the apis ({', '.join(sorted(apis))})",
            )
    except _Invalid as e:
        raise ConfigError(f"{path}: {e}")
    return ProvidersConfig(path=path, apis=apis, default_api=default_api, warnings=tuple(notes))


def load_providers_config(config: Config) -> ProvidersConfig:
    """The providers file at C{API_CONFIG_PATH}, or the built-in provider if it does not exist."""
    path = config.api_config_path
    if not os.path.exists(path):
        return builtin_providers(config)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the providers file: {e}")
    return parse_providers(text, path)


def load_providers(config: Config) -> Provider:
    """
    The provider this process serves: C{DEFAULT_API_PROVIDER}, else the
    file's C{default_api}.

    @raise ConfigError: the file is invalid, or names no usable provider.
    """
    providers = load_providers_config(config)
    name = config.default_api_provider
    if providers.path is None and name != "openai":
        raise ConfigError(
            f"DEFAULT_API_PROVIDER: {name!r} needs a providers file, but "
            f"{config.api_config_path} does not exist (the built-in provider is 'openai')"
        )
    provider = providers.select(name)
    for note in providers.warnings:
        log.warn("providers: {note}", note=note)
    if provider.name != name:
        log.warn(
            "DEFAULT_API_PROVIDER {wanted!r} is not in {path}; using default_api {name!r}",
            wanted=name,
            path=providers.path,
            name=provider.name,
        )
    log.info(
        "provider {name} at {origin} ({source})",
        name=provider.name,
        origin=provider.origin,
        source=providers.path or "built-in, no providers file",
    )
    return provider
