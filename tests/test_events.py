"""Instrumentation events: schema, usage parsing and estimation, in-memory bus, publisher."""

from __future__ import annotations

import gzip
import json
import os
import time
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.config import Config
from llmproxy.events.filelog import FileEventLog
from llmproxy.events.memory import MemoryEventBus
from llmproxy.events.publisher import EventPublisher
from llmproxy.events.schema import SCHEMA_VERSION, event_from_record
from llmproxy.events.tokenize import CL100K, O200K, count_tokens, encoding_for_model
from llmproxy.events.usage import (
    JSONUsageTap,
    SSEUsageTap,
    ensure_usage,
    estimate_usage,
    prepare_request_body,
    read_json_usage,
)
from llmproxy.proxy.record import RequestRecord


def config(**env: str) -> Config:
    values = {"MANAGEMENT_TOKEN": "m" * 32}
    values.update(env)
    return Config.from_env(values)


CHAT_REQUEST = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello to the world"}]}
).encode()


def record(**kw: Any) -> RequestRecord:
    now = time.monotonic()
    r = RequestRecord(
        request_id="req-1",
        method="POST",
        path="/v1/chat/completions",
        received_at=now - 1.0,
        received_at_wall=1_700_000_000.25,
        provider="openai",
        project_id="proj-1",
        token_id="tok-1",
        status=200,
        upstream_started_at=now - 0.9,
        upstream_headers_at=now - 0.5,
        finished_at=now,
        request_body=CHAT_REQUEST,
    )
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def chunk(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chat_chunk(content: str | None, finish: str | None = None, usage_null: bool = False) -> dict:
    delta = {} if content is None else {"content": content}
    obj: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage_null:
        obj["usage"] = None
    return obj


USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


def stream(with_usage: bool, usage_null: bool = False) -> tuple[bytes, bytes]:
    """(what the provider sends, what it would send without include_usage)"""
    parts = [chat_chunk(w, usage_null=usage_null) for w in ("Hel", "lo", " world")]
    parts.append(chat_chunk(None, "stop", usage_null=usage_null))
    plain = b"".join(chunk(chat_chunk(w)) for w in ("Hel", "lo", " world"))
    plain += chunk(chat_chunk(None, "stop")) + b"data: [DONE]\n\n"
    body = b"".join(chunk(p) for p in parts)
    if with_usage:
        last = chat_chunk(None)
        last["choices"] = []
        last["usage"] = USAGE
        body += chunk(last)
    return body + b"data: [DONE]\n\n", plain


def split_every(data: bytes, n: int) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)]


