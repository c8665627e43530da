"""
POST /manage/cache/purge: remove cached responses by method and URL, or by
URL prefix. Unlike the Go llm-proxy (which matched hashed keys, so prefix
purges never matched anything) both forms really remove what they name and
the answer says how many entries went.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from llmproxy.cache.facade import ResponseCache
from llmproxy.cache.interface import CacheUnavailable
from llmproxy.web.auth import check_bearer
from llmproxy.web.errors import json_body, json_error

log = Logger()

PATH = "/manage/cache/purge"


#: Same cap as the other management routes.
MAX_BODY = 1024 * 1024


class _BadJSON(ValueError):
    pass


def _decode(raw: bytes) -> dict[str, str]:
    """
    Lenient like the Go decoder: first JSON value only, keys matched without
    case, null means absent, a null body is all-empty; wrong types fail.
    """
    try:
        text = raw.decode("utf-8").lstrip()
        value, _ = json.JSONDecoder().raw_decode(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise _BadJSON(str(e)) from e
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _BadJSON("not an object")
    fields: dict[str, str] = {}
    for key, v in value.items():
        name = key.lower()
        if name not in ("method", "url", "prefix") or name in fields or v is None:
            continue
        if not isinstance(v, str):
            raise _BadJSON(f"{name} must be a string")
        fields[name] = v
    return fields


class CachePurgeHandler:
    """
    @param cache: the response cache, None when C{HTTP_CACHE_ENABLED=false}.
    @param audit: an L{llmproxy.audit.writer.AuditWriterService} (anything
        with C{record(event)}), or None.
    """

    def __init__(
        self,
        cache: ResponseCache | None,
        management_token: str,
        clock: IReactorTime,
        audit: Any = None,
    ) -> None:
        self.cache = cache
        self.management_token = management_token
        self.clock = clock
        self.audit = audit

    def install(self, web: Any) -> None:
        """Register on a L{llmproxy.web.app.WebApp} (every method: auth comes first)."""
        web.add_route(PATH, self.render, endpoint="cache_purge")

    async def render(self, request: Request) -> bytes:
        denied = check_bearer(request, self.management_token)
        if denied is not None:
            return denied
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return json_error(request, 405, "method not allowed", code="method_not_allowed")
        if self.cache is None:
            return self._failure(request, 400, "caching is disabled", "caching_disabled")
        assert request.content is not None
        request.content.seek(0)
        raw = request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            return json_error(
                request,
                413,
                "Request body too large",
                code="request_too_large",
                description=f"management request bodies are limited to {MAX_BODY} bytes",
            )
        try:
            fields = _decode(raw)
        except _BadJSON:
            return self._failure(request, 400, "invalid JSON", "invalid_json")
        method, url, prefix = (fields.get(k, "") for k in ("method", "url", "prefix"))
        if not method or not url:
            return self._failure(request, 400, "method and url are required", "missing_fields")
        try:
            if prefix:
                count = await self.cache.purge_prefix(prefix)
                self._audit(
                    request, "success", {"purge_type": "prefix", "prefix": prefix, "deleted": count}
                )
                return json_body(request, 200, {"deleted": count, "count": count})
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 - raises ValueError for a bad port
            except ValueError:
                return self._failure(request, 400, "invalid URL", "invalid_url")
            count = await self.cache.purge(method, url)
        except CacheUnavailable:
            log.warn("cache purge failed: the cache backend is unavailable")
            return self._failure(request, 503, "cache unavailable", "cache_unavailable", "error")
        self._audit(
            request,
            "success",
            {
                "purge_type": "exact",
                "method": method.upper(),
                "url": url,
                "deleted": count > 0,
                "count": count,
            },
        )
        return json_body(request, 200, {"deleted": count > 0, "count": count})

    def _failure(
        self, request: Request, status: int, error: str, reason: str, outcome: str = "failure"
    ) -> bytes:
        self._audit(request, outcome, {"error": reason})
        return json_error(request, status, error)

    def _audit(self, request: Request, outcome: str, details: dict[str, Any]) -> None:
        if self.audit is None:
            return
        from llmproxy.audit.events import CACHE_PURGE, management_event

        try:
            self.audit.record(management_event(request, self.clock, CACHE_PURGE, outcome, details))
        except Exception:
            log.failure("could not audit a cache purge")
