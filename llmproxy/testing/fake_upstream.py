"""
A fake OpenAI-compatible upstream for tests: a real twisted.web server.

It answers like OpenAI so llmproxy (or any application) can be exercised
without a network or a provider key, and it records what it received so tests
can assert on what a proxy forwarded.

Endpoints::

    POST /v1/chat/completions   chat.completion, or with "stream": true an SSE
                                stream of chat.completion.chunk events: a role
                                chunk, N content chunks, a finish chunk, a usage
                                chunk (choices: [], usage set) only when
                                stream_options.include_usage is true (then
                                every other chunk has "usage": null), then
                                "data: [DONE]"
    POST /v1/completions        text_completion (streams too)
    POST /v1/embeddings         deterministic vectors derived from the input,
                                "float" or "base64" encoding, with usage
    GET  /v1/models             the model list
    GET  /v1/models/<id>        one model, or 404 model_not_found

Any other path answers 404 with an OpenAI-style error body (unless echo mode
is on). The "model" of a request is echoed in its answer.

Knobs, set per request as a header or a query parameter (the header wins):

=====================================  =======================================
``X-Fake-Chunks`` / ``fake_chunks``     content chunks in a stream (default 3);
                                        also the number of words of a
                                        non-streaming answer
``X-Fake-Chunk-Delay-Ms`` /             delay between two stream events up to
``fake_chunk_delay_ms``                 the finish chunk (it, the usage chunk
                                        and ``[DONE]`` come together, as from
                                        OpenAI) and between big-body chunks;
                                        0 writes all at once (default 0)
``X-Fake-Latency-Ms`` /                 delay before the response headers
``fake_latency_ms``                     (default 0)
``X-Fake-Error-Status`` /               answer with this status and an
``fake_error_status``                   OpenAI-style error body
``X-Fake-Error-Message`` /              message of that error body
``fake_error_message``
``X-Fake-Cut-After`` /                  close the connection after K stream
``fake_cut_after``                      events (or K big-body chunks, or K
                                        bytes of a non-streaming body): what
                                        was written is flushed, then the
                                        connection closes with the body
                                        unfinished (no last chunk, no
                                        ``[DONE]``, short of Content-Length)
``X-Fake-Body-Bytes`` /                 answer 200 with a body of this size
``fake_body_bytes``                     (``5000``, ``64KB``, ``2MB``, ``1GB``),
                                        ``application/octet-stream``, written
                                        in 64 KiB chunks by a push producer
                                        that honours backpressure
``X-Fake-Gzip`` / ``fake_gzip``         ``1``: gzip a complete (non-stream)
                                        answer when the request's
                                        ``Accept-Encoding`` names ``gzip``, as
                                        OpenAI's edge does
``X-Fake-Echo`` / ``fake_echo``         ``1``: answer 200 JSON describing the
                                        request received: method, path, query,
                                        headers (every one, repeated ones
                                        kept, in order), body_sha256,
                                        body_length
=====================================  =======================================

Use in trial tests::

    fake = FakeUpstream(clock=reactor)
    listening = fake.listen(reactor)          # listening.url == "http://127.0.0.1:PORT"
    self.addCleanup(listening.stop)
    ...
    fake.requests[0].header("authorization") == "Bearer sk-real"
    fake.disconnects[0].events_sent == 3

With a L{twisted.internet.task.Clock} (SynchronousTestCase), pacing follows
the clock: each C{clock.advance(delay)} releases one more stream event.
For TLS see L{llmproxy.testing.tls}. From a shell:
C{twistd -n llmproxy-fake-upstream --port tcp:9999}.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import struct
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

BIG_CHUNK_SIZE = 64 * 1024

DEFAULT_MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-3.5-turbo",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
)

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", None),
    503: ("server_error", "service_unavailable"),
}


@attrs.frozen
class ReceivedRequest:
    """One request as the fake upstream saw it."""

    method: bytes
    path: bytes
    query: bytes
    #: every header line as (lower-case name, value), repeated ones kept
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header C{name} (any case), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self.headers if k == wanted]

    def json(self) -> Any:
        return json.loads(self.body)


@attrs.frozen
class StreamDisconnect:
    """A client that went away before a stream or body finished."""

    path: bytes
    events_sent: int


def parse_size(text: str) -> int:
    """C{"5000"}, C{"64KB"}, C{"2MB"}, C{"1GB"} (binary multiples) to bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]i?b?|b)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {text!r}")
    unit = (m.group(2) or "b").lower()[:1]
    return int(m.group(1)) * {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]


