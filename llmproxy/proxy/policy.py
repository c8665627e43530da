"""
The provider's request policy, checked on every C{/v1} request before the
token: method, endpoint prefix, parameter whitelist, origin; plus the CORS
answers.

The functions are pure and cheap (no JSON parsing unless a whitelist
applies); L{ProviderPolicy} applies them to a twisted.web request for
L{llmproxy.proxy.resource.ProxyResource}.

Differences from the Go llm-proxy (see docs/providers.rst):

  - the parameter whitelist is checked on POST, PUT and PATCH whenever the
    body is a JSON object, whatever the Content-Type: the Go project only
    checked C{Content-Type: application/json} exactly, so adding
    C{; charset=utf-8} (or leaving the header out) skipped the whitelist;
  - C{required_headers} enforces every header it lists, not only C{origin};
  - a path with a C{.} or C{..} segment is refused as C{endpoint_not_found},
    so C{/v1/chat/completions/../files} cannot escape an allowed prefix;
  - C{CORS_ALLOWED_ORIGINS}, C{CORS_ALLOWED_METHODS}, C{CORS_ALLOWED_HEADERS}
    and C{CORS_MAX_AGE} are honoured (their defaults give the Go answers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import attrs
from twisted.web.http_headers import Headers

if TYPE_CHECKING:
    from twisted.web.server import Request

    from llmproxy.config import Config
    from llmproxy.proxy.providers import Provider


# -- Go path.Match --------------------------------------------------------------------------


class BadPattern(ValueError):
    """Go's C{path.ErrBadPattern}: a malformed glob."""


def _scan_chunk(pattern: str) -> tuple[bool, str, str]:
    star = False
    while pattern and pattern[0] == "*":
        pattern = pattern[1:]
        star = True
    in_range = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 < len(pattern):
                i += 1
        elif c == "[":
            in_range = True
        elif c == "]":
            in_range = False
        elif c == "*" and not in_range:
            break
        i += 1
    return star, pattern[:i], pattern[i:]


def _get_esc(chunk: str) -> tuple[str, str]:
    if not chunk or chunk[0] in "-]":
        raise BadPattern("bad character range")
    if chunk[0] == "\\":
        chunk = chunk[1:]
        if not chunk:
            raise BadPattern("trailing backslash in a character class")
    r, rest = chunk[0], chunk[1:]
    if not rest:
        raise BadPattern("unclosed character class '['")
    return r, rest


def _match_chunk(chunk: str, s: str) -> tuple[str, bool]:
    """Go's matchChunk: (rest of s, matched); raises BadPattern."""
    failed = False
    while chunk:
        if not failed and not s:
            failed = True
        c = chunk[0]
        if c == "[":
            r = ""
            if not failed:
                r, s = s[0], s[1:]
            chunk = chunk[1:]
            negated = False
            if chunk and chunk[0] == "^":
                negated = True
                chunk = chunk[1:]
            matched = False
            nrange = 0
            while True:
                if chunk and chunk[0] == "]" and nrange > 0:
                    chunk = chunk[1:]
                    break
                lo, chunk = _get_esc(chunk)
                hi = lo
                if chunk[0] == "-":
                    hi, chunk = _get_esc(chunk[1:])
                if not failed and lo <= r <= hi:
                    matched = True
                nrange += 1
            if matched == negated:
                failed = True
        elif c == "?":
            if not failed:
                if s[0] == "/":
                    failed = True
                s = s[1:]
            chunk = chunk[1:]
        else:
            if c == "\\":
                chunk = chunk[1:]
                if not chunk:
                    raise BadPattern("trailing backslash")
            if not failed:
                if chunk[0] != s[0]:
                    failed = True
                s = s[1:]
            chunk = chunk[1:]
    if failed:
        return "", False
    return s, True


