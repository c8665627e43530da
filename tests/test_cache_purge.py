"""POST /manage/cache/purge through the real WebApp, next to the management branch."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.cache import MemoryCacheBackend, ResponseCache
from llmproxy.invalidation import InvalidationHub
from llmproxy.store.memory import MemoryStore
from llmproxy.web.app import WebApp
from llmproxy.web.cache_purge import CachePurgeHandler
from llmproxy.web.manage import ManagementAPI
from llmproxy.web.root import Root
from tests.cache_suite import PUBLIC, hdrs

AUTH = {"Authorization": "Bearer mt"}


class _Audit:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def record(self, event: Any) -> None:
        self.events.append(event)


class PurgeRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.audit = _Audit()
        self.cache = ResponseCache(MemoryCacheBackend(self.clock, 100, 1_000_000), self.clock)
        self.client = self.make_client(self.cache)

    def make_client(self, cache: ResponseCache | None) -> StubTreq:
        web = WebApp(clock=self.clock)
        management = ManagementAPI(
            MemoryStore(),
            self.audit,
            InvalidationHub(),
            "mt",
            self.clock,  # type: ignore[arg-type]
        )
        web.mount("/manage/", management.resource())
        CachePurgeHandler(cache, "mt", self.clock, audit=self.audit).install(web)
        from twisted.web.resource import Resource

        return StubTreq(Root(web.resource(), Resource()))

    def store(self, uri: str, project: str = "p1", body: bytes | None = None) -> None:
        method = "POST" if body is not None else "GET"
        request = hdrs({"Cache-Control": "public, max-age=60"}) if body is not None else hdrs()
        result = self.successResultOf(self.cache.lookup(method, uri, request, body, project))
        plan = self.cache.plan(result, 200, hdrs(PUBLIC), streaming=False)
        self.assertTrue(
            self.successResultOf(self.cache.store(result, plan, 200, hdrs(PUBLIC), b"{}"))
        )

    def call(
        self,
        payload: Any = None,
        method: str = "POST",
        headers: Any = AUTH,
        raw: bytes | None = None,
    ) -> tuple[int, Any, Any]:
        data = raw if raw is not None else json.dumps(payload).encode()
        response = self.successResultOf(
            self.client.request(
                method, "http://proxy/manage/cache/purge", headers=headers, data=data
            )
        )
        body = self.successResultOf(response.content())
        return response.code, json.loads(body), response.headers

    def last_audit(self) -> Any:
        purge = [e for e in self.audit.events if e.action == "cache.purge"]
        return purge[-1] if purge else None

    def test_auth_comes_first(self) -> None:
        code, body, headers = self.call({"method": "GET", "url": "/v1/x"}, headers={})
        self.assertEqual((code, body), (401, {"error": "missing or invalid Authorization header"}))
        code, body, _ = self.call({}, method="PUT", headers={"Authorization": "Bearer nope"})
        self.assertEqual((code, body), (401, {"error": "invalid management token"}))
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])

    def test_method_not_allowed(self) -> None:
        code, body, _ = self.call(method="GET", raw=b"")
        self.assertEqual(
            (code, body), (405, {"error": "method not allowed", "code": "method_not_allowed"})
        )
        self.assertIsNone(self.last_audit())

    def test_validation_messages(self) -> None:
        code, body, _ = self.call(raw=b"{nope")
        self.assertEqual((code, body), (400, {"error": "invalid JSON"}))
        self.assertEqual(self.last_audit().reason, "invalid_json")
        code, body, _ = self.call({"url": "/v1/models"})
        self.assertEqual((code, body), (400, {"error": "method and url are required"}))
        self.assertEqual(self.last_audit().outcome, "failure")
        self.assertEqual(self.last_audit().reason, "missing_fields")
        code, body, _ = self.call({"prefix": "/v1/"})
        self.assertEqual(code, 400)
        code, body, _ = self.call({"method": 1, "url": "/v1/models"})
        self.assertEqual((code, body), (400, {"error": "invalid JSON"}))
        code, body, _ = self.call({"method": "GET", "url": "http://h:notaport/x"})
        self.assertEqual((code, body), (400, {"error": "invalid URL"}))

    def test_nothing_to_purge(self) -> None:
        code, body, _ = self.call({"method": "GET", "url": "/v1/models"})
        self.assertEqual((code, body), (200, {"deleted": False, "count": 0}))
        code, body, _ = self.call({"method": "GET", "url": "/v1/models", "prefix": "zz"})
        self.assertEqual((code, body), (200, {"deleted": 0, "count": 0}))

    def test_exact_purge_removes_every_body_and_project(self) -> None:
        self.store("/v1/chat/completions", "a", b"one")
        self.store("/v1/chat/completions", "b", b"two")
        self.store("/v1/models", "a")
        code, body, _ = self.call({"METHOD": "post", "Url": "/v1/chat/completions"})
        self.assertEqual((code, body), (200, {"deleted": True, "count": 2}))
        event = self.last_audit()
        self.assertEqual(event.outcome, "success")
        self.assertEqual(event.details["purge_type"], "exact")
        self.assertEqual(event.details["count"], 2)
        self.assertEqual(event.details["method"], "POST")
        code, body, _ = self.call({"method": "GET", "url": "/v1/models"})
        self.assertEqual(body, {"deleted": True, "count": 1})

    def test_prefix_purge(self) -> None:
        self.store("/v1/models")
        self.store("/v1/models/gpt")
        self.store("/v1/files")
        code, body, _ = self.call({"method": "GET", "url": "/v1/models", "prefix": "/v1/models"})
        self.assertEqual((code, body), (200, {"deleted": 2, "count": 2}))
        self.assertEqual(self.last_audit().details["purge_type"], "prefix")
        hit = self.successResultOf(self.cache.lookup("GET", "/v1/files", hdrs(), None, "p1"))
        self.assertEqual(hit.outcome, "hit")

    def test_caching_disabled(self) -> None:
        self.client = self.make_client(None)
        code, body, _ = self.call({"method": "GET", "url": "/v1/models"})
        self.assertEqual((code, body), (400, {"error": "caching is disabled"}))
        self.assertEqual(self.last_audit().reason, "caching_disabled")

    def test_management_branch_still_served(self) -> None:
        response = self.successResultOf(
            self.client.get("http://proxy/manage/projects", headers=AUTH)
        )
        self.assertEqual(response.code, 200)
        response = self.successResultOf(
            self.client.get("http://proxy/manage/cache/other", headers=AUTH)
        )
        self.assertNotEqual(response.code, 200)
