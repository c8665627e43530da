"""
The management API against the real resource tree (Root -> WebApp ->
/manage mount), driven with StubTreq, backed by the in-memory store.
Numbers in test names refer to the black-box checks of the Go llm-proxy
contract, adapted where llmproxy departs from it.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from llmproxy.audit.writer import AuditWriterService
from llmproxy.invalidation import InvalidationHub
from llmproxy.store.memory import MemoryStore
from llmproxy.web.app import WebApp
from llmproxy.web.manage import ManagementAPI
from llmproxy.web.root import Root

MT = "mt"
AUTH = {"Authorization": f"Bearer {MT}"}
UPSTREAM_KEY = "sk-upstream-0123456789abcdef"
TOKEN_RE = re.compile(r"^sk-[A-Za-z0-9_-]{22}$")
OBFUSCATED_TOKEN_RE = re.compile(r"^sk-[A-Za-z0-9_-]{4}\*{14}[A-Za-z0-9_-]{4}$")


def run_sync(f: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


class _Unused(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        raise AssertionError("the proxy must not be reached")


class Harness:
    """One daemon's worth of management API, fully in memory."""

    def __init__(self, file_path: str | None = None, max_body: int = 1024 * 1024) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryStore()
        self.audit = AuditWriterService(
            self.clock, store=self.store, file_path=file_path, run_blocking=run_sync
        )
        self.audit.startService()
        self.invalidation = InvalidationHub()
        self.announced: list[tuple[str, str]] = []
        self.invalidation.subscribe(lambda kind, key: self.announced.append((kind, key)))
        self.api = ManagementAPI(
            self.store, self.audit, self.invalidation, MT, self.clock, max_body=max_body
        )
        web = WebApp(clock=self.clock)
        web.mount("/manage/", self.api.resource())
        self.client = StubTreq(Root(web.resource(), _Unused()))


class ManagementTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, Any, Any]:
        hdrs = dict(AUTH) if auth else {}
        hdrs.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        d = self.h.client.request(method, "http://localhost" + path, data=data, headers=hdrs)
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        parsed = json.loads(content) if content else None
        return response.code, parsed, response.headers

    def assert_json_error(self, headers: Any, body: Any, error: str) -> None:
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(body["error"], error)

    def project(self, name: str = "p1", key: str = UPSTREAM_KEY) -> dict[str, Any]:
        code, body, _ = self.call("POST", "/manage/projects", {"name": name, "api_key": key})
        self.assertEqual(code, 201, body)
        return body  # type: ignore[no-any-return]

    def token(self, project_id: str, **extra: Any) -> dict[str, Any]:
        code, body, _ = self.call(
            "POST", "/manage/tokens", {"project_id": project_id, "duration_minutes": 60, **extra}
        )
        self.assertEqual(code, 201, body)
        return body  # type: ignore[no-any-return]

    def audit_events(self, **filters: str) -> list[dict[str, Any]]:
        query = "&".join(f"{k}={v}" for k, v in filters.items())
        code, body, _ = self.call("GET", "/manage/audit?page_size=100&" + query)
        self.assertEqual(code, 200)
        return body["events"]  # type: ignore[no-any-return]