class EventSchemaTests(SynchronousTestCase):
    def test_non_stream_event(self) -> None:
        answer = json.dumps(
            {
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [{"message": {"content": "Hi"}}],
                "usage": USAGE,
            }
        ).encode()
        r = record(
            response_body=answer,
            bytes_sent=len(answer),
            response_headers=[
                (b"Content-Type", b"application/json"),
                (b"Set-Cookie", b"session=secret"),
                (b"X-Multi", b"a"),
                (b"X-Multi", b"b"),
            ],
            cache_status="miss",
        )
        tap = JSONUsageTap(r)
        tap.data_received(answer[:10])
        tap.data_received(answer[10:])
        tap.body_ended(True)
        event = event_from_record(r, config())
        json.dumps(event)  # serialisable
        self.assertEqual(event["schema_version"], SCHEMA_VERSION)
        self.assertEqual(event["request_id"], "req-1")
        self.assertEqual(event["timestamp"], "2023-11-14T22:13:20.250Z")
        self.assertEqual((event["project_id"], event["token_id"]), ("proj-1", "tok-1"))
        self.assertEqual(
            (event["method"], event["path"], event["status"]), ("POST", "/v1/chat/completions", 200)
        )
        self.assertEqual(event["model"], "gpt-4o-mini-2024-07-18")
        self.assertEqual(event["usage"], dict(USAGE, source="reported"))
        self.assertEqual(event["cache_status"], "miss")
        self.assertFalse(event["streamed"])
        self.assertIsNone(event["error_kind"])
        self.assertAlmostEqual(event["durations"]["total_ms"], 1000.0, delta=5)
        self.assertAlmostEqual(event["durations"]["upstream_ttfb_ms"], 400.0, delta=5)
        self.assertAlmostEqual(event["durations"]["proxy_overhead_ms"], 100.0, delta=5)
        self.assertEqual(event["request_body"]["text"], CHAT_REQUEST.decode())
        self.assertFalse(event["request_body"]["truncated"])
        self.assertEqual(json.loads(event["response_body"]["text"])["usage"], USAGE)
        self.assertNotIn("set-cookie", event["response_headers"])
        self.assertEqual(event["response_headers"]["x-multi"], "a, b")
        self.assertEqual(sorted(event), sorted(k.lower() for k in event))  # snake_case keys

    def test_stream_event(self) -> None:
        body, _ = stream(with_usage=True)
        r = record(streamed=True, response_headers=[(b"content-type", b"text/event-stream")])
        tap = SSEUsageTap(r)
        for piece in split_every(body, 7):
            tap.data_received(piece)
        tap.body_ended(True)
        r.response_body = body
        r.bytes_sent = len(body)
        event = event_from_record(r, config())
        self.assertTrue(event["streamed"])
        self.assertEqual(event["usage"], dict(USAGE, source="reported"))
        self.assertEqual(event["model"], "gpt-4o-mini-2024-07-18")
        self.assertIn("data: [DONE]", event["response_body"]["text"])

    def test_error_event(self) -> None:
        body = b'{"error":"Upstream unreachable","code":"upstream_unreachable"}'
        r = record(
            status=502,
            error_kind="upstream_unreachable",
            upstream_headers_at=None,
            response_body=body,
            response_headers=[(b"content-type", b"application/json")],
        )
        ensure_usage(r)
        event = event_from_record(r, config())
        self.assertEqual(event["status"], 502)
        self.assertEqual(event["error_kind"], "upstream_unreachable")
        self.assertIsNone(event["usage"])
        self.assertIsNone(event["durations"]["upstream_ttfb_ms"])
        self.assertEqual(event["response_body"]["text"], body.decode())

    def test_aborted_stream_event(self) -> None:
        body, _ = stream(with_usage=False)
        cut = body[:60]
        r = record(
            streamed=True,
            status=200,
            error_kind="client_aborted",
            response_body=cut,
            bytes_sent=len(cut),
        )
        r.response_headers = [(b"content-type", b"text/event-stream")]
        ensure_usage(r)
        event = event_from_record(r, config())
        self.assertEqual(event["error_kind"], "client_aborted")
        self.assertEqual(event["usage"]["source"], "estimated")
        self.assertEqual(event["response_body"]["text"], cut.decode())

    def test_bodies_capped(self) -> None:
        big = b'{"model":"x","messages":[{"role":"user","content":"' + b"a" * 5000 + b'"}]}'
        r = record(request_body=big, response_body=b"b" * 3000, bytes_sent=9000)
        r.response_headers = [(b"content-type", b"text/plain")]
        cfg = config(
            OBSERVABILITY_MAX_REQUEST_BODY_BYTES="100", OBSERVABILITY_MAX_RESPONSE_BODY_BYTES="2000"
        )
        event = event_from_record(r, cfg)
        self.assertEqual(len(event["request_body"]["text"]), 100)
        self.assertTrue(event["request_body"]["truncated"])
        self.assertEqual(len(event["response_body"]["text"]), 2000)
        self.assertTrue(event["response_body"]["truncated"])

    def test_proxy_capture_shorter_than_sent_is_truncated(self) -> None:
        r = record(
            response_body=b"x" * 100,
            bytes_sent=5000,
            response_headers=[(b"content-type", b"text/plain")],
        )
        self.assertTrue(event_from_record(r, config())["response_body"]["truncated"])

    def test_binary_omitted_unless_configured(self) -> None:
        audio = bytes(range(256)) * 4
        r = record(
            response_body=audio,
            bytes_sent=len(audio),
            response_headers=[(b"content-type", b"audio/mpeg")],
        )
        event = event_from_record(r, config())
        self.assertEqual(
            event["response_body"],
            {"text": None, "encoding": None, "truncated": False, "binary": True},
        )
        kept = event_from_record(r, config(LOG_BINARY_RESPONSES="1"))["response_body"]
        self.assertEqual(kept["encoding"], "base64")
        import base64

        self.assertEqual(base64.b64decode(kept["text"]), audio)

    def test_gzip_response_is_text(self) -> None:
        body = json.dumps({"ok": True}).encode()
        r = record(
            response_body=gzip.compress(body),
            response_headers=[
                (b"content-type", b"application/json"),
                (b"content-encoding", b"gzip"),
            ],
        )
        self.assertEqual(event_from_record(r, config())["response_body"]["text"], body.decode())

    def test_utf8_cut_inside_a_character(self) -> None:
        body = "é".encode() * 10
        r = record(response_body=body, response_headers=[(b"content-type", b"text/plain")])
        cfg = config(OBSERVABILITY_MAX_RESPONSE_BODY_BYTES="5")
        field = event_from_record(r, cfg)["response_body"]
        self.assertEqual(field["text"], "éé")
        self.assertTrue(field["truncated"])


