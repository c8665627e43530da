"""
End to end: the real daemon (twistd subprocess, SQLite in a temp dir) keeps
projects, tokens and the audit trail across a restart, and writes the
JSONL audit file.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.testing.daemon import Daemon, start_daemon
from tests.support import Reply, http_json

MT = "mt-e2e-management-secret"
UPSTREAM_KEY = "sk-upstream-0123456789abcdef"


def call(
    daemon: Daemon,
    method: str,
    path: str,
    body: Any = None,
    raw: bytes | None = None,
    token: str | None = MT,
) -> Reply:
    return http_json(daemon.url + path, method, body, raw=raw, token=token, timeout=20)


class ManagementDaemonTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.audit_path = os.path.join(self.workdir, "logs", "audit", "audit.jsonl")
        self.env = {
            "MANAGEMENT_TOKEN": MT,
            "DB_DRIVER": "sqlite",
            "DATABASE_PATH": os.path.join(self.workdir, "db", "llmproxy.db"),
            "AUDIT_LOG_FILE": self.audit_path,
        }

    def start(self) -> Daemon:
        daemon = start_daemon(self.workdir, self.env)
        self.addCleanup(daemon.kill)
        return daemon

    def test_lifecycle_survives_restart(self) -> None:
        d = self.start()
        status, headers, body = call(d, "GET", "/manage/projects", token=None)
        self.assertEqual(status, 401)
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(call(d, "PUT", "/manage/tokens", {}, token=None)[0], 401)

        status, _, project = call(
            d, "POST", "/manage/projects", {"name": "p1", "api_key": UPSTREAM_KEY}
        )
        self.assertEqual(status, 201, project)
        self.assertEqual(project["api_key"], "sk-upstr...cdef")
        status, _, dup = call(d, "POST", "/manage/projects", {"name": "p1", "api_key": "k" * 20})
        self.assertEqual((status, dup["error"]), (409, "a project with this name already exists"))
        status, _, too_big = call(d, "POST", "/manage/projects", raw=b"{" + b" " * 2_000_000 + b"}")
        self.assertEqual(status, 413)

        status, _, created = call(
            d, "POST", "/manage/tokens", {"project_id": project["id"], "duration_minutes": 60}
        )
        self.assertEqual(status, 201, created)
        secret = created["token"]
        self.assertRegex(secret, r"^sk-[A-Za-z0-9_-]{22}$")

        status, _, listed = call(d, "GET", f"/manage/tokens?projectId={project['id']}")
        self.assertEqual(status, 200)
        [item] = listed
        self.assertEqual(item["token"], secret[:7] + "*" * 14 + secret[-4:])

        status, _, _ = call(d, "DELETE", f"/manage/tokens/{created['id']}")
        self.assertEqual(status, 204)
        _, _, revoked = call(d, "GET", f"/manage/tokens/{created['id']}")
        self.assertIs(revoked["is_active"], False)
        self.assertIsNotNone(revoked["deactivated_at"])

        status, _, page = call(d, "GET", "/manage/audit?page_size=100")
        self.assertEqual(status, 200)
        actions = {e["action"] for e in page["events"]}
        self.assertTrue({"project.create", "token.create", "token.revoke"} <= actions, actions)
        self.assertEqual(d.terminate(), 0)

        d = self.start()
        _, _, projects = call(d, "GET", "/manage/projects")
        self.assertEqual([p["id"] for p in projects], [project["id"]])
        _, _, again = call(d, "GET", f"/manage/tokens/{created['id']}")
        self.assertEqual(again, revoked)
        _, _, page2 = call(d, "GET", "/manage/audit?action=token.create")
        [event] = page2["events"]
        self.assertEqual(event["project_id"], project["id"])
        self.assertEqual(event["outcome"], "success")
        # The audit.list of the first run was flushed on SIGTERM.
        _, _, lists = call(d, "GET", "/manage/audit?action=audit.list")
        self.assertGreaterEqual(lists["pagination"]["total_count"], 1)
        self.assertEqual(d.terminate(), 0)

        with open(self.audit_path, encoding="utf-8") as f:
            text = f.read()
        lines = [json.loads(line) for line in text.splitlines()]
        [line] = [x for x in lines if x["action"] == "token.create" and x["result"] == "success"]
        self.assertIn("...", line["details"]["token_id"])
        self.assertEqual(line["details"]["duration_minutes"], 60)
        self.assertIn("token.revoke", {x["action"] for x in lines})
        self.assertNotIn(secret, text)
        self.assertNotIn(UPSTREAM_KEY, text)
        self.assertNotIn(MT, text)
        self.assertIsNone(re.search(r"sk-[A-Za-z0-9_-]{22}", text))

    def test_database_only_audit(self) -> None:
        self.env["AUDIT_LOG_FILE"] = ""
        d = self.start()
        call(d, "POST", "/manage/projects", {"name": "p", "api_key": UPSTREAM_KEY})
        _, _, page = call(d, "GET", "/manage/audit?action=project.create")
        self.assertEqual(page["pagination"]["total_count"], 1)
        self.assertEqual(d.terminate(), 0)
        self.assertFalse(os.path.exists(self.audit_path))

    def test_refused_proxy_request_is_audited(self) -> None:
        d = self.start()
        bogus = "sk-" + "Q" * 22
        status, _, body = call(d, "POST", "/v1/chat/completions", {"model": "m"}, token=bogus)
        self.assertEqual(status, 401, body)
        _, _, page = call(d, "GET", "/manage/audit?action=proxy_request")
        [event] = page["events"]
        self.assertEqual((event["actor"], event["outcome"]), ("system", "denied"))
        self.assertEqual(event["path"], "/v1/chat/completions")
        details = json.loads(event["metadata"])
        self.assertEqual(details["reason"], body["code"])
        self.assertEqual(details["token"], "sk-QQQQ**************QQQQ")
        self.assertEqual(d.terminate(), 0)
        with open(self.audit_path, encoding="utf-8") as f:
            self.assertNotIn(bogus, f.read())

    def test_revocation_applies_to_the_next_proxied_request(self) -> None:
        upstream_dir = os.path.join(self.workdir, "upstream")
        os.makedirs(upstream_dir)
        upstream = start_daemon(upstream_dir, {}, plugin="llmproxy-fake-upstream", health_path=None)
        self.addCleanup(upstream.kill)
        self.env["OPENAI_API_URL"] = upstream.url
        d = self.start()
        _, _, project = call(d, "POST", "/manage/projects", {"name": "p", "api_key": UPSTREAM_KEY})
        _, _, token = call(
            d, "POST", "/manage/tokens", {"project_id": project["id"], "duration_minutes": 5}
        )
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(2):  # the second answer comes from the validator's cache
            status, _, body = call(d, "POST", "/v1/chat/completions", chat, token=token["token"])
            self.assertEqual(status, 200, body)
        self.assertEqual(call(d, "DELETE", f"/manage/tokens/{token['id']}")[0], 204)
        status, _, body = call(d, "POST", "/v1/chat/completions", chat, token=token["token"])
        self.assertEqual((status, body["code"]), (401, "token_inactive"))

        _, _, second = call(
            d, "POST", "/manage/tokens", {"project_id": project["id"], "duration_minutes": 5}
        )
        status, _, body = call(d, "POST", "/v1/chat/completions", chat, token=second["token"])
        self.assertEqual(status, 200, body)
        status, _, _ = call(d, "PATCH", f"/manage/projects/{project['id']}", {"is_active": False})
        self.assertEqual(status, 200)
        status, _, body = call(d, "POST", "/v1/chat/completions", chat, token=second["token"])
        self.assertEqual((status, body["code"]), (403, "project_inactive"))
        self.assertEqual(d.terminate(), 0)