class AuthTests(ManagementTestCase):
    def test_06_missing_header(self) -> None:
        code, body, headers = self.call("GET", "/manage/projects", auth=False)
        self.assertEqual(code, 401)
        self.assert_json_error(headers, body, "missing or invalid Authorization header")

    def test_07_wrong_token(self) -> None:
        code, body, _ = self.call(
            "GET", "/manage/projects", auth=False, headers={"Authorization": "Bearer wrong"}
        )
        self.assertEqual((code, body["error"]), (401, "invalid management token"))

    def test_08_other_schemes(self) -> None:
        for value in ("Basic bXQ=", "Bearer ", "bearer mt"):
            code, body, _ = self.call(
                "GET", "/manage/tokens", auth=False, headers={"Authorization": value}
            )
            self.assertEqual(
                (code, body["error"]), (401, "missing or invalid Authorization header"), value
            )

    def test_09_auth_before_method(self) -> None:
        for path in ("/manage/tokens", "/manage/projects/x", "/manage/audit", "/manage/nope"):
            code, _, _ = self.call("PUT", path, auth=False)
            self.assertEqual(code, 401, path)

    def test_request_ids_on_401(self) -> None:
        code, _, headers = self.call(
            "GET", "/manage/projects", auth=False, headers={"X-Request-ID": "abc"}
        )
        self.assertEqual(code, 401)
        self.assertEqual(headers.getRawHeaders("x-request-id"), ["abc"])
        self.assertTrue(headers.getRawHeaders("x-correlation-id"))

    def test_unknown_manage_path_is_json_404(self) -> None:
        code, body, headers = self.call("GET", "/manage/nope")
        self.assertEqual(code, 404)
        self.assert_json_error(headers, body, "not found")