class SSEUsageTapTests(SynchronousTestCase):
    def run_tap(self, body: bytes, sizes: int, strip: bool) -> tuple[bytes, SSEUsageTap]:
        tap = SSEUsageTap(strip_usage=strip)
        out = b"".join(tap.feed(p) for p in split_every(body, sizes)) + tap.flush()
        return out, tap

    def test_passthrough_when_not_stripping(self) -> None:
        body, _ = stream(with_usage=True)
        for size in (1, 2, 3, 5, 13, 64, len(body)):
            out, tap = self.run_tap(body, size, strip=False)
            self.assertEqual(out, body)
            self.assertEqual(tap.usage, dict(USAGE, source="reported"))
            self.assertEqual(tap.model, "gpt-4o-mini-2024-07-18")
            self.assertEqual(tap.completion_text, "Hello world")

    def test_strips_exactly_the_usage_chunk(self) -> None:
        body, plain = stream(with_usage=True)
        for size in (1, 2, 3, 5, 7, 13, 64, 200, len(body)):
            out, tap = self.run_tap(body, size, strip=True)
            self.assertEqual(out, plain, f"chunk size {size}")
            self.assertEqual(tap.usage, dict(USAGE, source="reported"))
            self.assertEqual(tap.stripped, 1)

    def test_strips_usage_null_members_too(self) -> None:
        body, plain = stream(with_usage=True, usage_null=True)
        for size in (1, 4, 17, len(body)):
            out, _ = self.run_tap(body, size, strip=True)
            self.assertEqual(out, plain)

    def test_strips_usage_null_in_any_position_and_spacing(self) -> None:
        tap = SSEUsageTap(strip_usage=True)
        spaced = b'data: {"id": "a", "usage": null, "choices": [{"delta": {"content": "x"}}]}\n'
        self.assertEqual(
            tap.feed(spaced), b'data: {"id": "a", "choices": [{"delta": {"content": "x"}}]}\n'
        )
        tricky = (
            b'data: {"choices": [{"delta": {"content": "\\"usage\\":null}"}}], "usage": null}\n'
        )
        self.assertEqual(
            tap.feed(tricky), b'data: {"choices": [{"delta": {"content": "\\"usage\\":null}"}}]}\n'
        )

    def test_crlf_lines(self) -> None:
        body, plain = stream(with_usage=True)
        body, plain = body.replace(b"\n", b"\r\n"), plain.replace(b"\n", b"\r\n")
        for size in (1, 3, len(body)):
            out, tap = self.run_tap(body, size, strip=True)
            self.assertEqual(out, plain)
            self.assertEqual(tap.usage["total_tokens"], 14)

    def test_holds_back_only_the_partial_line(self) -> None:
        tap = SSEUsageTap(strip_usage=True)
        first = chunk(chat_chunk("Hel"))
        self.assertEqual(tap.feed(first + b'data: {"partial'), first)
        self.assertEqual(tap.flush(), b'data: {"partial')

    def test_client_that_asked_for_usage_keeps_it(self) -> None:
        body, _ = stream(with_usage=True)
        out, tap = self.run_tap(body, 9, strip=False)
        self.assertEqual(out, body)

    def test_responses_api_and_anthropic_usage(self) -> None:
        responses = chunk({"type": "response.output_text.delta", "delta": "Hi"}) + chunk(
            {
                "type": "response.completed",
                "response": {
                    "model": "gpt-4.1",
                    "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7},
                },
            }
        )
        _, tap = self.run_tap(responses, 10, strip=False)
        self.assertEqual(
            tap.usage,
            {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "source": "reported"},
        )
        self.assertEqual((tap.model, tap.completion_text), ("gpt-4.1", "Hi"))
        start = {"model": "claude-3", "usage": {"input_tokens": 9, "output_tokens": 1}}
        anthropic = b"event: message_start\n" + chunk({"type": "message_start", "message": start})
        anthropic += b"event: message_delta\n"
        anthropic += chunk({"type": "message_delta", "usage": {"output_tokens": 4}})
        _, tap = self.run_tap(anthropic, 6, strip=False)
        self.assertEqual(
            tap.usage,
            {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13, "source": "reported"},
        )

    def test_no_usage_is_estimated(self) -> None:
        body, _ = stream(with_usage=False)
        r = record(streamed=True)
        tap = SSEUsageTap(r)
        for piece in split_every(body, 11):
            tap.data_received(piece)
        tap.body_ended(True)
        self.assertEqual(r.usage["source"], "estimated")
        self.assertEqual(r.usage["completion_tokens"], count_tokens("Hello world", "gpt-4o-mini"))
        self.assertEqual(r.usage["prompt_tokens"], count_tokens("Say hello to the world", "gpt-4o"))
        self.assertEqual(
            r.usage["total_tokens"], r.usage["prompt_tokens"] + r.usage["completion_tokens"]
        )

    def test_long_stream_without_usage_keeps_all_its_text(self) -> None:
        # Lines without usage figures are read only when needed, in batches:
        # every word still reaches the estimate, in order.
        words = [f"w{i} " for i in range(4000)]
        lines = [
            b'data: {"model":"gpt-4o-mini","choices":[{"delta":{"content":"'
            + w.encode()
            + b'"}}]}\n\n'
            for w in words
        ]
        tap = SSEUsageTap(record(streamed=True), strip_usage=True)
        out = b"".join(tap.feed(line) for line in lines) + tap.flush()
        self.assertEqual(out, b"".join(lines))
        self.assertEqual(tap.completion_text, "".join(words))

    def test_the_first_event_is_relayed_unparsed_and_the_model_still_recorded(self) -> None:
        first = b'data: {"model":"m1","choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
        usage = (
            b'data: {"model":"m1","choices":[],'
            b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
        )
        for tail, source in ((usage, "reported"), (b"", "estimated")):
            r = record(streamed=True)
            tap = SSEUsageTap(r, strip_usage=True)
            self.assertEqual(tap.feed(first), first.replace(b',"usage":null', b""))
            self.assertIsNone(tap.model)  # not parsed on the way to the client
            self.assertEqual(tap.feed(tail + b"data: [DONE]\n\n"), b"data: [DONE]\n\n")
            tap.body_ended(True)
            self.assertEqual((r.model, r.usage["source"]), ("m1", source))

    def test_usage_null_is_stripped_from_lines_read_later(self) -> None:
        first = b'data: {"model":"m","choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
        second = b'data: {"model":"m","choices":[{"delta":{"content":"b"}}],"usage":null}\n\n'
        tap = SSEUsageTap(record(streamed=True), strip_usage=True)
        out = tap.feed(first) + tap.feed(second)
        self.assertNotIn(b"usage", out)
        self.assertEqual(
            [json.loads(x[6:]) for x in out.split(b"\n\n") if x],
            [
                {"model": "m", "choices": [{"delta": {"content": "a"}}]},
                {"model": "m", "choices": [{"delta": {"content": "b"}}]},
            ],
        )
        self.assertEqual(tap.completion_text, "ab")