@attrs.define
class Knobs:
    """Per-request behaviour read from C{X-Fake-*} headers or C{fake_*} query params."""

    chunks: int = 3
    chunk_delay: float = 0.0
    latency: float = 0.0
    error_status: int | None = None
    error_message: str | None = None
    cut_after: int | None = None
    body_bytes: int | None = None
    echo: bool = False
    gzip: bool = False

    @classmethod
    def from_request(cls, request: Request) -> Knobs:
        def get(name: str) -> str | None:
            value = request.getHeader("x-fake-" + name.replace("_", "-"))
            if value is None:
                values = request.args.get(b"fake_" + name.encode("ascii"))
                if values:
                    value = values[0].decode("utf-8", "replace")
            return value

        knobs = cls()
        if (v := get("chunks")) is not None:
            knobs.chunks = max(0, int(v))
        if (v := get("chunk_delay_ms")) is not None:
            knobs.chunk_delay = float(v) / 1000.0
        if (v := get("latency_ms")) is not None:
            knobs.latency = float(v) / 1000.0
        if (v := get("error_status")) is not None:
            knobs.error_status = int(v)
        knobs.error_message = get("error_message")
        if (v := get("cut_after")) is not None:
            knobs.cut_after = max(0, int(v))
        if (v := get("body_bytes")) is not None:
            knobs.body_bytes = parse_size(v)
        if (v := get("echo")) is not None:
            knobs.echo = v.strip().lower() in ("1", "true", "yes", "on")
        if (v := get("gzip")) is not None:
            knobs.gzip = v.strip().lower() in ("1", "true", "yes", "on")
        return knobs


@attrs.frozen
class ListeningFake:
    """A fake upstream bound to a port; C{url} has no trailing slash."""

    port: IListeningPort
    url: str

    def stop(self) -> Any:
        """Stop listening (a Deferred; return it from a cleanup)."""
        return self.port.stopListening()


@attrs.define(eq=False)
class FakeUpstream:
    """
    The recording state of the fake plus its twisted.web resource and site.

    @ivar requests: every request received, in arrival order.
    @ivar disconnects: streams and big bodies whose client went away early.
    """

    clock: IReactorTime
    models: tuple[str, ...] = DEFAULT_MODELS
    requests: list[ReceivedRequest] = attrs.field(factory=list)
    disconnects: list[StreamDisconnect] = attrs.field(factory=list)
    connections_opened: int = 0
    connections_lost: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_cut: int = 0
    #: events or chunks written across all streams, for "did it keep going" checks
    events_sent: int = 0
    _ids: int = 0

    @property
    def disconnects_mid_stream(self) -> int:
        return len(self.disconnects)

    @property
    def last_request(self) -> ReceivedRequest:
        return self.requests[-1]

    def resource(self) -> Resource:
        return _FakeResource(self)

    def site(self) -> Site:
        """A Site counting connections; its timeouts run on C{clock}."""
        return _FakeSite(self, self.resource(), reactor=self.clock)

    def listen(
        self,
        reactor: IReactorTCP,
        interface: str = "127.0.0.1",
        port: int = 0,
        context_factory: Any = None,
        hostname: str | None = None,
    ) -> ListeningFake:
        """
        Listen on C{interface}:C{port} (0 picks a free port).

        With C{context_factory} (e.g. L{llmproxy.testing.tls.TestPKI.server_options})
        it listens with TLS and the URL is C{https://localhost:PORT} (or C{hostname}).
        """
        if context_factory is None:
            bound = reactor.listenTCP(port, self.site(), interface=interface)  # type: ignore[arg-type]
            scheme, host = "http", hostname or interface
        else:
            bound = reactor.listenSSL(  # type: ignore[attr-defined]
                port, self.site(), context_factory, interface=interface
            )
            scheme, host = "https", hostname or "localhost"
        bound_port = bound.getHost().port  # type: ignore[attr-defined]
        return ListeningFake(bound, f"{scheme}://{host}:{bound_port}")

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.requests.clear()
        self.disconnects.clear()
        self.connections_opened = self.connections_lost = 0
        self.streams_started = self.streams_completed = self.streams_cut = 0
        self.events_sent = 0

    def next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-fake{self._ids:010d}"

    def now(self) -> int:
        return int(self.clock.seconds())