class ProjectTests(ManagementTestCase):
    def test_10_create(self) -> None:
        code, body, headers = self.call(
            "POST", "/manage/projects", {"name": "p1", "api_key": UPSTREAM_KEY}
        )
        self.assertEqual(code, 201)
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        uuid.UUID(body["id"])
        self.assertEqual(body["name"], "p1")
        # Q3: never the full key, not even in the create answer.
        self.assertEqual(body["api_key"], "sk-upstr...cdef")
        self.assertIs(body["is_active"], True)
        self.assertEqual(body["created_at"], body["updated_at"])
        self.assertNotIn("deactivated_at", body)
        stored = self.successResultOf(self.h.store.get_project(body["id"]))
        self.assertEqual(stored.api_key, UPSTREAM_KEY)

    def test_11_missing_key(self) -> None:
        code, body, _ = self.call("POST", "/manage/projects", {"name": "p2"})
        self.assertEqual((code, body["error"]), (400, "name and api_key are required"))

    def test_12_not_json(self) -> None:
        for raw in (
            b"not json",
            b"",
            b"[1]",
            b'"x"',
            b'{"name": 5, "api_key": "k"}',
            b"[" * 100_000 + b"]" * 100_000,  # nested too deep to decode
            b'{"name": "x\\ud800", "api_key": "k"}',  # a lone surrogate: not UTF-8
            b'{"name": "a\\u0000b", "api_key": "k"}',  # NUL: PostgreSQL refuses it
        ):
            code, body, headers = self.call("POST", "/manage/projects", raw=raw)
            self.assertEqual(code, 400, raw)
            self.assert_json_error(headers, body, "invalid request body")
        self.assertEqual(self.successResultOf(self.h.store.list_projects()), [])

    def test_lenient_keys(self) -> None:
        code, body, _ = self.call(
            "POST", "/manage/projects", {"NAME": "p", "Api_Key": UPSTREAM_KEY, "extra": 1}
        )
        self.assertEqual((code, body["name"]), (201, "p"))

    def test_13_obfuscated_key_refused(self) -> None:
        for key in ("sk-proj-...wxyz", "sk-****1234"):
            code, body, _ = self.call("POST", "/manage/projects", {"name": "p", "api_key": key})
            self.assertEqual(
                (code, body["error"]),
                (400, "cannot save obfuscated API key - please provide the full API key"),
            )

    def test_14_duplicate_name_is_409(self) -> None:
        self.project("p1")
        code, body, headers = self.call(
            "POST", "/manage/projects", {"name": "p1", "api_key": "sk-other-key-0123456789"}
        )
        self.assertEqual(code, 409)
        self.assert_json_error(headers, body, "a project with this name already exists")
        self.assertEqual(len(self.successResultOf(self.h.store.list_projects())), 1)

    def test_name_too_long(self) -> None:
        code, body, _ = self.call(
            "POST", "/manage/projects", {"name": "x" * 256, "api_key": UPSTREAM_KEY}
        )
        self.assertEqual(code, 400)
        self.assertEqual(self.successResultOf(self.h.store.list_projects()), [])

    def test_oversized_body_413(self) -> None:
        self.h = Harness(max_body=1000)
        code, body, headers = self.call(
            "POST", "/manage/projects", {"name": "p", "api_key": "k" * 2000}
        )
        self.assertEqual(code, 413)
        self.assert_json_error(headers, body, "Request body too large")
        self.assertEqual(body["code"], "request_too_large")
        self.assertEqual(self.successResultOf(self.h.store.list_projects()), [])

    def test_15_list_sorted_obfuscated(self) -> None:
        code, body, _ = self.call("GET", "/manage/projects")
        self.assertEqual((code, body), (200, []))
        self.project("zeta")
        self.project("alpha")
        code, body, _ = self.call("GET", "/manage/projects")
        self.assertEqual([p["name"] for p in body], ["alpha", "zeta"])
        self.assertEqual({p["api_key"] for p in body}, {"sk-upstr...cdef"})

    def test_16_unknown(self) -> None:
        code, body, _ = self.call("GET", f"/manage/projects/{uuid.uuid4()}")
        self.assertEqual((code, body["error"]), (404, "project not found"))

    def test_17_empty_id(self) -> None:
        code, body, _ = self.call("GET", "/manage/projects/")
        self.assertEqual((code, body["error"]), (400, "invalid project id"))
        code, body, _ = self.call("GET", "/manage/projects/a/b")
        self.assertEqual((code, body["error"]), (400, "invalid project id"))

    def test_18_delete_refused(self) -> None:
        p = self.project()
        code, body, headers = self.call("DELETE", f"/manage/projects/{p['id']}")
        self.assertEqual(code, 405)
        self.assertEqual(headers.getRawHeaders("allow"), ["GET, PATCH"])
        self.assertEqual(
            body, {"error": "method not allowed", "message": "project deletion is not permitted"}
        )
        code, _, _ = self.call("GET", f"/manage/projects/{p['id']}")
        self.assertEqual(code, 200)
        [event] = self.audit_events(action="project.delete")
        self.assertEqual(event["outcome"], "failure")

    def test_19_put_refused(self) -> None:
        p = self.project()
        code, body, headers = self.call("PUT", f"/manage/projects/{p['id']}", {})
        self.assertEqual(code, 405)
        self.assert_json_error(headers, body, "method not allowed")

    def test_20_revoke_tokens_needs_deactivation(self) -> None:
        p = self.project()
        for patch in ({"revoke_tokens": True}, {"revoke_tokens": False, "is_active": True}):
            code, body, _ = self.call("PATCH", f"/manage/projects/{p['id']}", patch)
            self.assertEqual((code, body["error"]), (400, "revoke_tokens requires is_active=false"))

    def test_21_22_deactivate_and_reactivate(self) -> None:
        p = self.project()
        self.h.clock.advance(5)
        code, body, _ = self.call("PATCH", f"/manage/projects/{p['id']}", {"is_active": False})
        self.assertEqual(code, 200)
        self.assertIs(body["is_active"], False)
        self.assertIn("deactivated_at", body)
        self.assertEqual(body["api_key"], "sk-upstr...cdef")
        self.assertNotEqual(body["updated_at"], p["updated_at"])
        self.assertIn(("project", p["id"]), self.h.announced)
        _, again, _ = self.call("GET", f"/manage/projects/{p['id']}")
        self.assertEqual(again["deactivated_at"], body["deactivated_at"])
        code, body, _ = self.call("PATCH", f"/manage/projects/{p['id']}", {"is_active": True})
        self.assertEqual(code, 200)
        self.assertIs(body["is_active"], True)
        self.assertNotIn("deactivated_at", body)

    def test_23_empty_key_keeps_key(self) -> None:
        p = self.project()
        code, _, _ = self.call("PATCH", f"/manage/projects/{p['id']}", {"api_key": ""})
        self.assertEqual(code, 200)
        stored = self.successResultOf(self.h.store.get_project(p["id"]))
        self.assertEqual(stored.api_key, UPSTREAM_KEY)

    def test_key_change_announced(self) -> None:
        p = self.project()
        del self.h.announced[:]
        code, body, _ = self.call(
            "PATCH", f"/manage/projects/{p['id']}", {"api_key": "sk-new-key-abcdefghijklmnop"}
        )
        self.assertEqual((code, body["api_key"]), (200, "sk-new-k...mnop"))
        self.assertEqual(self.h.announced, [("project", p["id"])])
        stored = self.successResultOf(self.h.store.get_project(p["id"]))
        self.assertEqual(stored.api_key, "sk-new-key-abcdefghijklmnop")

    def test_patch_bad_input_writes_nothing(self) -> None:
        p = self.project()
        other = self.project("p2")
        cases = [
            (b"nope", 400, "invalid request body"),
            (b'{"is_active": "no"}', 400, "invalid request body"),
            (b'{"name": ""}', 400, "name must be 1 to 255 characters"),
            (b'{"api_key": "sk-****abcd"}', 400, None),
            (b'{"name": "p2"}', 409, "a project with this name already exists"),
        ]
        for raw, status, error in cases:
            code, body, _ = self.call("PATCH", f"/manage/projects/{p['id']}", raw=raw)
            self.assertEqual(code, status, raw)
            if error:
                self.assertEqual(body["error"], error)
        stored = self.successResultOf(self.h.store.get_project(p["id"]))
        self.assertEqual(
            (stored.name, stored.api_key, stored.is_active), ("p1", UPSTREAM_KEY, True)
        )
        self.assertEqual(self.successResultOf(self.h.store.get_project(other["id"])).name, "p2")
        code, body, _ = self.call("PATCH", f"/manage/projects/{uuid.uuid4()}", {"name": "x"})
        self.assertEqual((code, body["error"]), (404, "project not found"))

    def test_24_deactivate_and_revoke_tokens(self) -> None:
        p = self.project()
        t1, t2 = self.token(p["id"]), self.token(p["id"])
        del self.h.announced[:]
        code, _, _ = self.call(
            "PATCH", f"/manage/projects/{p['id']}", {"is_active": False, "revoke_tokens": True}
        )
        self.assertEqual(code, 200)
        _, tokens, _ = self.call("GET", f"/manage/tokens?projectId={p['id']}")
        self.assertEqual([t["is_active"] for t in tokens], [False, False])
        self.assertTrue(all(t["deactivated_at"] for t in tokens))
        hashes = {
            self.successResultOf(self.h.store.get_token(t["id"])).token_hash for t in (t1, t2)
        }
        self.assertEqual({k for kind, k in self.h.announced if kind == "token"}, hashes)
        [event] = self.audit_events(action="project.update")
        self.assertEqual(json.loads(event["metadata"])["tokens_revoked"], 2)