class PrepareRequestBodyTests(SynchronousTestCase):
    path = "/v1/chat/completions"

    def test_injects_for_streaming_chat(self) -> None:
        body = b'{"model":"gpt-4o","stream":true,"messages":[]}'
        new, injected = prepare_request_body(body, "application/json", self.path, config())
        self.assertTrue(injected)
        self.assertEqual(json.loads(new)["stream_options"], {"include_usage": True})
        self.assertEqual(
            new,
            b'{"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true,"messages":[]}',
        )

    def test_existing_stream_options_extended(self) -> None:
        body = b'{"stream":true,"stream_options":{"foo":1}}'
        new, injected = prepare_request_body(body, "application/json", self.path, config())
        self.assertTrue(injected)
        self.assertEqual(json.loads(new)["stream_options"], {"foo": 1, "include_usage": True})

    def test_untouched_cases(self) -> None:
        cases = [
            (
                b'{"stream":true,"stream_options":{"include_usage":true}}',
                "application/json",
                self.path,
                config(),
            ),
            (b'{"stream":false}', "application/json", self.path, config()),
            (b'{"model":"x"}', "application/json", self.path, config()),
            (b'{"stream":true}', "application/json", "/v1/completions", config()),
            (b'{"stream":true}', "multipart/form-data", self.path, config()),
            (b'{"stream":true', "application/json", self.path, config()),
            (
                b'{"stream":true}',
                "application/json",
                self.path,
                config(STREAM_INCLUDE_USAGE="false"),
            ),
        ]
        for body, ctype, path, cfg in cases:
            self.assertEqual(prepare_request_body(body, ctype, path, cfg), (body, False), body)