class _CountingProtocol(ProtocolWrapper):
    pass


@attrs.define
class _ConnectionCounter:
    fake: FakeUpstream

    def registerProtocol(self, p: Protocol) -> None:
        self.fake.connections_opened += 1

    def unregisterProtocol(self, p: Protocol) -> None:
        self.fake.connections_lost += 1


class _FakeSite(Site):
    def __init__(self, fake: FakeUpstream, resource: Resource, reactor: Any) -> None:
        super().__init__(resource, reactor=reactor)
        self._counter = _ConnectionCounter(fake)

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        return _CountingProtocol(self._counter, channel)  # type: ignore[arg-type]

    def log(self, request: Any) -> None:
        """No access log: the recorded requests say more."""


def _accepts_gzip(request: Request) -> bool:
    accepted = b",".join(request.requestHeaders.getRawHeaders(b"accept-encoding", []))
    for part in accepted.split(b","):
        coding, _, params = part.partition(b";")
        if coding.strip().lower() in (b"gzip", b"x-gzip"):
            name, _, q = params.partition(b"=")
            try:
                return name.strip().lower() != b"q" or float(q) > 0
            except ValueError:
                return False
    return False


def _json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode("utf-8")


def openai_error(status: int, message: str | None = None, param: str | None = None) -> dict:
    """An error body shaped like OpenAI's for C{status}."""
    etype, code = _ERROR_TYPES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return {
        "error": {
            "message": message or f"Injected error with status {status}.",
            "type": etype,
            "param": param,
            "code": code,
        }
    }


def _words(n: int) -> list[str]:
    return [f"word{i} " for i in range(n)]


