"""
Turning an event into what an observability service expects: the real
request JSON, the real response (a streamed answer merged back into one
chat completion) and the usage (unlike the Go llm-proxy's dispatcher).
"""

from __future__ import annotations

import datetime
import json
from typing import Any


def _body_text(event: dict[str, Any], key: str) -> str | None:
    body = event.get(key)
    if isinstance(body, dict) and body.get("encoding") == "utf-8":
        text = body.get("text")
        return text if isinstance(text, str) else None
    return None


def request_json(event: dict[str, Any]) -> Any:
    """The request body as JSON, as a string when it is not JSON, else None."""
    text = _body_text(event, "request_body")
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def merge_sse(text: str) -> dict[str, Any] | None:
    """A streamed chat/text completion merged into one completion object."""
    merged: dict[str, Any] | None = None
    choices: dict[int, dict[str, Any]] = {}
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if not payload or payload == "[DONE]":
            continue
        try:
            chunk = json.loads(payload)
        except ValueError:
            continue
        if not isinstance(chunk, dict):
            continue
        if merged is None:
            merged = {k: chunk.get(k) for k in ("id", "created", "model") if k in chunk}
            kind = str(chunk.get("object", ""))
            merged["object"] = kind.removesuffix(".chunk") or "chat.completion"
        if isinstance(chunk.get("usage"), dict):
            merged["usage"] = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            index = int(choice.get("index", 0) or 0)
            slot = choices.setdefault(index, {"index": index, "finish_reason": None})
            delta = choice.get("delta")
            if isinstance(delta, dict):
                message = slot.setdefault("message", {"role": "assistant", "content": ""})
                if isinstance(delta.get("role"), str):
                    message["role"] = delta["role"]
                if isinstance(delta.get("content"), str):
                    message["content"] += delta["content"]
                if delta.get("tool_calls"):
                    message.setdefault("tool_calls", []).extend(delta["tool_calls"])
            elif isinstance(choice.get("text"), str):
                slot["text"] = slot.get("text", "") + choice["text"]
            if choice.get("finish_reason") is not None:
                slot["finish_reason"] = choice["finish_reason"]
    if merged is None:
        return None
    merged["choices"] = [choices[i] for i in sorted(choices)]
    return merged


def response_json(event: dict[str, Any]) -> Any:
    """The response as JSON (a stream merged), a string otherwise, None when omitted."""
    text = _body_text(event, "response_body")
    if text is None:
        return None
    if event.get("streamed") or "text/event-stream" in str(
        (event.get("response_headers") or {}).get("content-type", "")
    ):
        merged = merge_sse(text)
        if merged is not None:
            return merged
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _iso(seconds: float) -> str:
    t = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def start_end(event: dict[str, Any]) -> tuple[float, float]:
    start = _parse_time(event.get("timestamp")) or 0.0
    total = (event.get("durations") or {}).get("total_ms") or 0.0
    return start, start + float(total) / 1000.0


def _split(seconds: float) -> dict[str, int]:
    whole = int(seconds)
    return {"seconds": whole, "milliseconds": int(round((seconds - whole) * 1000))}


def is_llm_call(event: dict[str, Any]) -> bool:
    """Only POSTs are model calls (preflights, model lists and the like are skipped)."""
    return event.get("method") == "POST"


def helicone_payload(event: dict[str, Any]) -> dict[str, Any]:
    """Helicone's custom-log body for one event."""
    request = request_json(event)
    response = response_json(event)
    usage = event.get("usage")
    if isinstance(response, dict):
        response = dict(response)
    else:
        note = {"note": "response was not JSON; omitted"} if response is not None else {}
        response = note
    if isinstance(usage, dict):
        response["usage"] = {
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "total_tokens": usage.get("total_tokens"),
        }
    meta = {
        "request_id": str(event.get("request_id") or ""),
        "provider": str(event.get("provider") or "openai"),
        "Helicone-Provider": str(event.get("provider") or "openai"),
    }
    for key in ("project_id", "token_id", "cache_status", "error_kind"):
        if isinstance(event.get(key), str):
            meta[key] = event[key]
    if isinstance(usage, dict) and usage.get("source"):
        meta["usage_source"] = str(usage["source"])
    start, end = start_end(event)
    return {
        "providerRequest": {
            "url": event.get("path") or "custom-model-nopath",
            "json": request if isinstance(request, dict) else {},
            "meta": meta,
        },
        "providerResponse": {
            "status": event.get("status") or 200,
            "headers": event.get("response_headers") or {},
            "json": response,
        },
        "timing": {"startTime": _split(start), "endTime": _split(end)},
    }


def lunary_events(event: dict[str, Any], verbose: bool = False) -> list[dict[str, Any]]:
    """
    A Lunary C{llm} run: a C{start} and an C{end} (or C{error}) event.
    C{verbose} (C{LLM_PROXY_DISPATCHER_VERBOSE}) adds the response headers
    to the metadata.
    """
    request = request_json(event)
    response = response_json(event)
    usage = event.get("usage")
    start, end = start_end(event)
    run_id = str(event.get("event_id") or event.get("request_id"))
    model = event.get("model")
    if model is None and isinstance(request, dict):
        model = request.get("model")
    metadata = {
        "request_id": event.get("request_id"),
        "method": event.get("method"),
        "path": event.get("path"),
        "status": event.get("status"),
        "duration_ms": (event.get("durations") or {}).get("total_ms"),
        "cache_status": event.get("cache_status"),
        "project_id": event.get("project_id"),
    }
    if verbose:
        metadata["response_headers"] = event.get("response_headers") or {}
    params = {}
    if isinstance(request, dict):
        params = {k: v for k, v in request.items() if k not in ("messages", "input", "prompt")}
    if isinstance(request, dict) and "messages" in request:
        run_input: Any = request["messages"]
    elif isinstance(request, dict):
        run_input = request.get("input", request.get("prompt", request))
    else:
        run_input = request
    begin = {
        "type": "llm",
        "event": "start",
        "runId": run_id,
        "timestamp": _iso(start),
        "name": model,
        "input": run_input,
        "params": params,
        "metadata": metadata,
    }
    if event.get("token_id"):
        begin["userId"] = event["token_id"]
    status = int(event.get("status") or 0)
    finish: dict[str, Any] = {"type": "llm", "runId": run_id, "timestamp": _iso(end)}
    if status >= 400 or event.get("error_kind"):
        finish["event"] = "error"
        finish["error"] = {
            "message": event.get("error_kind") or f"HTTP {status}",
            "stack": json.dumps(response) if response is not None else None,
        }
    else:
        finish["event"] = "end"
        output: Any = response
        if isinstance(response, dict) and isinstance(response.get("choices"), list):
            messages = [c.get("message") for c in response["choices"] if isinstance(c, dict)]
            if messages and all(isinstance(m, dict) for m in messages):
                output = messages[0] if len(messages) == 1 else messages
        finish["output"] = output
    if isinstance(usage, dict):
        finish["tokensUsage"] = {
            "prompt": usage.get("prompt_tokens"),
            "completion": usage.get("completion_tokens"),
        }
    return [begin, finish]
