"""
The instrumentation event: one JSON object per proxied request, snake_case,
versioned by C{schema_version} (documented in C{docs/events.rst}). Every
event is built here from a L{RequestRecord}, so what leaves the process is
decided in one place: bodies are capped, binary bodies are omitted unless
C{LOG_BINARY_RESPONSES}, and C{set-cookie} never leaves.
"""

from __future__ import annotations

import base64
import datetime
import uuid
import zlib
from typing import Any

from llmproxy.proxy.record import RequestRecord

SCHEMA_VERSION = 1

#: Response headers never copied into an event.
DROPPED_HEADERS = frozenset({"set-cookie", "set-cookie2"})

_BINARY_TYPES = ("audio/", "image/", "video/")
_BINARY_EXACT = frozenset(
    {"application/octet-stream", "application/pdf", "application/zip", "application/gzip"}
)
_OVERHEAD_HEADER = "x-proxy-overhead-ms"


def rfc3339(seconds: float) -> str:
    """UTC RFC 3339 with milliseconds and C{Z}."""
    t = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def header_map(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Lower-cased names; repeated headers joined with C{", "}; no cookies."""
    out: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if name in DROPPED_HEADERS:
            continue
        value = raw_value.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_binary_type(content_type: str | None) -> bool:
    media = _media_type(content_type)
    return media.startswith(_BINARY_TYPES) or media in _BINARY_EXACT


def decode_content(body: bytes, content_encoding: str | None, limit: int) -> bytes | None:
    """
    Undo gzip/deflate (at most C{limit} bytes of output); None when the
    encoding is unknown or the data is corrupt.
    """
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip", "deflate"):
        wbits = 47 if encoding != "deflate" else 15
        try:
            inflater = zlib.decompressobj(wbits)
            return inflater.decompress(body, limit + 1)
        except zlib.error:
            if encoding == "deflate":  # raw deflate without zlib header
                try:
                    return zlib.decompressobj(-15).decompress(body, limit + 1)
                except zlib.error:
                    return None
            return None
    return None


def _utf8_prefix(data: bytes) -> str | None:
    """C{data} as text, tolerating a multi-byte character cut at the end."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start >= len(data) - 3 and e.reason == "unexpected end of data":
            try:
                return data[: e.start].decode("utf-8")
            except UnicodeDecodeError:
                return None
        return None


def body_field(
    raw: bytes,
    cap: int,
    *,
    content_type: str | None = None,
    content_encoding: str | None = None,
    keep_binary: bool = False,
    known_size: int | None = None,
) -> dict[str, Any] | None:
    """
    The C{request_body}/C{response_body} object of an event, or None when
    there is no body. C{known_size} is the full size when C{raw} may be a
    captured prefix (then a shorter capture counts as truncated).
    """
    if not raw:
        return None
    truncated = known_size is not None and known_size > len(raw)
    data = decode_content(raw, content_encoding, cap)
    binary = data is None or is_binary_type(content_type)
    if data is None:
        data = raw
    if len(data) > cap:
        data = data[:cap]
        truncated = True
    text = None if binary else _utf8_prefix(data)
    if text is None:
        binary = True
    if binary:
        if not keep_binary:
            return {"text": None, "encoding": None, "truncated": truncated, "binary": True}
        encoded = base64.b64encode(data).decode("ascii")
        return {"text": encoded, "encoding": "base64", "truncated": truncated, "binary": True}
    return {"text": text, "encoding": "utf-8", "truncated": truncated, "binary": False}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(max(0.0, seconds) * 1000.0, 3)


def _overhead_ms(record: RequestRecord, headers: dict[str, str]) -> float | None:
    value = headers.get(_OVERHEAD_HEADER)
    if value is not None:
        try:
            return round(float(value), 3)
        except ValueError:
            pass
    if record.finished_at is None:
        return None
    end = (
        record.upstream_started_at if record.upstream_started_at is not None else record.finished_at
    )
    return _ms(end - record.received_at)


def event_from_record(
    record: RequestRecord, config: Any, *, event_id: str | None = None
) -> dict[str, Any]:
    """
    The event for one finished request. C{config} supplies the caps
    (C{observability_max_request_body_bytes}, ..._response_...) and
    C{log_binary_responses}.
    """
    all_headers = record.response_headers
    headers = header_map(all_headers)
    usage = None
    if record.usage is not None:
        usage = {
            "prompt_tokens": record.usage.get("prompt_tokens"),
            "completion_tokens": record.usage.get("completion_tokens"),
            "total_tokens": record.usage.get("total_tokens"),
            "source": record.usage.get("source", "reported"),
        }
    keep_binary = bool(getattr(config, "log_binary_responses", False))
    request_cap = int(config.observability_max_request_body_bytes)
    response_cap = int(config.observability_max_response_body_bytes)
    request_body = body_field(
        record.request_body,
        request_cap,
        known_size=record.request_size,
        keep_binary=keep_binary,
    )
    response_body = body_field(
        record.response_body,
        response_cap,
        content_type=headers.get("content-type"),
        content_encoding=headers.get("content-encoding"),
        keep_binary=keep_binary,
        known_size=record.bytes_sent if record.bytes_sent else None,
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": event_id or str(uuid.uuid4()),
        "request_id": record.request_id,
        "timestamp": rfc3339(record.received_at_wall),
        "project_id": record.project_id,
        "token_id": record.token_id,
        "provider": record.provider or None,
        "method": record.method,
        "path": record.path,
        "status": record.status,
        "durations": {
            "total_ms": _ms(record.duration),
            "upstream_ttfb_ms": _ms(record.upstream_ttfb),
            "proxy_overhead_ms": _overhead_ms(record, headers),
        },
        "model": record.model,
        "usage": usage,
        "cache_status": record.cache_status,
        "streamed": record.streamed,
        "error_kind": record.error_kind,
        "request_body": request_body,
        "response_body": response_body,
        "response_headers": headers,
    }
