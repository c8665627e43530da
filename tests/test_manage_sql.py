"""
The management API on the real SQL stores (SQLite, PostgreSQL, MariaDB):
duplicate names, revocation timestamps, audit paging and time filters go
through the database, over a real listening socket.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource

from llmproxy.audit.writer import AuditWriterService
from llmproxy.invalidation import InvalidationHub
from llmproxy.web.app import WebApp
from llmproxy.web.manage import ManagementAPI
from llmproxy.web.root import Root
from llmproxy.web.site import LLMProxySite
from tests.test_store_support import new_location, open_store

AUTH = {"Authorization": "Bearer mt"}
KEY = "sk-upstream-0123456789abcdef"


class _ManageOnSQL:
    kind = ""

    async def setUp(self) -> None:  # type: ignore[misc]
        tc: Any = self
        self.store = await open_store(tc, self.kind, new_location(tc, self.kind))
        self.audit_path = os.path.join(os.path.abspath(tc.mktemp()), "audit.log")
        self.audit = AuditWriterService(
            reactor,  # type: ignore[arg-type]
            store=self.store,
            file_path=self.audit_path,
            reactor=reactor,  # type: ignore[arg-type]
        )
        self.audit.startService()
        tc.addCleanup(self.audit.stopService)
        api = ManagementAPI(self.store, self.audit, InvalidationHub(), "mt", reactor)  # type: ignore[arg-type]
        web = WebApp(clock=reactor)  # type: ignore[arg-type]
        web.mount("/manage/", api.resource())
        site = LLMProxySite(
            Root(web.resource(), Resource()),
            clock=reactor,  # type: ignore[arg-type]
            max_request_size=1_000_000,
        )
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        tc.addCleanup(self.port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        tc.addCleanup(self.pool.closeCachedConnections)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        response = await treq.request(
            method, self.base + path, data=data, headers=AUTH, pool=self.pool
        )
        content = await response.content()
        return response.code, (json.loads(content) if content else None)

    async def test_flow(self) -> None:
        tc: Any = self
        code, project = await self.call("POST", "/manage/projects", {"name": "p1", "api_key": KEY})
        tc.assertEqual(code, 201, project)
        code, body = await self.call("POST", "/manage/projects", {"name": "p1", "api_key": KEY})
        tc.assertEqual((code, body["error"]), (409, "a project with this name already exists"))
        code, _ = await self.call("POST", "/manage/projects", {"name": "p2", "api_key": KEY})
        code, body = await self.call("PATCH", f"/manage/projects/{project['id']}", {"name": "p2"})
        tc.assertEqual(code, 409)

        tokens = []
        for _ in range(3):
            code, t = await self.call(
                "POST", "/manage/tokens", {"project_id": project["id"], "duration_minutes": 60}
            )
            tc.assertEqual(code, 201, t)
            tokens.append(t)
        code, _ = await self.call("DELETE", f"/manage/tokens/{tokens[0]['id']}")
        tc.assertEqual(code, 204)
        code, got = await self.call("GET", f"/manage/tokens/{tokens[0]['id']}")
        tc.assertIs(got["is_active"], False)
        tc.assertIsNotNone(got["deactivated_at"])
        code, body = await self.call("POST", f"/manage/projects/{project['id']}/tokens/revoke")
        tc.assertEqual(body, {"revoked_count": 2, "already_revoked_count": 1, "total_tokens": 3})
        code, listed = await self.call(
            "GET", f"/manage/tokens?project_id={project['id']}&limit=2&offset=1"
        )
        tc.assertEqual(len(listed), 2)
        tc.assertTrue(all(t["deactivated_at"] and not t["is_active"] for t in listed))
        code, listed = await self.call("GET", "/manage/tokens?active_only=true")
        tc.assertEqual((code, listed), (200, []))

        now = datetime.datetime.now(datetime.UTC)
        hour = datetime.timedelta(hours=1)
        before = (now - hour).isoformat().replace("+00:00", "Z")
        after = (now + hour).isoformat().replace("+00:00", "Z")
        code, page = await self.call("GET", f"/manage/audit?start_time={before}&page_size=2")
        tc.assertEqual(code, 200, page)
        tc.assertEqual(len(page["events"]), 2)
        tc.assertGreaterEqual(page["pagination"]["total_count"], 8)
        tc.assertTrue(page["pagination"]["has_next"])
        code, page = await self.call("GET", f"/manage/audit?start_time={after}")
        tc.assertEqual((code, page["events"]), (200, []))
        code, page = await self.call("GET", f"/manage/audit?end_time={before}")
        tc.assertEqual((code, page["events"]), (200, []))
        code, page = await self.call("GET", "/manage/audit?action=token.create&search=token_id")
        tc.assertEqual(page["pagination"]["total_count"], 3)
        event = page["events"][0]
        code, shown = await self.call("GET", f"/manage/audit/{event['id']}")
        tc.assertEqual((code, shown), (200, event))

    async def test_text_no_database_takes(self) -> None:
        """
        NUL (which PostgreSQL refuses) and escaped lone surrogates never
        reach the database: bodies carrying them are refused, ids and
        filters carrying them find nothing.
        """
        tc: Any = self
        for name in ("a\x00b", "x\ud800"):
            code, body = await self.call("POST", "/manage/projects", {"name": name, "api_key": KEY})
            tc.assertEqual((code, body["error"]), (400, "invalid request body"))
        for path, expected in (
            ("/manage/tokens?project_id=a%00b", (200, [])),
            ("/manage/projects/a%00b", (404, "project not found")),
            ("/manage/tokens/a%00b", (404, "token not found")),
            ("/manage/audit/a%00b", (404, "audit event not found")),
        ):
            code, body = await self.call("GET", path)
            tc.assertEqual((code, body if code == 200 else body["error"]), expected, path)
        for name in ("search", "action", "actor", "client_ip"):
            code, body = await self.call("GET", f"/manage/audit?{name}=a%00b")
            tc.assertEqual((code, body["events"]), (200, []), name)
        code, body = await self.call("GET", "/manage/projects/%ff%fe")
        tc.assertEqual((code, body["code"]), (400, "bad_request"))


class SQLiteManageTests(_ManageOnSQL, TestCase):
    kind = "sqlite"


class PostgresManageTests(_ManageOnSQL, TestCase):
    kind = "postgres"


class MySQLManageTests(_ManageOnSQL, TestCase):
    kind = "mysql"