def _count_tokens(value: Any) -> int:
    """A deterministic stand-in for tokenization: whitespace-separated words."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_count_tokens(v) for v in value)
    if isinstance(value, dict):
        return sum(_count_tokens(v) for k, v in value.items() if k in ("content", "text"))
    if isinstance(value, int):
        return 1
    return 0


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """Deterministic unit-free floats in [-1, 1) derived from C{text}."""
    out: list[float] = []
    counter = 0
    while len(out) < dimensions:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        for i in range(0, len(digest), 4):
            (n,) = struct.unpack(">I", digest[i : i + 4])
            out.append(round(n / 2**31 - 1.0, 6))
        counter += 1
    return out[:dimensions]


class _FakeResource(Resource):
    isLeaf = True

    def __init__(self, fake: FakeUpstream) -> None:
        super().__init__()
        self.fake = fake

    def render(self, request: Request) -> Any:
        body = request.content.read() if request.content is not None else b""
        path = request.path
        query = request.uri.partition(b"?")[2]
        headers = tuple(
            (name.lower(), value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        )
        method = request.method
        self.fake.requests.append(ReceivedRequest(method, path, query, headers, body))
        try:
            knobs = Knobs.from_request(request)
        except ValueError as e:
            return _json(request, 400, openai_error(400, f"bad fake knob: {e}"))
        exchange = _Exchange(self.fake, request, knobs, body)
        if knobs.latency > 0:
            exchange.later(knobs.latency, exchange.respond)
            request.notifyFinish().addErrback(lambda _f: exchange.cancel())
            return NOT_DONE_YET
        return exchange.respond()


class _Exchange:
    """One request's answer, possibly delayed, streamed or cut."""

    def __init__(self, fake: FakeUpstream, request: Request, knobs: Knobs, body: bytes) -> None:
        self.fake = fake
        self.request = request
        self.knobs = knobs
        self.body = body
        self.pending: IDelayedCall | None = None
        #: nothing more will be written (finished, cut, or the client left)
        self.gone = False
        #: the fake itself ended the answer (finish or cut)
        self.ended = False
        self.sent = 0

    def later(self, delay: float, f: Callable[[], Any]) -> None:
        self.pending = self.fake.clock.callLater(delay, f)

    def cancel(self) -> None:
        self.gone = True
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None

    # -- dispatch

    def respond(self) -> Any:
        """Build the answer; returns bytes or NOT_DONE_YET (writes itself when delayed)."""
        delayed = self.knobs.latency > 0
        if delayed and self.gone:
            return None
        result = self._answer()
        if delayed and result is not NOT_DONE_YET:
            self.request.write(result)
            self.request.finish()
        return result

    def _answer(self) -> Any:
        request, knobs = self.request, self.knobs
        if knobs.echo:
            return self._plain(_json(request, 200, self._echo()))
        if knobs.error_status is not None:
            status = knobs.error_status
            return self._plain(_json(request, status, openai_error(status, knobs.error_message)))
        if knobs.body_bytes is not None:
            return self._big()
        path = request.path.rstrip(b"/")
        method = request.method
        if path == b"/v1/models":
            if method != b"GET":
                return self._not_allowed()
            data = [self._model(m) for m in self.fake.models]
            return self._plain(_json(request, 200, {"object": "list", "data": data}))
        if path.startswith(b"/v1/models/"):
            model = path[len(b"/v1/models/") :].decode("utf-8", "replace")
            if method != b"GET":
                return self._not_allowed()
            if model not in self.fake.models:
                err = openai_error(404, f"The model '{model}' does not exist", "model")
                err["error"]["code"] = "model_not_found"
                return self._plain(_json(request, 404, err))
            return self._plain(_json(request, 200, self._model(model)))
        handlers = {
            b"/v1/chat/completions": self._chat,
            b"/v1/completions": self._completions,
            b"/v1/embeddings": self._embeddings,
        }
        handler = handlers.get(path)
        if handler is None:
            msg = (
                f"Unknown request URL: {method.decode()} {request.path.decode('utf-8', 'replace')}."
            )
            return self._plain(_json(request, 404, openai_error(404, msg)))
        if method != b"POST":
            return self._not_allowed()
        try:
            payload = json.loads(self.body)
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except ValueError:
            msg = "We could not parse the JSON body of your request."
            return self._plain(_json(request, 400, openai_error(400, msg)))
        return handler(payload)

    def _not_allowed(self) -> Any:
        msg = f"Method {self.request.method.decode()} not allowed for this path."
        return self._plain(_json(self.request, 405, openai_error(405, msg)))

    def _model(self, model: str) -> dict:
        return {"id": model, "object": "model", "created": 1686935002, "owned_by": "fake-upstream"}

    def _echo(self) -> dict:
        request = self.request
        received = self.fake.requests[-1]
        return {
            "method": request.method.decode("latin-1"),
            "path": request.path.decode("latin-1"),
            "query": received.query.decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in received.headers],
            "body_sha256": hashlib.sha256(self.body).hexdigest(),
            "body_length": len(self.body),
        }

    def _plain(self, data: bytes) -> Any:
        """A complete body, unless a cut is asked for: then K bytes and an abort."""
        self.request.setHeader(b"x-request-id", self.fake.next_id("req").encode())
        if self.knobs.gzip and _accepts_gzip(self.request):
            data = gzip.compress(data)
            self.request.setHeader(b"content-encoding", b"gzip")
        if self.knobs.cut_after is None:
            return data
        self.request.setHeader(b"content-length", str(len(data)).encode())
        self.request.write(data[: self.knobs.cut_after])
        self.ended = True
        self.fake.streams_cut += 1
        self._close_transport()
        return NOT_DONE_YET

    # -- OpenAI endpoints

    def _usage(self, prompt: int, completion: int | None) -> dict:
        usage: dict[str, int] = {"prompt_tokens": prompt}
        if completion is not None:
            usage["completion_tokens"] = completion
        usage["total_tokens"] = prompt + (completion or 0)
        return usage

    def _chat(self, payload: dict) -> Any:
        model = str(payload.get("model", "gpt-4o"))
        prompt = max(1, _count_tokens(payload.get("messages", [])))
        words = _words(self.knobs.chunks)
        cid, created = self.fake.next_id("chatcmpl"), self.fake.now()
        if not payload.get("stream"):
            return self._plain(
                _json(
                    self.request,
                    200,
                    {
                        "id": cid,
                        "object": "chat.completion",
                        "created": created,
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "".join(words)},
                                "logprobs": None,
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": self._usage(prompt, len(words)),
                        "system_fingerprint": "fp_fake",
                    },
                )
            )

        include_usage = (payload.get("stream_options") or {}).get("include_usage") is True

        def chunk(delta: dict, finish: str | None) -> dict:
            event = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if include_usage:
                # as OpenAI: "usage": null on every chunk but the last
                event["usage"] = None
            return event

        events = [chunk({"role": "assistant", "content": ""}, None)]
        events += [chunk({"content": w}, None) for w in words]
        events.append(chunk({}, "stop"))
        if include_usage:
            last = chunk({}, None)
            last["choices"] = []
            last["usage"] = self._usage(prompt, len(words))
            events.append(last)
        return self._stream(events)

    def _completions(self, payload: dict) -> Any:
        model = str(payload.get("model", "gpt-3.5-turbo-instruct"))
        prompt = max(1, _count_tokens(payload.get("prompt", "")))
        words = _words(self.knobs.chunks)
        cid, created = self.fake.next_id("cmpl"), self.fake.now()

        def choice(text: str, finish: str | None) -> dict:
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

        if not payload.get("stream"):
            body = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [choice("".join(words), "stop")],
                "usage": self._usage(prompt, len(words)),
            }
            return self._plain(_json(self.request, 200, body))
        base = {"id": cid, "object": "text_completion", "created": created, "model": model}
        events = [dict(base, choices=[choice(w, None)]) for w in words]
        events.append(dict(base, choices=[choice("", "stop")]))
        if (payload.get("stream_options") or {}).get("include_usage") is True:
            events.append(dict(base, choices=[], usage=self._usage(prompt, len(words))))
        return self._stream(events)

    def _embeddings(self, payload: dict) -> Any:
        model = str(payload.get("model", "text-embedding-3-small"))
        raw = payload.get("input", "")
        inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        dimensions = int(payload.get("dimensions") or 8)
        as_base64 = payload.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(inputs):
            vector = embedding_vector(json.dumps(item), dimensions)
            embedding: Any = vector
            if as_base64:
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        prompt = max(1, _count_tokens(inputs))
        body = {"object": "list", "data": data, "model": model, "usage": self._usage(prompt, None)}
        return self._plain(_json(self.request, 200, body))

    # -- streaming

    def _stream(self, events: list[dict]) -> Any:
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-request-id", self.fake.next_id("req").encode())
        # compact JSON, "usage" last, as OpenAI writes its chunks
        lines = [
            b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events
        ]
        # A delay follows every event before the finish chunk; as from OpenAI,
        # the finish chunk, the usage chunk and [DONE] come together.
        paced = len(lines)
        while paced > 1 and not events[paced - 1].get("choices"):
            paced -= 1
        lines.append(b"data: [DONE]\n\n")
        self.fake.streams_started += 1
        request.notifyFinish().addErrback(self._lost)
        self._pump(lines, paced)
        return NOT_DONE_YET

    def _lost(self, _failure: Failure) -> None:
        if not self.ended:
            self.fake.disconnects.append(StreamDisconnect(self.request.path, self.sent))
        self.cancel()

    def _pump(self, lines: list[bytes], paced: int) -> None:
        """Write C{lines} from the C{self.sent}th on, a delay after each before the C{paced}th."""
        self.pending = None
        if self.gone:
            return
        delay = self.knobs.chunk_delay
        cut_after = self.knobs.cut_after
        while self.sent < len(lines):
            if cut_after is not None and self.sent >= cut_after:
                self._cut()
                return
            self.request.write(lines[self.sent])
            self.sent += 1
            self.fake.events_sent += 1
            if delay > 0 and self.sent < paced:
                self.later(delay, lambda: self._pump(lines, paced))
                return
        if cut_after is not None and self.sent >= cut_after:
            # the cut point is at or past the end: still no clean end
            self._cut()
            return
        self.gone = self.ended = True
        self.fake.streams_completed += 1
        self.request.finish()

    def _close_transport(self) -> None:
        # loseConnection, not abortConnection: what was written reaches the
        # client first, then the connection closes with the body unfinished.
        self.request.channel.transport.loseConnection()

    def _cut(self) -> None:
        self.gone = self.ended = True
        self.fake.streams_cut += 1
        self._close_transport()

    def _big(self) -> Any:
        request = self.request
        size = self.knobs.body_bytes or 0
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(size).encode())
        request.setHeader(b"x-request-id", self.fake.next_id("req").encode())
        self.fake.streams_started += 1
        producer = _BigBodyProducer(self, size)
        request.notifyFinish().addErrback(self._lost)
        request.registerProducer(producer, True)
        producer.resumeProducing()
        return NOT_DONE_YET


