"""Response headers and the error body for rate-limit decisions."""

from __future__ import annotations

from twisted.web.server import Request

from llmproxy.ratelimit.interface import Decision
from llmproxy.web.errors import json_error


def rate_limit_headers(decision: Decision | None) -> list[tuple[bytes, bytes]]:
    """
    C{RateLimit-Limit}, C{RateLimit-Remaining}, C{RateLimit-Reset} (seconds
    until the window ends) and, when refused, C{Retry-After}. No headers
    when no limit applied.
    """
    if decision is None:
        return []
    headers = [
        (b"RateLimit-Limit", b"%d" % decision.limit),
        (b"RateLimit-Remaining", b"%d" % decision.remaining),
        (b"RateLimit-Reset", b"%d" % decision.reset_seconds),
    ]
    if not decision.allowed and decision.retry_after is not None:
        headers.append((b"Retry-After", b"%d" % decision.retry_after))
    return headers


def apply_rate_limit_headers(request: Request, decision: Decision | None) -> None:
    for name, value in rate_limit_headers(decision):
        request.setHeader(name, value)


def rate_limit_refusal(decision: Decision) -> tuple[int, str, str, str]:
    """C{(status, error, code, description)} for a refused request."""
    if decision.unavailable:
        return (
            503,
            "Rate limiting unavailable",
            "rate_limit_unavailable",
            "redis unavailable for rate limiting",
        )
    return (
        429,
        "Rate limit exceeded",
        "rate_limit_exceeded",
        f"{decision.scope or 'request'} rate limit of {decision.limit} requests reached; "
        f"retry after {decision.retry_after} s",
    )


def rate_limit_error(request: Request, decision: Decision) -> bytes:
    """
    Set the headers and status for a refused request and return the JSON
    body: 429 C{rate_limit_exceeded}, or 503 when the counter store is
    unavailable and the limiter fails closed.
    """
    apply_rate_limit_headers(request, decision)
    status, error, code, description = rate_limit_refusal(decision)
    return json_error(
        request,
        status,
        error,
        code=code,
        description=description,
        retry_after=decision.retry_after,
    )
