"""
Token usage of a proxied request: read from what the provider reported
(a JSON body, or the usage chunk of an SSE stream), or estimated offline
when nothing was reported.

L{prepare_request_body} asks OpenAI chat streams for a usage chunk when the
client did not (C{STREAM_INCLUDE_USAGE}); L{SSEUsageTap} then removes that
chunk again from what the client receives, so the client sees exactly the
stream the provider would have sent it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

from llmproxy.events.schema import decode_content
from llmproxy.events.tokenize import count_tokens
from llmproxy.proxy.record import RequestRecord

#: cache_status values of answers that never reached the provider.
CACHE_HITS = frozenset({"hit", "conditional-hit"})

REPORTED = "reported"
ESTIMATED = "estimated"

#: Completion text kept for estimates (characters).
TEXT_LIMIT = 1 << 20
#: A single SSE line longer than this is passed through unparsed.
LINE_LIMIT = 4 << 20

#: Bytes of unparsed stream lines an L{SSEUsageTap} holds before reading them.
DEFER_LIMIT = 256 << 10
#: Non-stream JSON bodies up to this size are parsed whole for usage.
JSON_LIMIT = 1 << 20
#: Of a larger body, this much of its start and end is kept.
JSON_EDGE = 64 << 10

_USAGE_NULL_LAST = b',"usage":null}'
_USAGE_NULL = re.compile(rb'(,\s*"usage"\s*:\s*null(?=\s*[,}]))|("usage"\s*:\s*null\s*,)')


# -- request side --------------------------------------------------------------------


def prepare_request_body(
    body: bytes, content_type: str | None, path: str, config: Any
) -> tuple[bytes, bool]:
    """
    With C{STREAM_INCLUDE_USAGE}, add C{"stream_options":{"include_usage":true}}
    to a streaming OpenAI chat completions request that does not ask for
    usage itself. Returns C{(body, injected)}; the body is untouched (and
    not parsed) unless it is such a request. When C{stream_options} is
    absent the rest of the client's bytes are kept as they were.
    """
    if not getattr(config, "stream_include_usage", False):
        return body, False
    if not path.split("?", 1)[0].rstrip("/").endswith("/chat/completions"):
        return body, False
    if content_type and "json" not in content_type.lower():
        return body, False
    if b'"stream"' not in body:
        return body, False
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body, False
    if not isinstance(payload, dict) or payload.get("stream") is not True:
        return body, False
    options = payload.get("stream_options")
    if options is None:
        start = body.index(b"{")
        inserted = b'"stream_options":{"include_usage":true},'
        return body[: start + 1] + inserted + body[start + 1 :], True
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return body, False
    payload["stream_options"] = dict(options, include_usage=True)
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), True


# -- usage values ------------------------------------------------------------------------


def normalize_usage(raw: Any, source: str = REPORTED) -> dict[str, Any] | None:
    """
    C{{prompt_tokens, completion_tokens, total_tokens, source}} from an
    OpenAI (prompt/completion) or Responses/Anthropic (input/output) usage
    object; None when it holds no counts.
    """
    if not isinstance(raw, dict):
        return None
    prompt = raw.get("prompt_tokens", raw.get("input_tokens"))
    completion = raw.get("completion_tokens", raw.get("output_tokens"))
    total = raw.get("total_tokens")
    if not isinstance(prompt, int):
        prompt = None
    if not isinstance(completion, int):
        completion = None
    if not isinstance(total, int):
        total = None
    if prompt is None and completion is None and total is None:
        return None
    if total is None:
        total = (prompt or 0) + (completion or 0)
    if completion is None and prompt is not None:
        completion = max(0, total - prompt)  # embeddings report prompt and total only
    return {
        "prompt_tokens": prompt or 0,
        "completion_tokens": completion or 0,
        "total_tokens": total,
        "source": source,
    }


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
        return "\n".join(parts)
    return ""


def prompt_text(request_body: bytes) -> tuple[str, str | None]:
    """The text of a request's messages / prompt / input, and its model."""
    try:
        payload = json.loads(request_body)
    except (ValueError, UnicodeDecodeError):
        return "", None
    if not isinstance(payload, dict):
        return "", None
    model = payload.get("model") if isinstance(payload.get("model"), str) else None
    parts: list[str] = []
    for key in ("instructions", "system"):
        parts.append(_content_text(payload.get(key)))
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                parts.append(_content_text(message.get("content")))
    for key in ("prompt", "input"):
        value = payload.get(key)
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                parts.append(_content_text(item.get("content")))
        elif isinstance(value, list):
            parts.extend(v for v in value if isinstance(v, str))
        else:
            parts.append(_content_text(value))
    return "\n".join(p for p in parts if p), model