@implementer(IPushProducer)
class _BigBodyProducer:
    """Writes C{size} bytes in 64 KiB chunks while the consumer is not paused."""

    # chunks written per reactor turn before yielding, so one big body cannot
    # starve other connections
    per_turn = 16

    def __init__(self, exchange: _Exchange, size: int) -> None:
        self.exchange = exchange
        self.remaining = size
        self.paused = False
        self.scheduled = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        if not self.paused:
            self.pauses += 1
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if not self.scheduled:
            self._produce()

    def stopProducing(self) -> None:
        self.exchange.cancel()

    def _produce(self) -> None:
        ex = self.exchange
        self.scheduled = False
        ex.pending = None
        written = 0
        chunk = b"x" * BIG_CHUNK_SIZE
        while not self.paused and not ex.gone:
            if ex.knobs.cut_after is not None and ex.sent >= ex.knobs.cut_after:
                ex.request.unregisterProducer()
                ex._cut()
                return
            if self.remaining <= 0:
                ex.gone = ex.ended = True
                ex.fake.streams_completed += 1
                ex.request.unregisterProducer()
                ex.request.finish()
                return
            n = min(self.remaining, BIG_CHUNK_SIZE)
            ex.request.write(chunk[:n])
            self.remaining -= n
            ex.sent += 1
            ex.fake.events_sent += 1
            written += 1
            delay = ex.knobs.chunk_delay
            if delay > 0 or written >= self.per_turn:
                self.scheduled = True
                ex.later(delay, self._produce)
                return
