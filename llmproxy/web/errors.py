"""JSON responses and errors shared by every route."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.server import Request

JSON_CONTENT_TYPE = b"application/json"


def json_body(request: Request, status: int, payload: Any) -> bytes:
    """Set status and content type; return the encoded body (newline-terminated)."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    return json.dumps(payload, separators=(",", ":")).encode() + b"\n"


def json_error(request: Request, status: int, error: str, **extra: Any) -> bytes:
    """C{{"error": ...}} plus any non-empty extra fields (C{code}, C{description}, ...)."""
    payload: dict[str, Any] = {"error": error}
    payload.update({k: v for k, v in extra.items() if v not in (None, "")})
    return json_body(request, status, payload)
