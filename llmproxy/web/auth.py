"""Bearer-token checks for management and metrics routes (constant-time)."""

from __future__ import annotations

import hmac

from twisted.web.server import Request

from llmproxy.web.errors import json_error


def bearer_token(request: Request) -> str | None:
    """The token after an exact C{Bearer } prefix, or None."""
    header = request.getHeader(b"authorization")
    if not header or not header.startswith(b"Bearer ") or len(header) <= len(b"Bearer "):
        return None
    return header[len(b"Bearer ") :].decode("utf-8", "replace")


def check_bearer(request: Request, expected: str) -> bytes | None:
    """
    None when the request carries C{Bearer <expected>}; otherwise the 401
    JSON body to return (the status is already set).
    """
    token = bearer_token(request)
    if token is None:
        return json_error(request, 401, "missing or invalid Authorization header")
    if not hmac.compare_digest(token.encode("utf-8"), expected.encode("utf-8")):
        return json_error(request, 401, "invalid management token")
    return None