class TokenTests(ManagementTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.p = self.project()

    def test_25_create(self) -> None:
        code, body, _ = self.call(
            "POST", "/manage/tokens", {"project_id": self.p["id"], "duration_minutes": 60}
        )
        self.assertEqual(code, 201)  # Q2
        self.assertEqual(set(body), {"id", "token", "expires_at"})
        self.assertRegex(body["token"], TOKEN_RE)
        self.assertTrue(body["expires_at"].startswith("2027-01-15T09:00:00"))  # now + 60 min
        stored = self.successResultOf(self.h.store.get_token(body["id"]))
        self.assertNotIn(body["token"], repr(stored))
        self.assertEqual(len(stored.token_hash), 64)

    def test_26_27_28_max_requests(self) -> None:
        body = self.token(self.p["id"], max_requests=5)
        self.assertEqual(body["max_requests"], 5)
        body = self.token(self.p["id"], max_requests=0)
        self.assertNotIn("max_requests", body)
        _, got, _ = self.call("GET", f"/manage/tokens/{body['id']}")
        self.assertIsNone(got["max_requests"])
        code, err, _ = self.call(
            "POST",
            "/manage/tokens",
            {"project_id": self.p["id"], "duration_minutes": 60, "max_requests": -1},
        )
        self.assertEqual((code, err["error"]), (400, "max_requests must be >= 0"))

    def test_29_to_33_validation(self) -> None:
        pid = self.p["id"]
        cases = [
            ({"project_id": pid}, 400, "project_id and duration_minutes are required"),
            (
                {"project_id": pid, "duration_minutes": 525601},
                400,
                "duration_minutes exceeds maximum allowed",
            ),
            ({"project_id": "", "duration_minutes": 10}, 400, "project_id is required"),
            ({"project_id": str(uuid.uuid4()), "duration_minutes": 10}, 404, "project not found"),
            ({"project_id": pid, "duration_minutes": "10"}, 400, "invalid request body"),
            ({"project_id": pid, "duration_minutes": 1.5}, 400, "invalid request body"),
            ({"project_id": pid, "duration_minutes": True}, 400, "invalid request body"),
            ({"project_id": pid, "duration_minutes": 10**30}, 400, "invalid request body"),
        ]
        for payload, status, error in cases:
            code, body, _ = self.call("POST", "/manage/tokens", payload)
            self.assertEqual((code, body["error"]), (status, error), payload)
        self.assertEqual(self.successResultOf(self.h.store.list_tokens()), [])
        code, _, _ = self.call(
            "POST", "/manage/tokens", {"project_id": pid, "duration_minutes": 525600}
        )
        self.assertEqual(code, 201)

    def test_33_inactive_project(self) -> None:
        self.call("PATCH", f"/manage/projects/{self.p['id']}", {"is_active": False})
        code, body, _ = self.call(
            "POST", "/manage/tokens", {"project_id": self.p["id"], "duration_minutes": 10}
        )
        self.assertEqual(code, 403)
        self.assertEqual(
            body,
            {"error": "cannot create tokens for inactive projects", "code": "project_inactive"},
        )

    def test_34_list(self) -> None:
        first = self.token(self.p["id"])
        self.h.clock.advance(1)
        second = self.token(self.p["id"])
        code, body, _ = self.call("GET", "/manage/tokens")
        self.assertEqual(code, 200)
        self.assertEqual([t["id"] for t in body], [second["id"], first["id"]])
        for item in body:
            self.assertEqual(
                set(item),
                {
                    "id",
                    "token",
                    "project_id",
                    "expires_at",
                    "is_active",
                    "request_count",
                    "max_requests",
                    "created_at",
                    "last_used_at",
                    "cache_hit_count",
                    "deactivated_at",
                },
            )
            self.assertRegex(item["token"], OBFUSCATED_TOKEN_RE)
        self.assertEqual(body[0]["token"][:7], second["token"][:7])
        self.assertEqual(body[0]["token"][-4:], second["token"][-4:])

    def test_35_filters_and_paging(self) -> None:
        other = self.project("p2")
        a = self.token(self.p["id"])
        self.h.clock.advance(1)
        b = self.token(other["id"])
        self.h.clock.advance(1)
        c = self.token(self.p["id"])
        self.call("DELETE", f"/manage/tokens/{c['id']}")

        def ids(query: str) -> list[str]:
            code, body, _ = self.call("GET", "/manage/tokens" + query)
            self.assertEqual(code, 200, body)
            return [t["id"] for t in body]

        self.assertEqual(ids(f"?projectId={uuid.uuid4()}"), [])
        self.assertEqual(ids(f"?projectId={self.p['id']}"), [c["id"], a["id"]])
        self.assertEqual(ids(f"?project_id={other['id']}"), [b["id"]])
        self.assertEqual(ids(f"?project_id={self.p['id']}&active_only=true"), [a["id"]])
        self.assertEqual(ids("?limit=1"), [c["id"]])
        self.assertEqual(ids("?limit=1&offset=1"), [b["id"]])
        for bad in ("?limit=x", "?offset=1.5", "?active_only=maybe"):
            code, body, headers = self.call("GET", "/manage/tokens" + bad)
            self.assertEqual(code, 400, bad)
            self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])

    def test_36_get(self) -> None:
        t = self.token(self.p["id"])
        code, body, _ = self.call("GET", f"/manage/tokens/{t['id']}")
        self.assertEqual((code, body["id"]), (200, t["id"]))
        self.assertRegex(body["token"], OBFUSCATED_TOKEN_RE)
        code, body, _ = self.call("GET", f"/manage/tokens/{uuid.uuid4()}")
        self.assertEqual((code, body["error"]), (404, "token not found"))
        code, body, _ = self.call("GET", "/manage/tokens/")
        self.assertEqual((code, body["error"]), (400, "token ID is required"))

    def test_cache_hit_count_everywhere(self) -> None:
        t = self.token(self.p["id"])
        stored = self.successResultOf(self.h.store.get_token(t["id"]))
        self.successResultOf(self.h.store.add_cache_hits({stored.token_hash: 3}))
        _, listed, _ = self.call("GET", "/manage/tokens")
        _, got, _ = self.call("GET", f"/manage/tokens/{t['id']}")
        _, patched, _ = self.call("PATCH", f"/manage/tokens/{t['id']}", {"max_requests": 9})
        self.assertEqual(
            [listed[0]["cache_hit_count"], got["cache_hit_count"], patched["cache_hit_count"]],
            [3, 3, 3],
        )

    def test_37_patch(self) -> None:
        t = self.token(self.p["id"])
        token_hash = self.successResultOf(self.h.store.get_token(t["id"])).token_hash
        path = f"/manage/tokens/{t['id']}"
        code, body, _ = self.call("PATCH", path, {})
        self.assertEqual((code, body["error"]), (400, "no fields to update"))
        code, body, _ = self.call("PATCH", path, {"max_requests": -2})
        self.assertEqual((code, body["error"]), (400, "max_requests must be >= 0"))
        code, body, _ = self.call("PATCH", path, raw=b'{"is_active": 1}')
        self.assertEqual((code, body["error"]), (400, "invalid request body"))
        code, body, _ = self.call("PATCH", path, {"max_requests": 0})
        self.assertEqual(code, 200)
        self.assertIsNone(body["max_requests"])
        del self.h.announced[:]
        code, body, _ = self.call("PATCH", path, {"is_active": False})
        self.assertEqual(code, 200)
        self.assertIs(body["is_active"], False)
        self.assertIsNotNone(body["deactivated_at"])  # Q4
        self.assertEqual(self.h.announced, [("token", token_hash)])
        code, body, _ = self.call("PATCH", path, {"is_active": True})
        self.assertEqual((code, body["is_active"], body["deactivated_at"]), (200, True, None))
        code, body, _ = self.call("PATCH", f"/manage/tokens/{uuid.uuid4()}", {"is_active": True})
        self.assertEqual((code, body["error"]), (404, "token not found"))

    def test_38_revoke(self) -> None:
        t = self.token(self.p["id"])
        token_hash = self.successResultOf(self.h.store.get_token(t["id"])).token_hash
        del self.h.announced[:]
        for _ in range(2):
            self.h.clock.advance(1)
            response = self.successResultOf(
                self.h.client.delete(f"http://x/manage/tokens/{t['id']}", headers=AUTH)
            )
            self.assertEqual(response.code, 204)
            self.assertEqual(self.successResultOf(response.content()), b"")
        self.assertEqual(self.h.announced[0], ("token", token_hash))
        _, body, _ = self.call("GET", f"/manage/tokens/{t['id']}")
        self.assertIs(body["is_active"], False)
        self.assertIsNotNone(body["deactivated_at"])  # Q4
        events = self.audit_events(action="token.revoke")
        self.assertEqual(
            [json.loads(e["metadata"]).get("already_revoked") for e in events], [True, None]
        )
        code, body, _ = self.call("DELETE", f"/manage/tokens/{uuid.uuid4()}")
        self.assertEqual((code, body["error"]), (404, "token not found"))

    def test_39_bulk_revoke(self) -> None:
        tokens = [self.token(self.p["id"]) for _ in range(3)]
        self.call("DELETE", f"/manage/tokens/{tokens[0]['id']}")
        del self.h.announced[:]
        code, body, _ = self.call("POST", f"/manage/projects/{self.p['id']}/tokens/revoke")
        self.assertEqual(code, 200)
        self.assertEqual(body, {"revoked_count": 2, "already_revoked_count": 1, "total_tokens": 3})
        _, listed, _ = self.call("GET", "/manage/tokens")
        self.assertEqual([t["is_active"] for t in listed], [False] * 3)
        self.assertTrue(all(t["deactivated_at"] for t in listed))
        self.assertEqual(len([a for a in self.h.announced if a[0] == "token"]), 2)
        self.assertIn(("project", self.p["id"]), self.h.announced)

    def test_40_bulk_revoke_unknown_project(self) -> None:
        code, body, _ = self.call("POST", f"/manage/projects/{uuid.uuid4()}/tokens/revoke")
        self.assertEqual((code, body["error"]), (404, "project not found"))
        code, body, _ = self.call("GET", f"/manage/projects/{self.p['id']}/tokens/revoke")
        self.assertEqual((code, body["error"]), (400, "invalid project id"))

    def test_other_methods(self) -> None:
        for method, path in (("PUT", "/manage/tokens"), ("POST", "/manage/tokens/x")):
            code, body, headers = self.call(method, path, {})
            self.assertEqual(code, 405, path)
            self.assert_json_error(headers, body, "method not allowed")


