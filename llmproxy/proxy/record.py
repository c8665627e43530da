"""
What happened during one proxied request. The proxy fills a L{RequestRecord}
as the request goes; observers (events, metrics, usage) read it once the
response has ended. Times are C{time.monotonic()} seconds except
C{received_at_wall} (C{time.time()}).
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import Interface


@attrs.define(slots=True)
class RequestRecord:
    request_id: str
    method: str
    path: str
    received_at: float
    received_at_wall: float
    client_ip: str = ""
    provider: str = ""
    project_id: str | None = None
    token_id: str | None = None
    #: SHA-256 hex of the presented token (for usage and cache-hit counters).
    token_hash: str | None = None
    status: int = 0
    #: Upstream request sent / first response byte (headers) / last byte.
    upstream_started_at: float | None = None
    upstream_headers_at: float | None = None
    finished_at: float | None = None
    streamed: bool = False
    model: str | None = None
    #: ``{"prompt_tokens", "completion_tokens", "total_tokens", "source"}``.
    usage: dict[str, Any] | None = None
    #: hit | conditional-hit | miss | bypass | stored | None (cache off)
    cache_status: str | None = None
    #: None on success; otherwise e.g. upstream_unreachable, upstream_timeout,
    #: upstream_cut, client_aborted, auth, quota, rate_limited, policy.
    error_kind: str | None = None
    request_body: bytes = b""
    #: Full request body length when known (C{request_body} may be a prefix).
    request_size: int | None = None
    #: The proxy added C{stream_options.include_usage} (see
    #: L{llmproxy.events.usage.prepare_request_body}): hide the usage chunk.
    usage_injected: bool = False
    response_body: bytes = b""
    response_headers: list[tuple[bytes, bytes]] = attrs.field(factory=list)
    bytes_sent: int = 0
    #: Whether bodies, headers, model and usage are captured for observers
    #: (decided once when the request arrives; see C{wants_bodies} below).
    capture: bool = True
    #: Seconds, as sent in C{X-Proxy-Overhead-Ms} (None when not sent).
    overhead: float | None = None

    @property
    def duration(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.received_at

    @property
    def upstream_ttfb(self) -> float | None:
        if self.upstream_headers_at is None or self.upstream_started_at is None:
            return None
        return self.upstream_headers_at - self.upstream_started_at


class IRequestObserver(Interface):
    def request_started(record: RequestRecord) -> None:
        """A proxied request arrived (cheap; runs on the hot path)."""

    def request_finished(record: RequestRecord) -> None:
        """The response has ended (or failed); must not block or raise."""

    # An observer may also have a C{wants_bodies} attribute: when every
    # observer's is false, the proxy neither copies request and response
    # bodies into the record nor fills its headers, model and usage.