class UsageHelpersTests(SynchronousTestCase):
    def test_read_json_usage(self) -> None:
        found = read_json_usage(
            json.dumps(
                {"model": "m", "choices": [{"message": {"content": "abc"}}], "usage": USAGE}
            ).encode()
        )
        self.assertEqual(
            (found.model, found.usage, found.text), ("m", dict(USAGE, source="reported"), "abc")
        )
        self.assertIsNone(read_json_usage(b"not json").usage)

    def test_encodings(self) -> None:
        self.assertEqual(encoding_for_model("gpt-4o-mini"), O200K)
        self.assertEqual(encoding_for_model("o1-preview"), O200K)
        self.assertEqual(encoding_for_model("gpt-4"), CL100K)
        self.assertEqual(encoding_for_model(None), CL100K)

    def test_estimate(self) -> None:
        usage = estimate_usage(CHAT_REQUEST, "Hello there", None)
        self.assertEqual(usage["source"], "estimated")
        self.assertGreater(usage["prompt_tokens"], 3)
        self.assertEqual(usage["completion_tokens"], 2)

    def test_large_json_body_usage_from_its_edges(self) -> None:
        vectors = [
            {"object": "embedding", "index": i, "embedding": [0.125] * 64} for i in range(3000)
        ]
        usage = {"prompt_tokens": 70, "total_tokens": 70}
        body = json.dumps(
            {"object": "list", "model": "text-embedding-3-small", "data": vectors, "usage": usage}
        ).encode()
        self.assertGreater(len(body), 1 << 20)
        r = record(path="/v1/embeddings")
        tap = JSONUsageTap(r)
        for piece in split_every(body, 16384):
            tap.data_received(piece)
        tap.body_ended(True)
        self.assertEqual(r.model, "text-embedding-3-small")
        self.assertEqual(
            r.usage,
            {"prompt_tokens": 70, "completion_tokens": 0, "total_tokens": 70, "source": "reported"},
        )

    def test_ensure_usage_from_captured_json(self) -> None:
        answer = json.dumps({"model": "gpt-4o", "choices": [], "usage": USAGE}).encode()
        r = record(response_body=answer, response_headers=[(b"content-type", b"application/json")])
        ensure_usage(r)
        self.assertEqual(r.usage, dict(USAGE, source="reported"))

    def test_cache_hits_have_no_usage(self) -> None:
        answer = json.dumps({"model": "gpt-4o", "choices": [], "usage": USAGE}).encode()
        r = record(response_body=answer, cache_status="hit")
        r.response_headers = [(b"content-type", b"application/json")]
        ensure_usage(r)
        self.assertIsNone(r.usage)
        self.assertEqual(r.model, "gpt-4o-mini")  # from the request


