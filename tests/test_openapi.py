"""
docs/openapi.yaml against the running daemon: the document is valid
OpenAPI 3, every documented operation is routed (not 404/405 unless
documented as always refused; /v1 operations are answered by the proxy,
not the web app), and every route the daemon serves is documented.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from typing import Any

import yaml
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from llmproxy.config import Config
from llmproxy.service import build_service
from llmproxy.testing.daemon import Daemon, start_daemon
from llmproxy.web.manage import ManagementAPI
from tests.test_manage_daemon import MT, call

SPEC_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "openapi.yaml")
METHODS = ("get", "post", "put", "patch", "delete")
#: Every method an OpenAPI path item may document.
ALL_METHODS = (*METHODS, "head", "options")
#: The proxy surface: every path below /v1 goes to the proxy resource.
PROXY_TEMPLATE = "/v1/{path}"
#: Only the proxy sets this header; the web app's answers never carry it.
PROXY_MARKER = "X-Proxy-Overhead-Ms"
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


def _template(rule: str) -> str:
    return re.sub(r"<(?:\w+:)?\w+>", "{id}", rule)


def served_templates(workdir: str) -> set[str]:
    """
    Every route of the daemon as an OpenAPI path template: the web app's
    routes as L{build_service} wires them (with the default configuration),
    the management routes (C{/manage/tokens/{id}}) and the proxy.
    """
    config = Config.from_env(
        {"MANAGEMENT_TOKEN": MT, "DATABASE_PATH": os.path.join(workdir, "routes.db")}
    )
    top = build_service(config, MemoryReactorClock())
    klein_app = top.getServiceNamed("web").site.resource._web._app  # type: ignore[attr-defined]
    templates = {PROXY_TEMPLATE}
    for rule in klein_app.url_map.iter_rules():
        if rule.endpoint.startswith("mount:"):
            continue
        templates.add(_template(rule.rule))
    for rule in ManagementAPI.app.url_map.iter_rules():
        if rule.rule in ERROR_ONLY_RULES:
            continue
        templates.add("/manage" + _template(rule.rule))
    return templates


class OpenAPIDocumentTests(SynchronousTestCase):
    def test_valid_openapi3(self) -> None:
        """The document loads as YAML and validates as OpenAPI 3."""
        try:
            from openapi_spec_validator import validate
        except ImportError:
            raise SkipTest("openapi-spec-validator is not installed (pip install .[test])")
        spec = load_spec()
        self.assertTrue(spec["openapi"].startswith("3."))
        validate(spec)

    def test_proxy_codes_documented(self) -> None:
        """Every error code the proxy answers with is named in the document."""
        with open(SPEC_PATH, encoding="utf-8") as f:
            text = f.read()
        for code in (
            "invalid_token",
            "token_not_found",
            "token_inactive",
            "token_expired",
            "project_inactive",
            "origin_not_allowed",
            "endpoint_not_found",
            "method_not_allowed",
            "param_not_allowed",
            "origin_required",
            "request_too_large",
            "rate_limit_exceeded",
            "upstream_unreachable",
            "upstream_tls_error",
            "upstream_error",
            "upstream_auth_error",
            "service_unavailable",
            "timeout",
            "circuit breaker open",
        ):
            self.assertIn(code, text)


class OpenAPIDaemonTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.spec = load_spec()
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.daemon = start_daemon(
            self.workdir,
            {
                "MANAGEMENT_TOKEN": MT,
                "DATABASE_PATH": os.path.join(self.workdir, "llmproxy.db"),
                "AUDIT_LOG_FILE": os.path.join(self.workdir, "audit.log"),
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
        if template == PROXY_TEMPLATE:
            (param,) = self.spec["paths"][template]["parameters"]
            return template.replace("{path}", param["example"])
        for prefix, value in self.ids.items():
            if template.startswith(prefix + "{id}"):
                return template.replace("{id}", value, 1)
        return template

    def probe(self, template: str, method: str) -> tuple[int, dict[str, str], Any]:
        """One request; /v1 without a token (refused by the proxy, never sent upstream)."""
        data = b"{}" if method in ("post", "patch", "put") else None
        request = urllib.request.Request(
            self.daemon.url + self.concrete(template), data=data, method=method.upper()
        )
        if template != PROXY_TEMPLATE:
            request.add_header("Authorization", "Bearer " + MT)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                status, headers, content = response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            status, headers, content = e.code, e.headers, e.read()
        if content and headers.get_content_type() == "application/json":
            return status, dict(headers), json.loads(content)
        return status, dict(headers), content

    def test_spec_is_served(self) -> None:
        checked = set()
        for template, item in self.spec["paths"].items():
            for method in ALL_METHODS:
                operation = item.get(method)
                if operation is None:
                    continue
                status, headers, body = self.probe(template, method)
                where = f"{method} {template}: {status} {body}"
                self.assertIn(str(status), operation["responses"], where)
                if status >= 400 and method != "head":
                    # Every refusal is a JSON object with an error message.
                    self.assertEqual(headers.get("Content-Type"), "application/json", where)
                    self.assertIsInstance(body["error"], str, where)
                if template == PROXY_TEMPLATE:
                    # Answered by the proxy, not a 404 from the web app.
                    self.assertIn(PROXY_MARKER, headers, where)
                    if method != "head" and status != 204:
                        self.assertNotEqual(body.get("code"), "not_found", where)
                    if method == "options":
                        self.assertEqual(status, 204, where)
                    elif method in ("get", "post"):
                        self.assertEqual(body["code"], "invalid_token", where)
                    continue
                always = operation.get("x-always-status")
                if always is not None:
                    self.assertEqual(status, always, where)
                else:
                    self.assertNotIn(status, (404, 405), where)
                checked.add(template)
        for template in ("/metrics", "/metrics/prometheus", "/manage/cache/purge", "/health"):
            self.assertIn(template, checked)

    def test_served_is_in_spec(self) -> None:
        paths = self.spec["paths"]
        templates = served_templates(self.workdir)
        self.assertEqual(templates - set(paths), set())
        self.assertIn("/manage/cache/purge", templates)
        self.assertIn("/metrics/prometheus", templates)
        for template in templates:
            item = paths[template]
            if item.get("x-any-method"):
                # Every method answers alike; documented as such.
                for method in METHODS:
                    status, _, _ = self.probe(template, method)
                    self.assertEqual(status, self.probe(template, "get")[0], template)
                continue
            for method in METHODS:
                status, _, _ = self.probe(template, method)
                if status == 400 and (template, method) in ERROR_ONLY_OPERATIONS:
                    continue
                if status != 405 or template == PROXY_TEMPLATE:
                    self.assertIn(method, item, f"{method} {template} answers {status}")