def go_path_match(pattern: str, name: str) -> bool:
    """
    Go's C{path.Match}: C{*} is any run of characters except C{/}, C{?} one
    character except C{/}, C{[...]} a class (C{[^...]} negated, C{a-z} ranges),
    C{\\} escapes; the whole name must match.

    @raise BadPattern: for a malformed pattern (as Go reports it).
    """
    while pattern:
        star, chunk, pattern = _scan_chunk(pattern)
        if star and not chunk:
            return "/" not in name
        t, ok = _match_chunk(chunk, name)
        if ok and (not t or pattern):
            name = t
            continue
        if star:
            advanced = False
            i = 0
            while i < len(name) and name[i] != "/":
                t, ok = _match_chunk(chunk, name[i + 1 :])
                if ok:
                    if not pattern and t:
                        i += 1
                        continue
                    name = t
                    advanced = True
                    break
                i += 1
            if advanced:
                continue
        while pattern:
            _, chunk, pattern = _scan_chunk(pattern)
            _match_chunk(chunk, "")
        return False
    return not name


def validate_glob(pattern: str) -> None:
    """Raise L{BadPattern} if Go would reject C{pattern}."""
    # Go reports a bad pattern only while matching; matching the empty string
    # and a long probe walks every chunk.
    go_path_match(pattern, "")
    rest = pattern
    while rest:
        _, chunk, rest = _scan_chunk(rest)
        _match_chunk(chunk, "")


# -- Go's fmt %v of a decoded JSON value ------------------------------------------------------


def _go_float(value: float) -> str:
    """
    C{fmt.Sprint(float64)}: Go's shortest digits (as Python's repr), in
    exponent form when the decimal exponent is below -4 or at least 6
    (C{1e+06}, C{1.5e-05}), else plain (C{123456}, C{0.5}).
    """
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return sign + "0"
    _, digit_tuple, exponent = Decimal(repr(abs(value))).as_tuple()
    digits = "".join(map(str, digit_tuple)).lstrip("0")
    point = len("".join(map(str, digit_tuple))) + int(exponent)
    point -= len("".join(map(str, digit_tuple))) - len(digits)
    digits = digits.rstrip("0")
    exp = point - 1
    if exp < -4 or exp >= 6:
        head, tail = digits[0], digits[1:]
        return f"{sign}{head}{'.' + tail if tail else ''}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return f"{sign}{digits}{'0' * (point - len(digits))}"
    return f"{sign}{digits[:point]}.{digits[point:]}"


def go_format(value: Any) -> str:
    """How Go's C{fmt} prints a value decoded from JSON into C{interface{}}."""
    if isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "<nil>"
    if isinstance(value, (int, float)):
        return _go_float(float(value))
    if isinstance(value, list):
        return "[" + " ".join(go_format(v) for v in value) + "]"
    if isinstance(value, dict):
        items = " ".join(f"{k}:{go_format(value[k])}" for k in sorted(value))
        return f"map[{items}]"
    return str(value)


# -- the checks -------------------------------------------------------------------------------


@attrs.frozen
class PolicyError:
    """A refusal: the proxy answers C{status} with C{{"error", "code"}} (and C{description})."""

    status: int
    error: str
    code: str
    description: str = ""

    def body(self) -> dict[str, str]:
        out = {"error": self.error}
        if self.description:
            out["description"] = self.description
        out["code"] = self.code
        return out


METHOD_NOT_ALLOWED = PolicyError(405, "Method not allowed", "method_not_allowed")
ENDPOINT_NOT_FOUND = PolicyError(404, "Endpoint not found", "endpoint_not_found")
ORIGIN_REQUIRED = PolicyError(400, "Origin header required", "origin_required")
ORIGIN_NOT_ALLOWED = PolicyError(403, "Origin not allowed", "origin_not_allowed")

#: Methods whose JSON body is checked against C{param_whitelist}.
BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


def _dot_segment(path: bytes) -> bool:
    lowered = path.lower().replace(b"%2e", b".")
    for segment in lowered.split(b"/"):
        if segment in (b".", b".."):
            return True
    return False