class MemoryBusTests(SynchronousTestCase):
    def test_fan_out_on_next_turn(self) -> None:
        clock = Clock()
        bus = MemoryEventBus(clock, capacity=10)
        seen: list[dict] = []
        other: list[dict] = []
        bus.subscribe(seen.append)
        bus.subscribe(other.append)
        bus.publish({"n": 1})
        self.assertEqual(seen, [])  # never inside the publisher's call
        clock.advance(0)
        self.assertEqual(seen, [{"n": 1}])
        self.assertEqual(other, [{"n": 1}])

    def test_overflow_counted(self) -> None:
        clock = Clock()
        bus = MemoryEventBus(clock, capacity=3)
        seen: list[dict] = []
        bus.subscribe(seen.append)
        for n in range(5):
            bus.publish({"n": n})
        self.assertEqual((bus.published, bus.dropped), (3, 2))
        clock.advance(0)
        self.assertEqual([e["n"] for e in seen], [0, 1, 2])
        self.assertEqual(bus.stats()["dropped"], 2)

    def test_failing_subscriber_does_not_stop_others(self) -> None:
        clock = Clock()
        bus = MemoryEventBus(clock)
        seen: list[dict] = []

        def broken(event: dict) -> None:
            raise RuntimeError("boom")

        bus.subscribe(broken)
        bus.subscribe(seen.append)
        bus.publish({"n": 1})
        clock.advance(0)
        self.assertEqual(len(seen), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop_delivers_queued(self) -> None:
        clock = Clock()
        bus = MemoryEventBus(clock)
        seen: list[dict] = []
        bus.subscribe(seen.append)
        bus.publish({"n": 1})
        bus.stop()
        self.assertEqual(len(seen), 1)


class PublisherTests(SynchronousTestCase):
    def test_publishes_one_event_per_request_including_cache_hits(self) -> None:
        clock = Clock()
        bus = MemoryEventBus(clock)
        seen: list[dict] = []
        bus.subscribe(seen.append)
        publisher = EventPublisher(bus, config())
        answer = json.dumps({"model": "gpt-4o", "choices": [], "usage": USAGE}).encode()
        r = record(
            response_body=answer,
            response_headers=[(b"content-type", b"application/json")],
            cache_status="hit",
        )
        publisher.request_started(r)
        publisher.request_finished(r)
        publisher.request_finished(record(method="OPTIONS", status=204, request_body=b""))
        clock.advance(0)
        self.assertEqual(len(seen), 2)
        self.assertEqual(seen[0]["cache_status"], "hit")
        self.assertIsNone(seen[0]["usage"])
        self.assertEqual(seen[1]["method"], "OPTIONS")

    def test_no_event_built_without_listeners(self) -> None:
        bus = MemoryEventBus(Clock())
        EventPublisher(bus, config()).request_finished(record())
        self.assertEqual(bus.published, 0)
        seen: list[dict] = []
        bus.subscribe(seen.append)
        EventPublisher(bus, config()).request_finished(record())
        self.assertEqual(bus.published, 1)

    def test_disabled(self) -> None:
        clock = Clock()
        bus = MemoryEventBus(clock)
        seen: list[dict] = []
        bus.subscribe(seen.append)
        EventPublisher(bus, config(OBSERVABILITY_ENABLED="false")).request_finished(record())
        clock.advance(0)
        self.assertEqual(seen, [])

    def test_file_event_log(self) -> None:
        clock = Clock()
        path = os.path.join(self.mktemp(), "events.jsonl")
        log = FileEventLog(path, clock)
        log.open()
        bus = MemoryEventBus(clock)
        bus.subscribe(log)
        publisher = EventPublisher(bus, config())
        publisher.request_finished(record(request_id="a"))
        publisher.request_finished(record(request_id="b"))
        clock.advance(0)
        clock.advance(1.0)
        log.close()
        with open(path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual([e["request_id"] for e in lines], ["a", "b"])
