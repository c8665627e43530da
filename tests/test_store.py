"""
One behaviour suite for every L{IStore}: the in-memory store, and the SQL
store on SQLite, PostgreSQL and MariaDB/MySQL (each test on its own fresh
database or schema).
"""

from __future__ import annotations

import datetime
import threading
import uuid
from typing import Any

import attrs
from twisted.internet import defer
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from llmproxy.store.interface import IStore
from llmproxy.store.memory import MemoryStore
from llmproxy.store.records import (
    AuditEvent,
    AuditQuery,
    DuplicateName,
    NotFound,
    Project,
    Token,
    UsageOutcome,
)
from llmproxy.tokens.format import generate_token, hash_token, obfuscate_token
from tests.test_store_support import new_location, open_store

UTC = datetime.UTC
T0 = datetime.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


def project(name: str = "alpha", **kw: Any) -> Project:
    values: dict[str, Any] = dict(
        id=str(uuid.uuid4()),
        name=name,
        api_key="sk-provider-" + name,
        is_active=True,
        created_at=T0,
        updated_at=T0,
    )
    values.update(kw)
    return Project(**values)


def token(project_id: str, **kw: Any) -> Token:
    secret = generate_token()
    values: dict[str, Any] = dict(
        id=str(uuid.uuid4()),
        token_hash=hash_token(secret),
        display=obfuscate_token(secret),
        project_id=project_id,
        is_active=True,
        created_at=T0,
    )
    values.update(kw)
    return Token(**values)


def event(i: int, **kw: Any) -> AuditEvent:
    values: dict[str, Any] = dict(
        id=f"ev-{i:03d}",
        timestamp=T0 + datetime.timedelta(minutes=i),
        action="token.create",
        actor="management",
        outcome="success",
    )
    values.update(kw)
    return AuditEvent(**values)