def check_method(provider: Provider, method: bytes) -> PolicyError | None:
    if method.upper() not in provider.allowed_methods_bytes:
        return METHOD_NOT_ALLOWED
    return None


def check_endpoint(provider: Provider, path: bytes) -> PolicyError | None:
    """Prefix match, as the Go project: C{/v1/files} allows C{/v1/files/abc/content}."""
    for prefix in provider.allowed_endpoints_bytes:
        if path.startswith(prefix):
            if (b"." in path or b"%" in path) and _dot_segment(path):
                return ENDPOINT_NOT_FOUND
            return None
    return ENDPOINT_NOT_FOUND


def whitelist_applies(provider: Provider, method: bytes) -> bool:
    """Whether L{check_params} needs the body (so the caller can skip reading it)."""
    return bool(provider.param_whitelist) and method.upper() in BODY_METHODS


def check_params(provider: Provider, method: bytes, body: bytes | None) -> PolicyError | None:
    """
    Every whitelisted top-level key present in a JSON-object body must match
    one of its patterns. Missing keys and bodies that are not a JSON object pass.
    """
    if not body or not whitelist_applies(provider, method):
        return None
    start = body.lstrip()[:1]
    if start not in (b"{", b"\xef"):  # "{" or a UTF-8 byte order mark
        return None
    try:
        text = body.decode("utf-8-sig")
        document = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    for key, patterns in provider.param_whitelist.items():
        if key not in document:
            continue
        value = go_format(document[key])
        if not any(go_path_match(p, value) for p in patterns):
            return PolicyError(
                400,
                f"Parameter '{key}' value '{value}' is not allowed. "
                f"Allowed patterns: [{' '.join(patterns)}]",
                "param_not_allowed",
            )
    return None


def check_origin(provider: Provider, origin: bytes | None) -> PolicyError | None:
    if origin is None:
        if "origin" in provider.required_headers:
            return ORIGIN_REQUIRED
        return None
    if provider.allowed_origins and origin.decode("latin-1") not in provider.allowed_origins:
        return ORIGIN_NOT_ALLOWED
    return None


def check_required_headers(provider: Provider, headers: Headers) -> PolicyError | None:
    """Headers other than C{origin} listed in C{required_headers} (origin: L{check_origin})."""
    for name in provider.required_headers:
        if name == "origin":
            continue
        if not headers.getRawHeaders(name.encode("latin-1")):
            display = "-".join(part.capitalize() for part in name.split("-"))
            return PolicyError(400, f"{display} header required", "header_required")
    return None


def check_request(
    provider: Provider,
    method: bytes,
    path: bytes,
    headers: Headers,
    body: bytes | None,
) -> PolicyError | None:
    """
    The Go project's validation order: method, endpoint, parameters, origin
    (then any other required header). C{path} excludes the query string;
    C{body} may be None when L{whitelist_applies} is false.
    """
    return (
        check_method(provider, method)
        or check_endpoint(provider, path)
        or check_params(provider, method, body)
        or check_origin(provider, _first(headers, b"origin"))
        or check_required_headers(provider, headers)
    )


def _first(headers: Headers, name: bytes) -> bytes | None:
    values = headers.getRawHeaders(name)
    return values[0] if values else None


# -- CORS -------------------------------------------------------------------------------------

EXPOSE_HEADERS = (
    b"X-Request-ID, X-Proxy-ID, X-LLM-Proxy-Remote-Duration, X-LLM-Proxy-Remote-Duration-Ms"
)


