"""
End to end: a real C{twistd llmproxy} in front of the in-process fake
upstream, driven by the official C{openai} SDK; answers must match what
the fake gives when called directly.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import threading
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.internet import reactor, threads
from twisted.trial.unittest import TestCase

from llmproxy.config import Config
from llmproxy.store.records import Project, Token
from llmproxy.store.sql import make_store
from llmproxy.testing.daemon import Daemon, start_daemon
from llmproxy.testing.fake_upstream import FakeUpstream
from llmproxy.tokens.format import generate_token, hash_token, obfuscate_token
from tests.support import poll

UPSTREAM_KEY = "sk-upstream-0123456789abcdef"
_VOLATILE = ("id", "created", "system_fingerprint")


def normalise(value: Any) -> Any:
    """Drop the fields the fake makes unique per call (ids, timestamps)."""
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


async def seed_database(path: str, tokens: list[dict[str, Any]]) -> tuple[Project, list[str]]:
    """Create a project and tokens in the daemon's SQLite file through the store API."""
    config = Config.from_env({"DATABASE_PATH": path, "MANAGEMENT_TOKEN": "mt"})
    store = make_store(config, reactor)
    await store.open()
    now = datetime.datetime.now(datetime.UTC)
    project = Project(
        id=str(uuid.uuid4()),
        name="e2e",
        api_key=UPSTREAM_KEY,
        is_active=True,
        created_at=now,
        updated_at=now,
    )
    try:
        await store.create_project(project)
        secrets = []
        for fields in tokens:
            secret = generate_token()
            await store.create_token(
                Token(
                    id=str(uuid.uuid4()),
                    token_hash=hash_token(secret),
                    display=obfuscate_token(secret),
                    project_id=project.id,
                    is_active=True,
                    created_at=now,
                    **fields,
                )
            )
            secrets.append(secret)
    finally:
        await store.close()
    return project, secrets


async def read_token(path: str, secret: str) -> Token | None:
    config = Config.from_env({"DATABASE_PATH": path, "MANAGEMENT_TOKEN": "mt"})
    store = make_store(config, reactor)
    await store.open()
    try:
        return await store.get_token_by_hash(hash_token(secret))
    finally:
        await store.close()


