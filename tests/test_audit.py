"""The audit writer: sinks, batching, flushing on stop, and secrets kept out."""

from __future__ import annotations

import json
import os
from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from llmproxy.audit import events as ev
from llmproxy.audit.writer import AuditWriterService
from llmproxy.store.memory import MemoryStore
from llmproxy.store.records import AuditEvent, AuditQuery

TOKEN = "sk-AbCdEfGhIjKlMnOpQrStUv"


def run_sync(f: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


def event(clock: Clock, action: str = "token.create", **details: Any) -> AuditEvent:
    return ev.make_event(
        action=action,
        actor=ev.ACTOR_MANAGEMENT,
        outcome=ev.SUCCESS,
        timestamp=ev.utc_now(clock),
        details={"http_method": "POST", "endpoint": "/manage/tokens", **details},
        request_id="r1",
        correlation_id="c1",
        client_ip="10.0.0.1",
    )


def rows(store: MemoryStore) -> list[AuditEvent]:
    d = store.list_audit_events(AuditQuery(), 1_000_000, 0)
    result: list[AuditEvent] = []
    d.addCallback(lambda r: result.extend(r[0]))
    return result


def lines(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@attrs.frozen
class Rejection:
    """Shaped like llmproxy.tokens.validator.Rejection (the hook reads it by attribute)."""

    status: int
    error: str
    code: str
    description: str = ""
    kind: str = "auth"
    token: Any = None


class _FailingStore(MemoryStore):
    def insert_audit_events(self, events: Any) -> defer.Deferred[None]:
        return defer.fail(RuntimeError("database is down"))


class WriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore()
        self.path = os.path.join(self.mktemp(), "sub", "audit.log")

    def writer(self, **kw: Any) -> AuditWriterService:
        kw.setdefault("store", self.store)
        kw.setdefault("file_path", self.path)
        w = AuditWriterService(self.clock, run_blocking=run_sync, **kw)
        w.startService()
        self.addCleanup(lambda: w.running and w.stopService())
        return w

    def test_both_sinks_after_interval(self) -> None:
        w = self.writer(flush_interval=0.2)
        w.record(event(self.clock, duration_minutes=60))
        self.assertEqual((lines(self.path), rows(self.store)), ([], []))
        self.clock.advance(0.2)
        [line] = lines(self.path)
        self.assertEqual(line["action"], "token.create")
        self.assertEqual(line["result"], "success")
        self.assertEqual(line["details"]["duration_minutes"], 60)
        self.assertEqual((line["request_id"], line["correlation_id"]), ("r1", "c1"))
        [row] = rows(self.store)
        self.assertEqual((row.method, row.path, row.outcome), ("POST", "/manage/tokens", "success"))
        self.assertEqual(row.id, line["id"])

    def test_batch_size_flushes_without_waiting(self) -> None:
        w = self.writer(batch_size=10, flush_interval=60)
        for _ in range(10):
            w.record(event(self.clock))
        self.assertEqual(len(lines(self.path)), 10)
        self.assertEqual(len(rows(self.store)), 10)

    def test_db_only(self) -> None:
        w = self.writer(file_path="")
        w.record(event(self.clock))
        self.successResultOf(w.flush())
        self.assertEqual(len(rows(self.store)), 1)
        self.assertFalse(os.path.exists(self.path))

    def test_file_only(self) -> None:
        w = self.writer(store=None)
        w.record(event(self.clock))
        self.successResultOf(w.flush())
        self.assertEqual(len(lines(self.path)), 1)
        self.assertEqual(rows(self.store), [])

    def test_disabled(self) -> None:
        w = self.writer(enabled=False)
        w.record(event(self.clock))
        self.successResultOf(w.flush())
        self.clock.advance(10)
        self.assertEqual((lines(self.path), rows(self.store)), ([], []))

    def test_no_directory_creation(self) -> None:
        w = self.writer(create_dir=False, store=None)
        w.record(event(self.clock))
        self.successResultOf(w.flush())
        self.assertFalse(os.path.exists(os.path.dirname(self.path)))
        self.assertEqual(len(self.flushLoggedErrors(FileNotFoundError)), 1)

    def test_queued_before_start(self) -> None:
        w = AuditWriterService(
            self.clock, store=self.store, file_path=self.path, run_blocking=run_sync
        )
        w.record(event(self.clock))
        self.assertEqual(lines(self.path), [])
        w.startService()
        self.successResultOf(w.flush())
        self.assertEqual(len(lines(self.path)), 1)
        self.successResultOf(w.stopService())

    def test_stop_flushes_and_later_events_dropped(self) -> None:
        w = self.writer(flush_interval=60)
        for _ in range(3):
            w.record(event(self.clock))
        self.successResultOf(w.stopService())
        self.assertEqual(len(lines(self.path)), 3)
        self.assertEqual(len(rows(self.store)), 3)
        w.record(event(self.clock))
        self.assertEqual(w.dropped, 1)

    def test_database_failure_keeps_file(self) -> None:
        w = self.writer(store=_FailingStore())
        w.record(event(self.clock))
        self.successResultOf(w.flush())
        self.assertEqual(len(lines(self.path)), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_queue_bound(self) -> None:
        w = self.writer(max_queue=2, flush_interval=60, batch_size=100)
        for _ in range(5):
            w.record(event(self.clock))
        self.assertEqual(w.dropped, 3)
        self.successResultOf(w.flush())
        self.assertEqual(len(lines(self.path)), 2)


class ProxyDeniedTests(SynchronousTestCase):
    def request(self) -> DummyRequest:
        request = DummyRequest([b"v1", b"chat", b"completions"])
        request.method = b"POST"
        request.path = b"/v1/chat/completions"
        request.requestHeaders.setRawHeaders(b"user-agent", [b"curl/8"])
        request.requestHeaders.setRawHeaders(b"x-forwarded-for", [b"203.0.113.9, 10.0.0.1"])
        request.request_id = "rid"  # type: ignore[attr-defined]
        return request

    def test_denied_event(self) -> None:
        clock = Clock()
        e = ev.proxy_denied(
            self.request(),
            clock,
            reason="token_inactive",
            presented_token=TOKEN,
            token_id="0b9f6f0e-7c44-4a8e-9d2a-3c1f5e6d7a8b",
            project_id="p1",
            status=401,
        )
        self.assertEqual((e.action, e.actor, e.outcome), ("proxy_request", "system", "denied"))
        self.assertEqual((e.client_ip, e.request_id, e.project_id), ("203.0.113.9", "rid", "p1"))
        self.assertEqual(
            (e.method, e.path, e.user_agent), ("POST", "/v1/chat/completions", "curl/8")
        )
        self.assertEqual(e.details["token"], "sk-AbCd**************StUv")
        self.assertEqual(e.token_id, "0b9f6f0e...7a8b")
        dumped = json.dumps(ev.event_line(e)) + json.dumps(ev.event_json(e))
        self.assertNotIn(TOKEN, dumped)
        self.assertNotIn("0b9f6f0e-7c44-4a8e-9d2a-3c1f5e6d7a8b", dumped)

    def test_garbage_token_never_echoed(self) -> None:
        secret = "some-other-provider-secret-value"
        e = ev.proxy_denied(self.request(), Clock(), reason="invalid_token", presented_token=secret)
        self.assertNotIn(secret, json.dumps(ev.event_line(e)))
        e = ev.proxy_denied(self.request(), Clock(), reason="invalid_token", presented_token="abc")
        self.assertEqual(e.details["token"], "***")

    def test_proxy_hook(self) -> None:
        from llmproxy.store.records import Token

        recorded: list[AuditEvent] = []

        class Sink:
            def record(self, e: AuditEvent) -> None:
                recorded.append(e)

        hook = ev.proxy_rejection_hook(Sink(), Clock())
        token = Token(
            id="0b9f6f0e-7c44-4a8e-9d2a-3c1f5e6d7a8b",
            token_hash="h" * 64,
            display="sk-AbCd**************StUv",
            project_id="p1",
            is_active=False,
            created_at=ev.utc_now(Clock()),
        )
        hook(
            self.request(),
            Rejection(401, "Token is inactive", "token_inactive", token=token),
            TOKEN,
        )
        hook(
            self.request(),
            Rejection(
                503, "Service temporarily unavailable", "service_unavailable", kind="dependency"
            ),
            None,
        )
        denied, failed = recorded
        self.assertEqual((denied.outcome, denied.reason, denied.project_id), ("denied", None, "p1"))
        self.assertEqual(denied.details["reason"], "token_inactive")
        self.assertEqual(denied.details["status_code"], 401)
        self.assertEqual(denied.token_id, "0b9f6f0e...7a8b")
        self.assertNotIn(TOKEN, json.dumps(ev.event_line(denied)))
        self.assertEqual(
            (failed.outcome, failed.details["reason"]), ("error", "service_unavailable")
        )

    def test_unknown_outcome_refused(self) -> None:
        self.assertRaises(
            ValueError, ev.proxy_denied, self.request(), Clock(), reason="x", outcome="maybe"
        )


class StopFlushesEverythingTests(TestCase):
    """Real threads and a real file: nothing queued is lost on stop."""

    @defer.inlineCallbacks
    def test_5000_events(self) -> Any:
        clock = Clock()
        store = MemoryStore()
        path = os.path.join(self.mktemp(), "audit.log")
        w = AuditWriterService(reactor, store=store, file_path=path, reactor=reactor)  # type: ignore[arg-type]
        w.startService()
        for i in range(5000):
            w.record(event(clock, n=i))
        yield w.stopService()
        written = lines(path)
        self.assertEqual(len(written), 5000)
        self.assertEqual([line["details"]["n"] for line in written], list(range(5000)))
        self.assertEqual(len(rows(store)), 5000)