@attrs.frozen
class CorsSettings:
    """The C{CORS_*} variables; the defaults answer exactly as the Go project."""

    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    allowed_headers: tuple[str, ...] = ("Authorization", "Content-Type", "X-Requested-With")
    max_age: int = 86400

    @classmethod
    def from_config(cls, config: Config) -> CorsSettings:
        return cls(
            allowed_origins=tuple(config.cors_allowed_origins),
            allowed_methods=tuple(config.cors_allowed_methods),
            allowed_headers=tuple(config.cors_allowed_headers),
            max_age=int(config.cors_max_age),
        )

    @property
    def any_origin(self) -> bool:
        return "*" in self.allowed_origins

    def allows(self, origin: bytes) -> bool:
        return self.any_origin or origin.decode("latin-1") in self.allowed_origins


def preflight_headers(
    cors: CorsSettings, origin: bytes | None, request_headers: bytes | None
) -> list[tuple[bytes, bytes]]:
    """
    Headers of the 204 answer to C{OPTIONS}: none without C{Origin} or for an
    origin outside C{CORS_ALLOWED_ORIGINS}.
    """
    if origin is None or not cors.allows(origin):
        return []
    out: list[tuple[bytes, bytes]] = []
    if cors.any_origin:
        out.append((b"Access-Control-Allow-Origin", b"*"))
    else:
        out.append((b"Access-Control-Allow-Origin", origin))
        out.append((b"Vary", b"Origin"))
    out.append((b"Access-Control-Allow-Methods", ", ".join(cors.allowed_methods).encode()))
    allow_headers = request_headers or ", ".join(cors.allowed_headers).encode()
    out.append((b"Access-Control-Allow-Headers", allow_headers))
    out.append((b"Access-Control-Expose-Headers", EXPOSE_HEADERS))
    out.append((b"Access-Control-Max-Age", str(cors.max_age).encode()))
    return out


def cors_headers(cors: CorsSettings, origin: bytes | None) -> list[tuple[bytes, bytes]]:
    """
    Headers added to every proxied answer and proxy error of a request with
    C{Origin} (the origin echoed, even on C{origin_not_allowed}); C{Vary:
    Origin} is to be appended, not set.
    """
    if origin is None or not cors.allows(origin):
        return []
    return [
        (b"Access-Control-Allow-Origin", origin),
        (b"Access-Control-Expose-Headers", EXPOSE_HEADERS),
        (b"Vary", b"Origin"),
    ]


def _add_vary(headers: Headers, value: bytes) -> None:
    existing = headers.getRawHeaders(b"vary") or []
    tokens = {t.strip().lower() for v in existing for t in v.split(b",")}
    if value.lower() not in tokens and b"*" not in tokens:
        headers.addRawHeader(b"Vary", value)


def apply_headers(headers: Headers, pairs: Iterable[tuple[bytes, bytes]]) -> None:
    """Set each pair on response C{headers}; C{Vary} is appended to what is there."""
    for name, value in pairs:
        if name == b"Vary":
            _add_vary(headers, value)
        else:
            headers.setRawHeaders(name, [value])


@attrs.frozen
class ProviderPolicy:
    """The policy of one provider, applied to twisted.web requests (the proxy's RequestPolicy)."""

    provider: Provider
    cors: CorsSettings = CorsSettings()

    @classmethod
    def from_config(cls, provider: Provider, config: Config) -> ProviderPolicy:
        return cls(provider, CorsSettings.from_config(config))

    def check(self, request: Request) -> PolicyError | None:
        method = request.method
        body = None
        if whitelist_applies(self.provider, method) and request.content is not None:
            content = request.content
            content.seek(0)
            body = content.read()
            content.seek(0)
        return check_request(self.provider, method, request.path, request.requestHeaders, body)

    def preflight(self, request: Request) -> None:
        request.setResponseCode(204)
        headers = request.requestHeaders
        apply_headers(
            request.responseHeaders,
            preflight_headers(
                self.cors,
                _first(headers, b"origin"),
                _first(headers, b"access-control-request-headers"),
            ),
        )

    def cors_headers(self, request: Request) -> None:
        apply_headers(
            request.responseHeaders,
            cors_headers(self.cors, _first(request.requestHeaders, b"origin")),
        )