def get_status(url: str, headers: dict[str, str]) -> int:
    """The status of a GET (blocking: call it in a thread)."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        e.read()
        return int(e.code)


class DaemonCase(TestCase):
    """A daemon in front of an in-process fake upstream, with three seeded tokens."""

    timeout = 120
    #: Settings this case adds to the daemon's environment.
    extra_env: dict[str, str] = {}

    async def setUp(self) -> None:  # type: ignore[override]
        self.fake = FakeUpstream(clock=reactor)
        listening = self.fake.listen(reactor)
        self.addCleanup(listening.stop)
        self.upstream_url = listening.url
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.db = os.path.join(self.workdir, "llmproxy.db")
        self.project, secrets = await seed_database(
            self.db, [{}, {"max_requests": 10}, {"max_requests": 2}]
        )
        self.token, self.limited, self.two = secrets
        env = {
            "MANAGEMENT_TOKEN": "mt",
            "DATABASE_PATH": self.db,
            "OPENAI_API_URL": self.upstream_url,
            "API_CONFIG_PATH": os.path.join(self.workdir, "no-providers.yaml"),
            "LOG_FORMAT": "text",
            "ACCESS_LOG": "off",
            "AUDIT_LOG_FILE": os.path.join(self.workdir, "audit.log"),
            "USAGE_FLUSH_INTERVAL": "0.2",
            **self.extra_env,
        }
        self.daemon: Daemon = await threads.deferToThread(start_daemon, self.workdir, env)
        self.addCleanup(self._stop)

    async def _stop(self) -> None:
        status = await threads.deferToThread(self.daemon.terminate)
        self.assertEqual(status, 0, self.daemon.log())

    def sdk(self, base_url: str, api_key: str) -> Any:
        import openai

        return openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0)

    def in_thread(self, f: Any, *args: Any) -> Any:
        return threads.deferToThread(f, *args)


class EndToEndProxyTests(DaemonCase):
    async def test_sdk_chat_completion_matches_direct_call(self) -> None:
        def both() -> tuple[Any, Any]:
            kw = dict(model="gpt-4o", messages=[{"role": "user", "content": "hello there"}])
            with (
                self.sdk(self.daemon.url, self.token) as c1,
                self.sdk(self.upstream_url, UPSTREAM_KEY) as c2,
            ):
                via = c1.chat.completions.create(**kw)
                direct = c2.chat.completions.create(**kw)
                return via.model_dump(), direct.model_dump()

        via, direct = await self.in_thread(both)
        self.assertEqual(normalise(via), normalise(direct))
        proxied = self.fake.requests[0]
        self.assertEqual(proxied.header("authorization"), "Bearer " + UPSTREAM_KEY)
        self.assertEqual(proxied.header("x-proxy-id"), self.project.id)

    async def test_sdk_streaming_matches_direct_call(self) -> None:
        def both() -> tuple[list[Any], list[Any]]:
            kw = dict(
                model="gpt-4o",
                messages=[{"role": "user", "content": "stream please"}],
                stream=True,
                extra_headers={"X-Fake-Chunks": "6", "X-Fake-Chunk-Delay-Ms": "20"},
            )
            with (
                self.sdk(self.daemon.url, self.token) as c1,
                self.sdk(self.upstream_url, UPSTREAM_KEY) as c2,
            ):
                via = [c.model_dump() for c in c1.chat.completions.create(**kw)]
                direct = [c.model_dump() for c in c2.chat.completions.create(**kw)]
                return via, direct

        via, direct = await self.in_thread(both)
        self.assertGreaterEqual(len(via), 6)
        self.assertEqual(normalise(via), normalise(direct))
        text = "".join((c["choices"][0]["delta"].get("content") or "") for c in via if c["choices"])
        self.assertTrue(text)

    async def test_sdk_embeddings_and_models(self) -> None:
        def both() -> tuple[Any, Any, Any, Any]:
            with (
                self.sdk(self.daemon.url, self.token) as via,
                self.sdk(self.upstream_url, UPSTREAM_KEY) as direct,
            ):
                kw = dict(model="text-embedding-3-small", input="abc")
                e1 = via.embeddings.create(**kw).model_dump()
                e2 = direct.embeddings.create(**kw).model_dump()
                m1 = [m.id for m in via.models.list()]
                m2 = [m.id for m in direct.models.list()]
                return e1, e2, m1, m2

        e1, e2, m1, m2 = await self.in_thread(both)
        self.assertEqual(normalise(e1), normalise(e2))
        self.assertEqual(m1, m2)

    async def test_sdk_sees_auth_errors(self) -> None:
        import openai

        def call() -> Any:
            with self.sdk(self.daemon.url, "sk-" + "A" * 22) as client:
                try:
                    client.models.list()
                except openai.AuthenticationError as e:
                    return e.status_code, e.response.json()
            return None

        status, body = await self.in_thread(call)
        self.assertEqual(status, 401)
        self.assertEqual(body["code"], "token_not_found")
        self.assertEqual(self.fake.requests, [])

    async def test_quota_is_exact_under_fifty_concurrent_requests(self) -> None:
        url = self.daemon.url + "/v1/models"

        def one() -> int:
            return get_status(url, {"Authorization": "Bearer " + self.limited})

        def burst() -> list[int]:
            start = threading.Barrier(50)

            def synced() -> int:
                start.wait()
                return one()

            with ThreadPoolExecutor(50) as pool:
                return list(pool.map(lambda _: synced(), range(50)))

        statuses = await self.in_thread(burst)
        self.assertEqual(statuses.count(200), 10, statuses)
        self.assertEqual(statuses.count(429), 40, statuses)
        self.assertEqual(len(self.fake.requests), 10)
        stored = await read_token(self.db, self.limited)
        assert stored is not None
        self.assertEqual(stored.request_count, 10)

    async def test_quota_body_and_unlimited_usage_counted(self) -> None:
        def calls() -> list[tuple[int, Any]]:
            out = []
            for secret in (self.two, self.two, self.two, self.token, self.token, self.token):
                req = urllib.request.Request(
                    self.daemon.url + "/v1/models", headers={"Authorization": "Bearer " + secret}
                )
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        out.append((r.status, json.loads(r.read())))
                except urllib.error.HTTPError as e:
                    out.append((e.code, json.loads(e.read())))
            return out

        results = await self.in_thread(calls)
        self.assertEqual([s for s, _ in results], [200, 200, 429, 200, 200, 200])
        self.assertEqual(
            results[2][1], {"error": "Rate limit exceeded", "code": "rate_limit_exceeded"}
        )
        # Unlimited counts are batched (flush every 0.2 s here) and written on stop.
        await self._stop_now()
        stored = await read_token(self.db, self.token)
        assert stored is not None
        self.assertEqual(stored.request_count, 3)
        self.assertIsNotNone(stored.last_used_at)

    async def _stop_now(self) -> None:
        status = await threads.deferToThread(self.daemon.terminate)
        self.assertEqual(status, 0, self.daemon.log())


def _json_call(
    url: str, method: str = "GET", body: Any = None, token: str = "mt"
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw.strip() else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw.strip() else None


class ManagementThenProxyTests(DaemonCase):
    """Tokens made and revoked through the management API, used through the SDK."""

    async def test_created_token_works_and_revocation_is_immediate(self) -> None:
        import openai

        base = self.daemon.url

        def scenario() -> dict[str, Any]:
            out: dict[str, Any] = {}
            status, project = _json_call(
                base + "/manage/projects",
                "POST",
                {"name": "mgmt", "api_key": UPSTREAM_KEY},
            )
            out["project"] = status
            status, token = _json_call(
                base + "/manage/tokens",
                "POST",
                {"project_id": project["id"], "duration_minutes": 60},
            )
            out["token"] = status
            with self.sdk(base, token["token"]) as client:
                reply = client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
                )
                out["first"] = reply.choices[0].message.content
                out["revoke"] = _json_call(base + "/manage/tokens/" + token["id"], "DELETE")[0]
                try:
                    client.models.list()
                except openai.AuthenticationError as e:
                    out["after"] = e.response.json()
            return out

        out = await self.in_thread(scenario)
        self.assertEqual((out["project"], out["token"]), (201, 201))
        self.assertTrue(out["first"])
        self.assertEqual(out["revoke"], 204)
        self.assertEqual(out["after"], {"error": "Token is inactive", "code": "token_inactive"})


class _IPRateLimitCase(DaemonCase):
    """Two requests per client address and minute (the test client is 127.0.0.1)."""

    async def statuses(self, *forwarded_for: str) -> list[int]:
        url = self.daemon.url + "/v1/models"
        auth = "Bearer " + self.token
        return [
            await self.in_thread(get_status, url, {"Authorization": auth, "X-Forwarded-For": xff})
            for xff in forwarded_for
        ]


class TrustedProxyIPRateLimitTests(_IPRateLimitCase):
    extra_env = {
        "IP_RATE_LIMIT": "2",
        "TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8",
        "DISTRIBUTED_RATE_LIMIT_WINDOW": "1h",  # no window ends mid-test
    }

    async def test_client_is_what_the_trusted_proxies_saw(self) -> None:
        """
        Behind trusted proxies the client is the nearest address they did
        not add themselves: what a client writes in front of it changes
        nothing, so it cannot pick a fresh counter.
        """
        statuses = await self.statuses(
            "203.0.113.5",
            "198.51.100.1, 203.0.113.5, 10.1.2.3",
            "198.51.100.2, 203.0.113.5",
            "203.0.113.6",
        )
        self.assertEqual(statuses, [200, 200, 429, 200])


class UntrustedPeerIPRateLimitTests(_IPRateLimitCase):
    extra_env = {
        "IP_RATE_LIMIT": "2",
        "TRUSTED_PROXIES": "10.0.0.0/8",
        "DISTRIBUTED_RATE_LIMIT_WINDOW": "1h",
    }

    async def test_forwarding_headers_of_other_peers_are_ignored(self) -> None:
        statuses = await self.statuses("203.0.113.5", "203.0.113.6", "203.0.113.7")
        self.assertEqual(statuses, [200, 200, 429])
        self.assertNotIn("TRUSTED_PROXIES", self.daemon.log())


class UntrustedForwardingWarningTests(DaemonCase):
    extra_env = {"IP_RATE_LIMIT": "100"}

    async def test_warns_that_any_client_picks_its_address(self) -> None:
        self.assertIn("list the proxies in front of llmproxy in TRUSTED_PROXIES", self.daemon.log())


class LogRotationTests(DaemonCase):
    """logrotate moves the files away and sends SIGHUP: nothing stops, nothing is lost."""

    def setUp(self) -> Any:
        logs = os.path.abspath(self.mktemp())
        os.makedirs(logs)
        self.logs = {
            "LOG_FILE": os.path.join(logs, "llmproxy.log"),
            "ACCESS_LOG": os.path.join(logs, "access.log"),
            "FILE_EVENT_LOG": os.path.join(logs, "events.jsonl"),
        }
        self.extra_env = {**self.logs, "LOG_LEVEL": "info"}
        return super().setUp()

    async def test_sighup_reopens_every_log_file(self) -> None:
        files = [*self.logs.values(), os.path.join(self.workdir, "audit.log")]

        def chat_and_refusal() -> None:
            with self.sdk(self.daemon.url, self.token) as client:
                client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
                )
            try:  # a refused token: one audit event
                with self.sdk(self.daemon.url, "sk-" + "B" * 22) as client:
                    client.models.list()
            except Exception:
                pass

        def written(suffix: str = "") -> bool:
            return all(
                os.path.exists(f + suffix) and os.path.getsize(f + suffix) > 0 for f in files
            )

        def reopened() -> bool:
            if not os.path.exists(self.logs["LOG_FILE"]):
                return False  # not reopened yet
            with open(self.logs["LOG_FILE"], encoding="utf-8") as f:
                return "SIGHUP: reopened 4 log file(s)" in f.read()

        await self.in_thread(chat_and_refusal)
        self.assertTrue((await self.in_thread(poll, written, 10.0))[0])
        for path in files:
            os.rename(path, path + ".1")
        self.daemon.process.send_signal(signal.SIGHUP)
        self.assertTrue((await self.in_thread(poll, reopened, 10.0))[0])
        await self.in_thread(chat_and_refusal)
        self.assertTrue((await self.in_thread(poll, written, 10.0))[0])
        status = await threads.deferToThread(self.daemon.terminate)
        self.assertEqual(status, 0, self.daemon.log())
        for path in files:
            with open(path + ".1", encoding="utf-8") as old, open(path, encoding="utf-8") as new:
                before, after = old.read().splitlines(), new.read().splitlines()
            if path == self.logs["LOG_FILE"]:
                self.assertTrue(before and after)
            else:  # the same requests before and after: as many lines in each file
                before = [line for line in before if '"GET /health"' not in line]
                self.assertEqual(len(before), len(after), path)
                self.assertTrue(before, path)

    async def _stop(self) -> None:
        self.daemon.kill()  # the test stops it


class TLSUpstreamDaemonTests(TestCase):
    """The daemon verifies an HTTPS provider through the platform trust store."""

    timeout = 120

    async def start(self, wrong_host: bool) -> tuple[Daemon, str, FakeUpstream]:
        from llmproxy.testing.tls import make_test_pki

        pki = make_test_pki()
        fake = FakeUpstream(clock=reactor)
        options = pki.wrong_host_options() if wrong_host else pki.server_options()
        listening = fake.listen(reactor, context_factory=options)
        self.addCleanup(listening.stop)
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        db = os.path.join(workdir, "llmproxy.db")
        _, (secret,) = await seed_database(db, [{}])
        env = {
            "MANAGEMENT_TOKEN": "mt",
            "DATABASE_PATH": db,
            "OPENAI_API_URL": listening.url,  # https://localhost:PORT
            "API_CONFIG_PATH": os.path.join(workdir, "no-providers.yaml"),
            "LOG_FORMAT": "text",
            "AUDIT_LOG_FILE": os.path.join(workdir, "audit.log"),
            # OpenSSL's default verify paths honour this: the test CA is "the platform's".
            "SSL_CERT_FILE": pki.write_ca(os.path.join(workdir, "ca.pem")),
        }
        daemon = await threads.deferToThread(start_daemon, workdir, env)
        self.addCleanup(lambda: threads.deferToThread(daemon.terminate))
        return daemon, secret, fake

    def get(self, daemon: Daemon, secret: str) -> Any:
        def call() -> tuple[int, Any]:
            return _json_call(daemon.url + "/v1/models", token=secret)

        return threads.deferToThread(call)

    async def test_trusted_certificate(self) -> None:
        daemon, secret, fake = await self.start(wrong_host=False)
        status, body = await self.get(daemon, secret)
        self.assertEqual(status, 200)
        self.assertEqual(body["object"], "list")
        self.assertEqual(fake.last_request.header("authorization"), "Bearer " + UPSTREAM_KEY)

    async def test_wrong_host_certificate_is_refused(self) -> None:
        daemon, secret, fake = await self.start(wrong_host=True)
        status, body = await self.get(daemon, secret)
        self.assertEqual(status, 502)
        self.assertEqual((body["error"], body["code"]), ("Proxy error", "upstream_tls_error"))
        self.assertEqual(fake.requests, [])