class AuditApiTests(ManagementTestCase):
    def test_41_empty(self) -> None:
        code, body, _ = self.call("GET", "/manage/audit")
        self.assertEqual(code, 200)
        self.assertEqual(body["events"], [])  # Q13: [] not null
        self.assertEqual(
            body["pagination"],
            {
                "page": 1,
                "page_size": 20,
                "total_count": 0,
                "total_pages": 0,
                "has_next": False,
                "has_prev": False,
            },
        )

    def test_42_project_create_event(self) -> None:
        p = self.project()
        [event] = self.audit_events(action="project.create")
        self.assertEqual(event["actor"], "management_api")
        self.assertEqual(event["outcome"], "success")
        self.assertEqual(event["method"], "POST")
        self.assertEqual(event["path"], "/manage/projects")
        self.assertEqual(event["project_id"], p["id"])
        self.assertIsInstance(event["metadata"], str)
        self.assertIn('"project_name":"p1"', event["metadata"])
        self.assertNotIn(UPSTREAM_KEY, json.dumps(event))
        self.assertNotIn("sk-upstr", json.dumps(event))

    def test_request_and_correlation_ids_recorded(self) -> None:
        self.call(
            "GET",
            "/manage/projects",
            headers={"X-Request-ID": "req-1", "X-Correlation-ID": "corr-1"},
        )
        [event] = self.audit_events(action="project.list")
        self.assertEqual((event["request_id"], event["correlation_id"]), ("req-1", "corr-1"))
        [found] = self.audit_events(correlation_id="corr-1")
        self.assertEqual(found["id"], event["id"])

    def test_43_paging_clamped(self) -> None:
        for query, size in (
            ("page_size=500", 100),
            ("page_size=0", 1),
            ("page_size=-3", 1),
            ("page_size=abc", 20),
            ("page_size=7x", 7),
        ):
            code, body, _ = self.call("GET", "/manage/audit?" + query)
            self.assertEqual((code, body["pagination"]["page_size"]), (200, size), query)
        code, body, _ = self.call("GET", "/manage/audit?page=-4")
        self.assertEqual(body["pagination"]["page"], 1)

    def test_paging(self) -> None:
        for i in range(5):
            self.project(f"p{i}")
        code, body, _ = self.call("GET", "/manage/audit?action=project.create&page_size=2&page=2")
        self.assertEqual(len(body["events"]), 2)
        self.assertEqual(
            body["pagination"],
            {
                "page": 2,
                "page_size": 2,
                "total_count": 5,
                "total_pages": 3,
                "has_next": True,
                "has_prev": True,
            },
        )

    def test_time_filters(self) -> None:
        self.project("early")
        self.h.clock.advance(3600)
        self.project("late")
        code, body, _ = self.call(
            "GET", "/manage/audit?action=project.create&start_time=2027-01-15T08:30:00Z"
        )
        self.assertEqual(code, 200)
        self.assertEqual(
            [json.loads(e["metadata"])["project_name"] for e in body["events"]], ["late"]
        )
        code, body, _ = self.call(
            "GET", "/manage/audit?action=project.create&end_time=2027-01-15T08:30:00%2B00:00"
        )
        self.assertEqual(
            [json.loads(e["metadata"])["project_name"] for e in body["events"]], ["early"]
        )
        code, body, _ = self.call("GET", "/manage/audit?start_time=yesterday")
        self.assertEqual((code, body["error"]), (400, "invalid start_time"))

    def test_44_show(self) -> None:
        self.project()
        [event] = self.audit_events(action="project.create")
        code, body, _ = self.call("GET", f"/manage/audit/{event['id']}")
        self.assertEqual((code, body), (200, event))
        code, body, _ = self.call("GET", f"/manage/audit/{uuid.uuid4()}")
        self.assertEqual((code, body["error"]), (404, "audit event not found"))
        code, body, _ = self.call("GET", "/manage/audit/")
        self.assertEqual((code, body["error"]), (400, "audit event ID is required"))
        code, body, headers = self.call("POST", "/manage/audit")
        self.assertEqual(code, 405)
        self.assert_json_error(headers, body, "method not allowed")
        [shown] = self.audit_events(action="audit.show")
        self.assertIn(event["id"], shown["metadata"])

    def test_token_events_hide_secrets(self) -> None:
        t = self.token(self.p_id())
        self.call("GET", f"/manage/tokens/{t['id']}")
        self.call("PATCH", f"/manage/tokens/{t['id']}", {"max_requests": 3})
        self.call("DELETE", f"/manage/tokens/{t['id']}")
        dumped = json.dumps(self.audit_events())
        self.assertNotIn(t["token"], dumped)
        # The id appears in request paths (as in the Go llm-proxy), never as token_id.
        for e in self.audit_events():
            if "token_id" in e:
                self.assertEqual(e["token_id"], t["id"][:8] + "..." + t["id"][-4:])
        self.assertNotIn(UPSTREAM_KEY, dumped)
        [created] = self.audit_events(action="token.create")
        details = json.loads(created["metadata"])
        self.assertIn("...", details["token_id"])
        self.assertEqual(details["duration_minutes"], 60)
        self.assertEqual(created["token_id"], details["token_id"])
        [updated] = self.audit_events(action="token.update")
        self.assertEqual(json.loads(updated["metadata"])["updated_max_requests"], 3)

    def test_failures_audited(self) -> None:
        self.call("POST", "/manage/projects", raw=b"nope")
        self.call("POST", "/manage/tokens", {"project_id": "x", "duration_minutes": 10})
        [bad_project] = self.audit_events(action="project.create")
        self.assertEqual(bad_project["outcome"], "failure")
        self.assertIn("invalid request body", bad_project["metadata"])
        [bad_token] = self.audit_events(action="token.create")
        self.assertEqual(bad_token["outcome"], "failure")
        self.assertIn("project not found", bad_token["metadata"])

    def p_id(self) -> str:
        return self.project()["id"]  # type: ignore[no-any-return]