def estimate_usage(request_body: bytes, completion_text: str, model: str | None) -> dict[str, Any]:
    """Offline token counts (source C{estimated}) with the model's encoding."""
    text, request_model = prompt_text(request_body)
    model = model or request_model
    prompt = count_tokens(text, model)
    completion = count_tokens(completion_text, model)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "source": ESTIMATED,
    }


@attrs.define
class BodyUsage:
    """What a response body says: model, reported usage, generated text."""

    model: str | None = None
    usage: dict[str, Any] | None = None
    text: str = ""


def read_json_usage(body: bytes) -> BodyUsage:
    """Model, usage and generated text of a non-streamed JSON answer."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return BodyUsage()
    if not isinstance(payload, dict):
        return BodyUsage()
    model = payload.get("model") if isinstance(payload.get("model"), str) else None
    texts: list[str] = []
    choices = payload.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            if isinstance(message, dict):
                texts.append(_content_text(message.get("content")))
            elif isinstance(choice.get("text"), str):
                texts.append(choice["text"])
    output = payload.get("output")  # Responses API
    if isinstance(output, list):
        for item in output:
            if isinstance(item, dict):
                texts.append(_content_text(item.get("content")))
    if payload.get("type") == "message":  # Anthropic
        texts.append(_content_text(payload.get("content")))
    return BodyUsage(model, normalize_usage(payload.get("usage")), "".join(texts))


# -- streams -------------------------------------------------------------------------------


class SSEUsageTap:
    """
    Follows a C{text/event-stream} body chunk by chunk, keeping only the
    current partial line: picks up the model, the final usage and the
    generated text (for an estimate when no usage comes).

    Call L{feed} with each upstream chunk and write what it returns; call
    L{flush} at the end of the body and write that too. With
    C{strip_usage} (the proxy asked for usage on the client's behalf) the
    usage-only chunk (C{"choices": []}) is removed, and so is the
    C{"usage": null} member the provider then adds to every other chunk;
    only in that mode is a partial line held back until its end arrives.

    It is also a body tap (C{data_received}/C{body_ended}, the proxy's
    C{IBodyTap}) that only observes; L{body_ended} fills the record (see L{fill_record}).
    """

    def __init__(
        self,
        record: RequestRecord | None = None,
        strip_usage: bool = False,
        text_limit: int = TEXT_LIMIT,
    ) -> None:
        self.record = record
        self.strip_usage = strip_usage
        self.text_limit = text_limit
        self.model: str | None = None
        self.usage: dict[str, Any] | None = None
        self.stripped = 0
        self._text: list[str] = []
        self._text_len = 0
        self._partial = b""
        self._passthrough = False  # inside an over-long line that was already forwarded
        self._event_started = False  # a line of the current event went to the client
        self._dropping = False  # inside the removed usage event
        self._anthropic: dict[str, int] = {}
        self._filled = False
        # Data lines that carry no usage figures, kept unparsed: their text
        # is needed only for an estimate when no usage comes, so most
        # streams never parse them (see L{_deferrable}).
        self._deferred: list[bytes] = []
        self._deferred_len = 0

    @property
    def completion_text(self) -> str:
        self._parse_deferred()
        return "".join(self._text)

    # -- feeding -------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        """One upstream chunk in; the bytes to send to the client out."""
        if not self.strip_usage:
            self._observe(chunk)
            return chunk
        out: list[bytes] = []
        data = self._partial + chunk if self._partial else chunk
        self._partial = b""
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start : end + 1]
            start = end + 1
            if self._passthrough:
                self._passthrough = False
                out.append(line)
                continue
            kept = self._line(line)
            if kept is not None:
                out.append(kept)
        rest = data[start:]
        if rest:
            if self._passthrough or len(rest) > LINE_LIMIT:
                self._passthrough = True
                self._event_started = True
                out.append(rest)
            else:
                self._partial = rest
        return b"".join(out)

    def flush(self) -> bytes:
        """The end of the body: whatever partial line is still held back."""
        rest, self._partial = self._partial, b""
        return rest

    def _observe(self, chunk: bytes) -> None:
        data = self._partial + chunk if self._partial else chunk
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._passthrough:
                self._passthrough = False
            else:
                self._parse(data[start:end])
            start = end + 1
        rest = data[start:]
        if len(rest) > LINE_LIMIT:
            self._passthrough = True
            rest = b""
        self._partial = rest

    def _line(self, line: bytes) -> bytes | None:
        """One complete line (with its terminator): what to forward, or None."""
        content = line.rstrip(b"\r\n")
        if not content:  # end of an event
            if self._dropping:
                self._dropping = False
                return None
            self._event_started = False
            return line
        if self._dropping:
            return None
        if self._deferrable(content):
            self._defer(content)
            if content.endswith(_USAGE_NULL_LAST):
                # The usage member the provider adds to every chunk once asked
                # for the usage chunk; the client did not ask, so it goes.
                line = _without_last_usage_null(line, content)
            self._event_started = True
            return line
        parsed = self._decode(content)
        if parsed is not None and content.startswith(b"data:"):
            usage_only = (
                isinstance(parsed.get("usage"), dict)
                and parsed.get("choices") == []
                and "usage" in parsed
            )
            if usage_only and not self._event_started:
                self._dropping = True
                self.stripped += 1
                return None
            if "usage" in parsed and parsed["usage"] is None:
                line = _without_usage_null(line, parsed)
        self._event_started = True
        return line

    def _deferrable(self, content: bytes) -> bool:
        """
        A data line whose parse can wait: it has no usage figures (no
        C{"usage"} member, or only the trailing C{"usage":null} OpenAI adds
        to every chunk of a stream asked for its usage). Such lines carry
        only text and the model, which the usage chunk repeats; when no
        usage comes, L{fill_record} parses them. The first event of a
        stream is not parsed on its way to the client either.
        """
        return content.startswith(b"data:") and (
            b'"usage"' not in content or content.endswith(_USAGE_NULL_LAST)
        )

    def _defer(self, content: bytes) -> None:
        self._deferred.append(content)
        self._deferred_len += len(content)
        if self._deferred_len > DEFER_LIMIT:
            self._parse_deferred()  # a long stream: keep its text, not its lines

    def _parse_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        self._deferred_len = 0
        for content in deferred:
            self._decode(content)

    def _parse(self, content: bytes) -> None:
        """A line that is only observed (the stream is not being filtered)."""
        content = content.rstrip(b"\r")
        if self._deferrable(content):
            self._defer(content)
        else:
            self._decode(content)

    def _decode(self, content: bytes) -> dict[str, Any] | None:
        """Parse one data line (without its line end) and take what it says."""
        if not content.startswith(b"data:"):
            return None
        payload = content[5:]
        if payload[:1] == b" ":
            payload = payload[1:]
        if not payload or payload == b"[DONE]":
            return None
        try:
            obj = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(obj, dict):
            return None
        self._take(obj)
        return obj

    def _take(self, obj: dict[str, Any]) -> None:
        model = obj.get("model")
        if self.model is None and isinstance(model, str):
            self.model = model
        usage = normalize_usage(obj.get("usage"))
        if usage is not None:
            self.usage = usage
        kind = obj.get("type")
        if isinstance(kind, str):
            self._typed(kind, obj)
            return
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    self._add_text(delta.get("content"))
                else:
                    self._add_text(choice.get("text"))

    def _typed(self, kind: str, obj: dict[str, Any]) -> None:
        """Responses API and Anthropic Messages stream events."""
        if kind in ("response.completed", "response.done", "response.incomplete"):
            response = obj.get("response")
            if isinstance(response, dict):
                if isinstance(response.get("model"), str):
                    self.model = response["model"]
                usage = normalize_usage(response.get("usage"))
                if usage is not None:
                    self.usage = usage
        elif kind == "response.output_text.delta":
            self._add_text(obj.get("delta"))
        elif kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("model"), str):
                    self.model = message["model"]
                self._anthropic_usage(message.get("usage"))
        elif kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                self._add_text(delta.get("text"))
        elif kind == "message_delta":
            self._anthropic_usage(obj.get("usage"))

    def _anthropic_usage(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            return
        for key in ("input_tokens", "output_tokens"):
            if isinstance(raw.get(key), int):
                self._anthropic[key] = raw[key]
        self.usage = normalize_usage(dict(self._anthropic))

    def _add_text(self, text: Any) -> None:
        if isinstance(text, str) and text and self._text_len < self.text_limit:
            piece = text[: self.text_limit - self._text_len]
            self._text.append(piece)
            self._text_len += len(piece)

    # -- IBodyTap -------------------------------------------------------------------------

    def data_received(self, chunk: bytes) -> None:
        self._observe(chunk)

    def body_ended(self, complete: bool) -> None:
        if self._partial and not self._passthrough:
            self._parse(self._partial)
        if self.record is not None:
            self.fill_record(self.record)

    def fill_record(self, record: RequestRecord) -> None:
        """Set C{record.model} and C{record.usage} (reported, else estimated)."""
        if self._filled:
            return
        self._filled = True
        if self.model is None and self._deferred:
            self._parse_deferred()  # the model is in the deferred lines
        if self.model:
            record.model = self.model
        if self.usage is not None:
            record.usage = self.usage
            self._deferred = []  # reported: the text is not needed
        elif record.usage is None and 200 <= record.status < 300:
            record.usage = _estimate_for(record, self.completion_text)


def _without_last_usage_null(line: bytes, content: bytes) -> bytes:
    """
    C{line} without the C{"usage":null} that ends C{content} (the line
    without its line end): the usual place (OpenAI), the last member of the
    top-level object. Quotes inside strings are escaped, so a content ending
    in it ends in that object's own key.
    """
    return content[: -len(_USAGE_NULL_LAST)] + b"}" + line[len(content) :]


def _without_usage_null(line: bytes, parsed: dict[str, Any]) -> bytes:
    """
    Remove the top-level C{"usage":null} member from a data line, keeping
    every other byte; the line is kept as it was unless the result parses
    to the same object without C{usage}.
    """
    content = line.rstrip(b"\r\n")
    if content.endswith(_USAGE_NULL_LAST):
        return _without_last_usage_null(line, content)
    for match in reversed(list(_USAGE_NULL.finditer(line))):
        candidate = line[: match.start()] + line[match.end() :]
        payload = candidate.rstrip(b"\r\n")[5:]
        try:
            obj = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            continue
        expected = {k: v for k, v in parsed.items() if k != "usage"}
        if obj == expected:
            return candidate
    return line


class JSONUsageTap:
    """
    Reads the usage of a non-streamed JSON answer. Bodies up to
    L{JSON_LIMIT} are kept whole and parsed at the end; of a larger one
    (big embedding lists) only the first and last L{JSON_EDGE} bytes are
    kept, enough to find C{"model"} near the start and C{"usage"} near the
    end without holding the body.
    """

    def __init__(self, record: RequestRecord, content_encoding: str | None = None) -> None:
        self.record = record
        self.content_encoding = content_encoding
        self._chunks: list[bytes] = []
        self._size = 0
        self._head = b""
        self._tail = b""
        self._too_big = False

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if not self._too_big:
            self._chunks.append(chunk)
            if self._size <= JSON_LIMIT:
                return
            self._too_big = True
            whole = b"".join(self._chunks)
            self._chunks = []
            self._head = whole[:JSON_EDGE]
            self._tail = whole[-JSON_EDGE:]
            return
        self._tail = (self._tail + chunk)[-JSON_EDGE:]

    def body_ended(self, complete: bool) -> None:
        record = self.record
        found = BodyUsage()
        if self._too_big:
            if (self.content_encoding or "identity").strip().lower() == "identity":
                found = _edges_usage(self._head, self._tail)
        else:
            body = b"".join(self._chunks)
            decoded = decode_content(body, self.content_encoding, JSON_LIMIT) if body else None
            if decoded is not None:
                found = read_json_usage(decoded)
        self._chunks = []
        self._head = self._tail = b""
        if found.model:
            record.model = found.model
        if found.usage is not None:
            record.usage = found.usage
        elif record.usage is None and complete and not self._too_big and 200 <= record.status < 300:
            record.usage = _estimate_for(record, found.text)


_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,200})"')
_USAGE_FIELD = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')


def _edges_usage(head: bytes, tail: bytes) -> BodyUsage:
    """Model and usage of a large JSON body from its first and last bytes."""
    found = BodyUsage()
    match = _MODEL_FIELD.search(head)
    if match is not None:
        try:
            found.model = json.loads(b'"' + match.group(1) + b'"')
        except ValueError:
            pass
    matches = list(_USAGE_FIELD.finditer(tail))
    if matches:
        try:
            found.usage = normalize_usage(json.loads(matches[-1].group(1)))
        except ValueError:
            pass
    return found


def _estimate_for(record: RequestRecord, completion_text: str) -> dict[str, Any] | None:
    try:
        return estimate_usage(record.request_body, completion_text, record.model)
    except Exception:
        return None


def _header(response: Any, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def make_usage_tap(record: RequestRecord, response: Any) -> SSEUsageTap | JSONUsageTap | None:
    """
    A body tap factory C{(record, upstream_response) -> tap or None}: an
    L{SSEUsageTap} for event streams (stripping when
    C{record.usage_injected}), a L{JSONUsageTap} for JSON answers.
    """
    content_type = (_header(response, b"content-type") or "").lower()
    encoding = _header(response, b"content-encoding")
    if "text/event-stream" in content_type:
        if encoding and encoding.strip().lower() not in ("identity", ""):
            return None
        return SSEUsageTap(record, strip_usage=record.usage_injected)
    if "json" in content_type:
        return JSONUsageTap(record, encoding)
    return None


def ensure_usage(record: RequestRecord) -> None:
    """
    Fill C{record.usage}/C{record.model} from the captured response body
    when no tap did (a proxy without taps). Cache hits keep no usage: the
    provider used no tokens for them.
    """
    if record.model is None and record.request_body:
        record.model = prompt_text(record.request_body)[1]
    if record.cache_status in CACHE_HITS:
        return  # answered from the cache: the provider used no tokens
    if record.usage is not None or not (200 <= record.status < 300) or not record.response_body:
        return
    content_type = ""
    encoding = None
    for name, value in record.response_headers:
        lowered = name.lower()
        if lowered == b"content-type":
            content_type = value.decode("latin-1").lower()
        elif lowered == b"content-encoding":
            encoding = value.decode("latin-1")
    body = decode_content(record.response_body, encoding, JSON_LIMIT)
    if body is None:
        return
    if "text/event-stream" in content_type:
        tap = SSEUsageTap()
        tap.data_received(body)
        tap.body_ended(True)
        model, usage, text = tap.model, tap.usage, tap.completion_text
    elif "json" in content_type:
        found = read_json_usage(body)
        model, usage, text = found.model, found.usage, found.text
    else:
        return
    if model:
        record.model = model
    if usage is not None:
        record.usage = usage
    elif text or record.request_body:
        record.usage = _estimate_for(record, text)
