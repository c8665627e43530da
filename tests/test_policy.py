"""The provider request policy: method, endpoint, parameter whitelist, origin, CORS."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from llmproxy.config import Config
from llmproxy.proxy.policy import (
    BadPattern,
    CorsSettings,
    ProviderPolicy,
    check_request,
    cors_headers,
    go_format,
    go_path_match,
    preflight_headers,
    validate_glob,
)
from llmproxy.proxy.providers import Provider, parse_providers

# Go's own path.Match table (src/path/match_test.go): pattern, name, match, bad pattern
GO_MATCH_TESTS = [
    ("abc", "abc", True, False),
    ("*", "abc", True, False),
    ("*c", "abc", True, False),
    ("a*", "a", True, False),
    ("a*", "abc", True, False),
    ("a*", "ab/c", False, False),
    ("a*/b", "abc/b", True, False),
    ("a*/b", "a/c/b", False, False),
    ("a*b*c*d*e*/f", "axbxcxdxe/f", True, False),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/f", True, False),
    ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", False, False),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", False, False),
    ("a*b?c*x", "abxbbxdbxebxczzx", True, False),
    ("a*b?c*x", "abxbbxdbxebxczzy", False, False),
    ("ab[c]", "abc", True, False),
    ("ab[b-d]", "abc", True, False),
    ("ab[e-g]", "abc", False, False),
    ("ab[^c]", "abc", False, False),
    ("ab[^b-d]", "abc", False, False),
    ("ab[^e-g]", "abc", True, False),
    ("a\\*b", "a*b", True, False),
    ("a\\*b", "ab", False, False),
    ("a?b", "a☺b", True, False),
    ("a[^a]b", "a☺b", True, False),
    ("a???b", "a☺b", False, False),
    ("a[^a][^a][^a]b", "a☺b", False, False),
    ("[a-ζ]*", "α", True, False),
    ("*[a-ζ]", "A", False, False),
    ("a?b", "a/b", False, False),
    ("a*b", "a/b", False, False),
    ("[\\]a]", "]", True, False),
    ("[\\-]", "-", True, False),
    ("[x\\-]", "x", True, False),
    ("[x\\-]", "-", True, False),
    ("[x\\-]", "z", False, False),
    ("[\\-x]", "x", True, False),
    ("[\\-x]", "-", True, False),
    ("[\\-x]", "a", False, False),
    ("[]a]", "]", False, True),
    ("[-]", "-", False, True),
    ("[x-]", "x", False, True),
    ("[x-]", "-", False, True),
    ("[x-]", "z", False, True),
    ("[-x]", "x", False, True),
    ("[-x]", "-", False, True),
    ("[-x]", "a", False, True),
    ("\\", "a", False, True),
    ("[a-b-c]", "a", False, True),
    ("[", "a", False, True),
    ("[^", "a", False, True),
    ("[^bc", "a", False, True),
    ("a[", "a", False, True),
    ("a[", "ab", False, True),
    ("a[", "x", False, True),
    ("a/b[", "x", False, True),
    ("*x", "xxx", True, False),
]


class GoPathMatchTests(SynchronousTestCase):
    def test_go_table(self) -> None:
        for pattern, name, match, bad in GO_MATCH_TESTS:
            if bad:
                self.assertRaises(BadPattern, go_path_match, pattern, name)
                self.assertRaises(BadPattern, validate_glob, pattern)
            else:
                self.assertEqual(go_path_match(pattern, name), match, (pattern, name))
                validate_glob(pattern)

    def test_model_patterns(self) -> None:
        self.assertTrue(go_path_match("gpt-4o-*", "gpt-4o-mini"))
        self.assertFalse(go_path_match("gpt-4o-*", "gpt-4o"))
        self.assertFalse(go_path_match("gpt-4o-*", "gpt-4o-mini/../x"))
        self.assertTrue(go_path_match("gpt-4?", "gpt-4o"))

    def test_go_format(self) -> None:
        cases: list[tuple[Any, str]] = [
            ("gpt-4o", "gpt-4o"),
            (1, "1"),
            (1.5, "1.5"),
            (0.7, "0.7"),
            (123456, "123456"),
            (1000000, "1e+06"),
            (1234567.5, "1.2345675e+06"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-2, "-2"),
            (True, "true"),
            (False, "false"),
            (None, "<nil>"),
            ([1, "a"], "[1 a]"),
            ({"b": 1, "a": "x"}, "map[a:x b:1]"),
        ]
        for value, expected in cases:
            self.assertEqual(go_format(value), expected, value)


PROVIDERS = """
apis:
  openai:
    base_url: https://api.openai.com
    allowed_endpoints: [/v1/chat/completions, /v1/models, /v1/files]
    allowed_methods: [GET, POST, PATCH]
    param_whitelist:
      model: [gpt-4o, "gpt-4o-*"]
      temperature: ["0", "0.*", "1"]
  strict:
    base_url: https://api.openai.com
    allowed_endpoints: [/v1/]
    allowed_methods: [POST]
    allowed_origins: [https://ok.example]
    required_headers: [origin, X-App-Id]
  open:
    base_url: https://api.openai.com
    allowed_endpoints: [/v1/]
    allowed_methods: [GET, POST]
"""


def provider(name: str) -> Provider:
    return parse_providers(PROVIDERS, "test.yaml").apis[name]


def headers(**values: str) -> Headers:
    h = Headers()
    for name, value in values.items():
        h.addRawHeader(name.replace("_", "-").encode(), value.encode())
    return h


class CheckRequestTests(SynchronousTestCase):
    def check(self, p: Provider, method: bytes, path: bytes, body: Any = None, **h: str) -> Any:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        return check_request(p, method, path, headers(**h), body)

    def test_method(self) -> None:
        denial = self.check(provider("openai"), b"DELETE", b"/v1/models")
        self.assertEqual((denial.status, denial.code), (405, "method_not_allowed"))
        self.assertEqual(
            denial.body(), {"error": "Method not allowed", "code": "method_not_allowed"}
        )
        self.assertIsNone(self.check(provider("openai"), b"get", b"/v1/models"))

    def test_method_checked_before_endpoint(self) -> None:
        denial = self.check(provider("openai"), b"DELETE", b"/v1/unknown")
        self.assertEqual(denial.status, 405)

    def test_endpoint_prefix(self) -> None:
        p = provider("openai")
        denial = self.check(p, b"POST", b"/v1/unknown")
        self.assertEqual(
            denial.body(), {"error": "Endpoint not found", "code": "endpoint_not_found"}
        )
        self.assertEqual(denial.status, 404)
        self.assertIsNone(self.check(p, b"GET", b"/v1/files/file-abc/content"))
        self.assertIsNone(self.check(p, b"GET", b"/v1/models/gpt-4o"))
        self.assertEqual(self.check(p, b"GET", b"/v2/models").status, 404)

    def test_dot_segments_cannot_escape_a_prefix(self) -> None:
        p = provider("openai")
        for path in (
            b"/v1/chat/completions/../../admin",
            b"/v1/files/./x",
            b"/v1/models/%2e%2e/secret",
            b"/v1/models/%2E%2E",
        ):
            self.assertEqual(self.check(p, b"GET", path).code, "endpoint_not_found", path)
        self.assertIsNone(self.check(p, b"GET", b"/v1/models/gpt-4.1"))

    def test_whitelist_allows_matching_values(self) -> None:
        p = provider("openai")
        ok = {"model": "gpt-4o-mini", "temperature": 0.7, "messages": []}
        self.assertIsNone(self.check(p, b"POST", b"/v1/chat/completions", ok))
        self.assertIsNone(self.check(p, b"POST", b"/v1/chat/completions", {"temperature": 1}))
        self.assertIsNone(self.check(p, b"POST", b"/v1/chat/completions", {"messages": []}))

    def test_whitelist_refuses_with_reference_message(self) -> None:
        denial = self.check(
            provider("openai"),
            b"POST",
            b"/v1/chat/completions",
            {"model": "claude-3"},
            content_type="application/json",
        )
        self.assertEqual(denial.status, 400)
        self.assertEqual(
            denial.body(),
            {
                "error": "Parameter 'model' value 'claude-3' is not allowed. "
                "Allowed patterns: [gpt-4o gpt-4o-*]",
                "code": "param_not_allowed",
            },
        )
        denial = self.check(
            provider("openai"), b"POST", b"/v1/chat/completions", {"temperature": 1.5}
        )
        self.assertEqual(
            denial.error,
            "Parameter 'temperature' value '1.5' is not allowed. Allowed patterns: [0 0.* 1]",
        )

    def test_whitelist_checked_whatever_the_content_type(self) -> None:
        p = provider("openai")
        body = {"model": "claude-3"}
        for content_type in (
            "application/json; charset=utf-8",
            "Application/JSON",
            "text/plain",
        ):
            denial = self.check(
                p, b"POST", b"/v1/chat/completions", body, content_type=content_type
            )
            self.assertEqual(denial.code, "param_not_allowed", content_type)
        self.assertEqual(self.check(p, b"POST", b"/v1/chat/completions", body).status, 400)
        self.assertEqual(self.check(p, b"PATCH", b"/v1/models", body).status, 400)
        bom = b"\xef\xbb\xbf" + json.dumps(body).encode()
        self.assertEqual(self.check(p, b"POST", b"/v1/chat/completions", bom).status, 400)

    def test_whitelist_ignores_non_objects_and_gets(self) -> None:
        p = provider("openai")
        for body in (b"not json", b"[1, 2]", b'{"model": NaN}', b"", None, b'"gpt"'):
            self.assertIsNone(self.check(p, b"POST", b"/v1/chat/completions", body), body)
        self.assertIsNone(self.check(p, b"GET", b"/v1/models", {"model": "claude-3"}))

    def test_origin_not_allowed(self) -> None:
        p = provider("strict")
        denial = self.check(p, b"POST", b"/v1/x", origin="https://bad.example", x_app_id="1")
        self.assertEqual((denial.status, denial.code), (403, "origin_not_allowed"))
        self.assertEqual(denial.error, "Origin not allowed")
        self.assertIsNone(
            self.check(p, b"POST", b"/v1/x", origin="https://ok.example", x_app_id="1")
        )

    def test_origin_required(self) -> None:
        denial = self.check(provider("strict"), b"POST", b"/v1/x", x_app_id="1")
        self.assertEqual(
            (denial.status, denial.error, denial.code),
            (400, "Origin header required", "origin_required"),
        )

    def test_other_required_header(self) -> None:
        denial = self.check(provider("strict"), b"POST", b"/v1/x", origin="https://ok.example")
        self.assertEqual(
            (denial.status, denial.error, denial.code),
            (400, "X-App-Id header required", "header_required"),
        )

    def test_any_origin_without_list(self) -> None:
        self.assertIsNone(self.check(provider("open"), b"GET", b"/v1/x", origin="https://a.b"))
        self.assertIsNone(self.check(provider("openai"), b"GET", b"/v1/models", origin="https://a"))


class CorsTests(SynchronousTestCase):
    def test_preflight_defaults_are_the_reference(self) -> None:
        pairs = dict(
            preflight_headers(CorsSettings(), b"https://app.example", b"Authorization, X-Foo")
        )
        self.assertEqual(pairs[b"Access-Control-Allow-Origin"], b"*")
        self.assertEqual(pairs[b"Access-Control-Allow-Headers"], b"Authorization, X-Foo")
        self.assertEqual(pairs[b"Access-Control-Max-Age"], b"86400")
        self.assertEqual(
            pairs[b"Access-Control-Allow-Methods"], b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
        )
        self.assertIn(b"X-Request-ID", pairs[b"Access-Control-Expose-Headers"])
        self.assertNotIn(b"Vary", pairs)
        pairs = dict(preflight_headers(CorsSettings(), b"https://app.example", None))
        self.assertEqual(
            pairs[b"Access-Control-Allow-Headers"], b"Authorization, Content-Type, X-Requested-With"
        )
        self.assertEqual(preflight_headers(CorsSettings(), None, b"X-Foo"), [])

    def test_preflight_from_config(self) -> None:
        config = Config.from_env(
            {
                "MANAGEMENT_TOKEN": "m" * 32,
                "CORS_ALLOWED_ORIGINS": "https://a.example, https://b.example",
                "CORS_ALLOWED_METHODS": "GET,POST",
                "CORS_ALLOWED_HEADERS": "Authorization",
                "CORS_MAX_AGE": "10m",
            }
        )
        cors = CorsSettings.from_config(config)
        pairs = preflight_headers(cors, b"https://b.example", None)
        as_dict = dict(pairs)
        self.assertEqual(as_dict[b"Access-Control-Allow-Origin"], b"https://b.example")
        self.assertIn((b"Vary", b"Origin"), pairs)
        self.assertEqual(as_dict[b"Access-Control-Allow-Methods"], b"GET, POST")
        self.assertEqual(as_dict[b"Access-Control-Allow-Headers"], b"Authorization")
        self.assertEqual(as_dict[b"Access-Control-Max-Age"], b"600")
        self.assertEqual(preflight_headers(cors, b"https://evil.example", None), [])
        self.assertEqual(cors_headers(cors, b"https://evil.example"), [])

    def test_echo_headers(self) -> None:
        pairs = cors_headers(CorsSettings(), b"http://localhost:3000")
        self.assertIn((b"Access-Control-Allow-Origin", b"http://localhost:3000"), pairs)
        self.assertIn((b"Vary", b"Origin"), pairs)
        self.assertEqual(cors_headers(CorsSettings(), None), [])


class _PolicyResource(Resource):
    """What the proxy resource does with a policy, minus the forwarding."""

    isLeaf = True

    def __init__(self, policy: ProviderPolicy) -> None:
        super().__init__()
        self.policy = policy

    def render(self, request: Request) -> bytes:
        if request.method == b"OPTIONS":
            self.policy.preflight(request)
            return b""
        denial = self.policy.check(request)
        request.responseHeaders.addRawHeader(b"Vary", b"Accept-Encoding")
        self.policy.cors_headers(request)
        if denial is not None:
            request.setResponseCode(denial.status)
            return json.dumps(denial.body()).encode()
        body = request.content.read()
        return b"forwarded " + body


def http(policy: ProviderPolicy, raw: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    site = Site(_PolicyResource(policy))
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    out: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        out.setdefault(name.lower(), []).append(value.strip())
    channel.connectionLost(None)
    return int(lines[0].split()[1]), out, body


def request_bytes(method: str, path: str, body: bytes = b"", **h: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: proxy"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in h.items()]
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


class ProviderPolicyOverHTTPTests(SynchronousTestCase):
    def test_whitelist_reads_and_restores_the_body(self) -> None:
        policy = ProviderPolicy(provider("openai"))
        body = b'{"model": "gpt-4o"}'
        status, _, answer = http(
            policy,
            request_bytes("POST", "/v1/chat/completions", body, content_type="application/json"),
        )
        self.assertEqual(status, 200)
        self.assertIn(b"forwarded " + body, answer)

    def test_origin_refusal_still_echoes_cors(self) -> None:
        status, h, body = http(
            ProviderPolicy(provider("strict")),
            request_bytes("POST", "/v1/x", origin="https://bad.example", x_app_id="1"),
        )
        self.assertEqual(status, 403)
        self.assertEqual(h["access-control-allow-origin"], ["https://bad.example"])
        self.assertEqual(h["vary"], ["Accept-Encoding", "Origin"])
        self.assertIn(b'"code": "origin_not_allowed"', body)

    def test_preflight(self) -> None:
        policy = ProviderPolicy(provider("strict"))
        status, h, _ = http(
            policy,
            request_bytes(
                "OPTIONS",
                "/v1/anything",
                origin="https://x.example",
                access_control_request_headers="Authorization, X-Foo",
            ),
        )
        self.assertEqual(status, 204)
        self.assertEqual(h["access-control-allow-origin"], ["*"])
        self.assertEqual(h["access-control-allow-headers"], ["Authorization, X-Foo"])
        self.assertEqual(h["access-control-max-age"], ["86400"])
        self.assertIn("OPTIONS", h["access-control-allow-methods"][0])
        status, h, _ = http(policy, request_bytes("OPTIONS", "/v1/anything"))
        self.assertEqual(status, 204)
        self.assertNotIn("access-control-allow-origin", h)