class StoreTestsMixin:
    """Mixed into a TestCase whose C{make_store} returns a fresh, empty store."""

    store: Any

    async def make_store(self) -> Any:
        raise AssertionError("subclass must override make_store")

    async def setUp(self) -> None:  # type: ignore[override]
        self.store = await self.make_store()

    # -- projects ----------------------------------------------------------------
    def test_provides_interface(self) -> None:
        verifyObject(IStore, self.store)

    async def test_project_round_trip(self) -> None:
        p = project(deactivated_at=None)
        self.assertEqual(await self.store.create_project(p), p)
        self.assertEqual(await self.store.get_project(p.id), p)
        self.assertIsNone(await self.store.get_project(str(uuid.uuid4())))

    async def test_projects_listed_by_name(self) -> None:
        for name in ["charlie", "alpha", "bravo"]:
            await self.store.create_project(project(name))
        names = [p.name for p in await self.store.list_projects()]
        self.assertEqual(names, ["alpha", "bravo", "charlie"])

    async def test_empty_lists(self) -> None:
        self.assertEqual(await self.store.list_projects(), [])
        self.assertEqual(await self.store.list_tokens(), [])
        self.assertEqual(await self.store.list_audit_events(AuditQuery(), 10, 0), ([], 0))

    async def test_duplicate_name(self) -> None:
        await self.store.create_project(project("same"))
        with self.assertRaises(DuplicateName):
            await self.store.create_project(project("same"))
        other = await self.store.create_project(project("other"))
        with self.assertRaises(DuplicateName):
            await self.store.update_project(attrs.evolve(other, name="same"))

    async def test_update_project(self) -> None:
        p = await self.store.create_project(project())
        later = T0 + datetime.timedelta(hours=1)
        changed = attrs.evolve(
            p,
            name="renamed",
            api_key="sk-new",
            is_active=False,
            deactivated_at=later,
            updated_at=later,
            created_at=later,  # not written
        )
        new = await self.store.update_project(changed)
        self.assertEqual(new, attrs.evolve(changed, created_at=T0))
        self.assertEqual(await self.store.get_project(p.id), new)

    async def test_update_missing_project(self) -> None:
        with self.assertRaises(NotFound):
            await self.store.update_project(project())

    # -- tokens --------------------------------------------------------------------
    async def test_token_round_trip(self) -> None:
        p = await self.store.create_project(project())
        t = token(p.id, expires_at=T0 + datetime.timedelta(days=1), max_requests=5)
        await self.store.create_token(t)
        self.assertEqual(await self.store.get_token(t.id), t)
        self.assertEqual(await self.store.get_token_by_hash(t.token_hash), t)
        self.assertIsNone(await self.store.get_token_by_hash(hash_token("sk-nope")))
        self.assertIsNone(await self.store.get_token(str(uuid.uuid4())))

    async def test_token_of_unknown_project(self) -> None:
        with self.assertRaises(NotFound):
            await self.store.create_token(token(str(uuid.uuid4())))

    async def test_list_tokens(self) -> None:
        a = await self.store.create_project(project("a"))
        b = await self.store.create_project(project("b"))
        made = []
        for i in range(5):
            t = token(
                a.id if i % 2 == 0 else b.id,
                created_at=T0 + datetime.timedelta(seconds=i),
                is_active=i != 4,
            )
            made.append(await self.store.create_token(t))
        newest_first = [t.id for t in reversed(made)]
        self.assertEqual([t.id for t in await self.store.list_tokens()], newest_first)
        self.assertEqual(
            [t.id for t in await self.store.list_tokens(project_id=a.id)],
            [made[4].id, made[2].id, made[0].id],
        )
        self.assertEqual(
            [t.id for t in await self.store.list_tokens(project_id=a.id, active_only=True)],
            [made[2].id, made[0].id],
        )
        self.assertEqual(
            [t.id for t in await self.store.list_tokens(limit=2, offset=1)], newest_first[1:3]
        )

    async def test_update_token(self) -> None:
        p = await self.store.create_project(project())
        t = await self.store.create_token(token(p.id))
        revoked_at = T0 + datetime.timedelta(minutes=5)
        changed = attrs.evolve(
            t,
            is_active=False,
            deactivated_at=revoked_at,
            max_requests=7,
            expires_at=T0 + datetime.timedelta(days=2),
            request_count=99,  # not written by update_token
        )
        new = await self.store.update_token(changed)
        self.assertEqual(new, attrs.evolve(changed, request_count=0))
        stored = await self.store.get_token(t.id)
        self.assertEqual(stored.deactivated_at, revoked_at)
        self.assertFalse(stored.is_active)
        with self.assertRaises(NotFound):
            await self.store.update_token(token(p.id))

    async def test_deactivate_project_tokens(self) -> None:
        p = await self.store.create_project(project("p"))
        other = await self.store.create_project(project("other"))
        earlier = T0 - datetime.timedelta(days=1)
        live = [await self.store.create_token(token(p.id)) for _ in range(3)]
        dead = await self.store.create_token(token(p.id, is_active=False, deactivated_at=earlier))
        foreign = await self.store.create_token(token(other.id))
        now = T0 + datetime.timedelta(hours=3)
        self.assertEqual(await self.store.deactivate_project_tokens(p.id, now), 3)
        for t in live:
            stored = await self.store.get_token(t.id)
            self.assertFalse(stored.is_active)
            self.assertEqual(stored.deactivated_at, now)
        self.assertEqual((await self.store.get_token(dead.id)).deactivated_at, earlier)
        self.assertTrue((await self.store.get_token(foreign.id)).is_active)
        self.assertEqual(await self.store.deactivate_project_tokens(p.id, now), 0)

    # -- counting ---------------------------------------------------------------
    async def test_count_request_outcomes(self) -> None:
        p = await self.store.create_project(project())
        now = T0 + datetime.timedelta(hours=1)
        ok = await self.store.create_token(token(p.id))
        inactive = await self.store.create_token(token(p.id, is_active=False))
        expired = await self.store.create_token(token(p.id, expires_at=now))
        used_up = await self.store.create_token(token(p.id, max_requests=2, request_count=2))
        unlimited = await self.store.create_token(token(p.id, max_requests=0, request_count=50))
        cases = [
            (ok, UsageOutcome.OK),
            (inactive, UsageOutcome.INACTIVE),
            (expired, UsageOutcome.EXPIRED),
            (used_up, UsageOutcome.QUOTA_EXCEEDED),
            (unlimited, UsageOutcome.OK),
        ]
        for t, expected in cases:
            self.assertEqual(await self.store.count_request(t.token_hash, now), expected)
        self.assertEqual(
            await self.store.count_request(hash_token("sk-unknown"), now), UsageOutcome.NOT_FOUND
        )
        counted = await self.store.get_token(ok.id)
        self.assertEqual(counted.request_count, 1)
        self.assertEqual(counted.last_used_at, now)
        self.assertEqual((await self.store.get_token(used_up.id)).request_count, 2)
        self.assertIsNone((await self.store.get_token(inactive.id)).last_used_at)

    async def test_not_yet_expired(self) -> None:
        p = await self.store.create_project(project())
        t = await self.store.create_token(
            token(p.id, expires_at=T0 + datetime.timedelta(seconds=1))
        )
        self.assertEqual(await self.store.count_request(t.token_hash, T0), UsageOutcome.OK)

    async def test_quota_is_atomic(self) -> None:
        """50 concurrent requests against max_requests=10 admit exactly 10."""
        p = await self.store.create_project(project())
        t = await self.store.create_token(token(p.id, max_requests=10))
        results = await defer.gatherResults(
            [self.store.count_request(t.token_hash, T0) for _ in range(50)]
        )
        self.assertEqual(results.count(UsageOutcome.OK), 10)
        self.assertEqual(results.count(UsageOutcome.QUOTA_EXCEEDED), 40)
        self.assertEqual((await self.store.get_token(t.id)).request_count, 10)

    async def test_add_usage_and_cache_hits(self) -> None:
        p = await self.store.create_project(project())
        a = await self.store.create_token(token(p.id))
        b = await self.store.create_token(token(p.id, request_count=5))
        when = T0 + datetime.timedelta(minutes=30)
        await self.store.add_usage(
            {a.token_hash: (3, when), b.token_hash: (1, when), hash_token("sk-gone"): (2, when)}
        )
        await self.store.add_usage({})
        await self.store.add_cache_hits({a.token_hash: 4, hash_token("sk-gone"): 1})
        await self.store.add_cache_hits({a.token_hash: 1})
        a2 = await self.store.get_token(a.id)
        b2 = await self.store.get_token(b.id)
        self.assertEqual((a2.request_count, a2.last_used_at, a2.cache_hit_count), (3, when, 5))
        self.assertEqual((b2.request_count, b2.cache_hit_count), (6, 0))

    # -- audit ------------------------------------------------------------------------
    async def test_audit_round_trip(self) -> None:
        e = event(
            1,
            project_id="p1",
            request_id="r1",
            correlation_id="c1",
            client_ip="10.0.0.1",
            method="POST",
            path="/manage/tokens",
            user_agent="curl/8",
            reason="created",
            token_id="sk-abcd**************wxyz",
            details={"name": "ünïcode", "n": 3, "nested": {"a": [1, 2]}},
        )
        await self.store.insert_audit_events([e])
        await self.store.insert_audit_events([])
        self.assertEqual(await self.store.get_audit_event(e.id), e)
        self.assertIsNone(await self.store.get_audit_event("missing"))

    async def test_audit_overlong_values_are_cut_not_lost(self) -> None:
        """A client's huge X-Request-ID must not make the audit batch fail."""
        long = "r" * 5000
        e = event(1, request_id=long, correlation_id=long, method="X" * 40, path="/" + long)
        big = event(3, details={"blob": "x" * 100_000})
        await self.store.insert_audit_events([e, event(2), big])
        self.assertEqual((await self.store.get_audit_event(big.id)).details, big.details)
        stored = await self.store.get_audit_event(e.id)
        self.assertTrue(long.startswith(stored.request_id))
        self.assertGreaterEqual(len(stored.request_id), 191)
        self.assertEqual(stored.path, "/" + long)
        self.assertIsNotNone(await self.store.get_audit_event("ev-002"))

    async def test_audit_filters_and_paging(self) -> None:
        events = [
            event(
                i,
                action="token.create" if i % 2 else "project.update",
                outcome="success" if i % 3 else "denied",
                client_ip=f"10.0.0.{i % 4}",
                project_id="p-a" if i < 10 else "p-b",
                request_id=f"req-{i}",
                reason="Quota Exhausted" if i == 7 else None,
                details={"marker": "needle-xyz"} if i == 11 else {},
            )
            for i in range(20)
        ]
        await self.store.insert_audit_events(events)
        page, total = await self.store.list_audit_events(AuditQuery(), 5, 0)
        self.assertEqual(total, 20)
        self.assertEqual([e.id for e in page], [f"ev-{i:03d}" for i in range(19, 14, -1)])
        page, total = await self.store.list_audit_events(AuditQuery(), 5, 18)
        self.assertEqual((total, [e.id for e in page]), (20, ["ev-001", "ev-000"]))

        async def ids(**kw: Any) -> list[str]:
            found, count = await self.store.list_audit_events(AuditQuery(**kw), 100, 0)
            self.assertEqual(count, len(found))
            return sorted(e.id for e in found)

        expect = [f"ev-{i:03d}" for i in range(20) if i % 2 and i % 3 == 0]
        self.assertEqual(await ids(action="token.create", outcome="denied"), expect)
        self.assertEqual(
            await ids(client_ip="10.0.0.3", project_id="p-b"), ["ev-011", "ev-015", "ev-019"]
        )
        self.assertEqual(await ids(request_id="req-4"), ["ev-004"])
        self.assertEqual(await ids(search="quota exh"), ["ev-007"])
        self.assertEqual(await ids(search="NEEDLE-xyz"), ["ev-011"])
        self.assertEqual(await ids(search="100%"), [])
        self.assertEqual(
            await ids(
                start_time=T0 + datetime.timedelta(minutes=5),
                end_time=T0 + datetime.timedelta(minutes=8),
            ),
            ["ev-005", "ev-006", "ev-007", "ev-008"],
        )
        self.assertEqual(
            await ids(start_time=T0 + datetime.timedelta(minutes=18, seconds=1)), ["ev-019"]
        )
        # A time in another zone means the same instant.
        plus2 = datetime.timezone(datetime.timedelta(hours=2))
        self.assertEqual(
            await ids(end_time=(T0 + datetime.timedelta(minutes=1)).astimezone(plus2)),
            ["ev-000", "ev-001"],
        )

    async def test_ping(self) -> None:
        self.assertIsNone(await self.store.ping())


class MemoryStoreTests(StoreTestsMixin, TestCase):
    async def make_store(self) -> Any:
        return MemoryStore()

    async def test_quota_atomic_under_threads(self) -> None:
        p = await self.store.create_project(project())
        t = await self.store.create_token(token(p.id, max_requests=10))
        results: list[UsageOutcome] = []

        def call() -> None:
            self.store.count_request(t.token_hash, T0).addCallback(results.append)

        threads = [threading.Thread(target=call) for _ in range(50)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        self.assertEqual(results.count(UsageOutcome.OK), 10)


class SQLiteStoreTests(StoreTestsMixin, TestCase):
    async def make_store(self) -> Any:
        return await open_store(self, "sqlite", new_location(self, "sqlite"))


class PostgresStoreTests(StoreTestsMixin, TestCase):
    async def make_store(self) -> Any:
        return await open_store(self, "postgres", new_location(self, "postgres"))


class MySQLStoreTests(StoreTestsMixin, TestCase):
    async def make_store(self) -> Any:
        return await open_store(self, "mysql", new_location(self, "mysql"))
