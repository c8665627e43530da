"""
docs/openapi.yaml against the running daemon: every documented operation is
routed (not 404/405 unless documented as always refused), and every
management route the app serves is documented.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.testing.daemon import Daemon, start_daemon
from llmproxy.web.manage import ManagementAPI
from tests.test_manage_daemon import MT, call

SPEC_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "openapi.yaml")
METHODS = ("get", "post", "put", "patch", "delete")
#: Management routes that exist only to answer an error for a malformed
#: path (empty id, an id containing "/", unknown paths); not operations.
ERROR_ONLY_RULES = {
    "/projects/",
    "/tokens/",
    "/audit/",
    "/projects/<path:rest>",
    "/tokens/<path:rest>",
    "/audit/<path:rest>",
    "/",
    "/<path:__rest__>",
}

#: As in the Go llm-proxy, GET/PATCH on the bulk-revoke path answer
#: 400 "invalid project id" (they are not operations).
ERROR_ONLY_OPERATIONS = {
    ("/manage/projects/{id}/tokens/revoke", "get"),
    ("/manage/projects/{id}/tokens/revoke", "patch"),
}


def load_spec() -> dict[str, Any]:
    with open(SPEC_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)  # type: ignore[no-any-return]


def served_templates() -> set[str]:
    """The management routes as OpenAPI path templates (C{/manage/tokens/{id}})."""
    templates = set()
    for rule in ManagementAPI.app.url_map.iter_rules():
        if rule.rule in ERROR_ONLY_RULES:
            continue
        templates.add("/manage" + re.sub(r"<(?:\w+:)?\w+>", "{id}", rule.rule))
    return templates


class OpenAPITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.spec = load_spec()
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        self.daemon = start_daemon(
            workdir,
            {
                "MANAGEMENT_TOKEN": MT,
                "DATABASE_PATH": os.path.join(workdir, "llmproxy.db"),
                "AUDIT_LOG_FILE": os.path.join(workdir, "audit.log"),
            },
        )
        self.addCleanup(self.daemon.kill)
        self.ids = self.make_ids(self.daemon)

    def make_ids(self, d: Daemon) -> dict[str, str]:
        _, _, project = call(d, "POST", "/manage/projects", {"name": "p", "api_key": "k" * 20})
        _, _, token = call(
            d, "POST", "/manage/tokens", {"project_id": project["id"], "duration_minutes": 5}
        )
        _, _, page = call(d, "GET", "/manage/audit")
        return {
            "/manage/projects/": project["id"],
            "/manage/tokens/": token["id"],
            "/manage/audit/": page["events"][0]["id"],
        }

    def concrete(self, template: str) -> str:
        for prefix, value in self.ids.items():
            if template.startswith(prefix + "{id}"):
                return template.replace("{id}", value, 1)
        return template

    def test_spec_is_served(self) -> None:
        checked = 0
        for template, item in self.spec["paths"].items():
            for method in METHODS:
                operation = item.get(method)
                if operation is None:
                    continue
                path = self.concrete(template)
                body = {} if method in ("post", "patch", "put") else None
                status, headers, _ = call(self.daemon, method.upper(), path, body)
                always = operation.get("x-always-status")
                if always is not None:
                    self.assertEqual(status, always, f"{method} {template}")
                else:
                    self.assertNotIn(status, (404, 405), f"{method} {template}")
                self.assertIn(str(status), operation["responses"], f"{method} {template}")
                checked += 1
        self.assertGreater(checked, 15)

    def test_served_is_in_spec(self) -> None:
        paths = self.spec["paths"]
        templates = served_templates()
        self.assertEqual(templates - set(paths), set())
        for template in templates:
            for method in METHODS:
                path = self.concrete(template)
                body = {} if method in ("post", "patch", "put") else None
                status, _, _ = call(self.daemon, method.upper(), path, body)
                if status == 400 and (template, method) in ERROR_ONLY_OPERATIONS:
                    continue
                if status != 405:
                    self.assertIn(method, paths[template], f"{method} {template} answers {status}")
