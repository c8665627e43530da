"""TokenValidator: the reference's validation order, caches and invalidation."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.invalidation import InvalidationHub
from llmproxy.store.memory import MemoryStore
from llmproxy.store.records import Project, Token
from llmproxy.tokens.format import generate_token, hash_token, obfuscate_token
from llmproxy.tokens.usage import UsageFlusher
from llmproxy.tokens.validator import (
    NOT_FOUND_TTL,
    REFRESH_DELAY,
    Rejection,
    TokenValidator,
    extract_bearer,
)

START = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.UTC)


class CountingStore(MemoryStore):
    """MemoryStore that counts lookups and can be made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.token_reads = 0
        self.project_reads = 0
        self.fail = False

    def get_token_by_hash(self, token_hash: str) -> defer.Deferred[Token | None]:
        self.token_reads += 1
        if self.fail:
            return defer.fail(ConnectionError("database down"))
        return super().get_token_by_hash(token_hash)

    def get_project(self, project_id: str) -> defer.Deferred[Project | None]:
        self.project_reads += 1
        if self.fail:
            return defer.fail(ConnectionError("database down"))
        return super().get_project(project_id)


class ValidatorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START.timestamp())
        self.store = CountingStore()
        self.hub = InvalidationHub()
        self.usage = UsageFlusher(self.store, self.clock, flush_interval=5)
        self.validator = TokenValidator(
            self.store, self.clock, usage=self.usage, hub=self.hub, project_cache_ttl=5.0
        )
        self.project = Project(
            id=str(uuid.uuid4()),
            name="p",
            api_key="sk-upstream-key",
            is_active=True,
            created_at=START,
            updated_at=START,
        )
        self.store.projects[self.project.id] = self.project

    def add_token(self, **kw: Any) -> tuple[str, Token]:
        secret = generate_token()
        fields: dict[str, Any] = dict(
            id=str(uuid.uuid4()),
            token_hash=hash_token(secret),
            display=obfuscate_token(secret),
            project_id=self.project.id,
            is_active=True,
            created_at=START,
        )
        fields.update(kw)
        token = Token(**fields)
        self.store.tokens[token.id] = token
        return secret, token

    def validate(self, secret: str) -> Token:
        return self.successResultOf(defer.ensureDeferred(self.validator.validate(secret)))

    def rejected(self, secret: str) -> Rejection:
        f = self.failureResultOf(defer.ensureDeferred(self.validator.validate(secret)), Rejection)
        return f.value  # type: ignore[no-any-return]

    def set_token(self, token: Token, **changes: Any) -> Token:
        updated = attrs.evolve(self.store.tokens[token.id], **changes)
        self.store.tokens[token.id] = updated
        return updated

    # -- extraction and format ---------------------------------------------------------

    def test_extract_bearer(self) -> None:
        self.assertEqual(extract_bearer(b"Bearer sk-abc "), "sk-abc")
        self.assertEqual(extract_bearer(b"bEaReR  sk-abc"), "sk-abc")
        for bad in (None, b"", b"Basic bXQ=", b"Bearer", b"sk-abc"):
            with self.assertRaises(Rejection) as e:
                extract_bearer(bad)
            self.assertEqual(
                (e.exception.status, e.exception.code, e.exception.description),
                (401, "invalid_token", "missing or invalid authorization header"),
            )

    def test_bad_format(self) -> None:
        r = self.rejected("abc")
        self.assertEqual((r.status, r.error, r.code), (401, "Invalid token", "invalid_token"))
        self.assertTrue(r.description.startswith("invalid token format"))
        self.assertEqual(self.store.token_reads, 0)

    def test_unknown_token(self) -> None:
        r = self.rejected(generate_token())
        self.assertEqual((r.status, r.error, r.code), (401, "Token not found", "token_not_found"))

    def test_unknown_token_is_remembered(self) -> None:
        """
        A token the store does not know is refused from the cache for a
        while (capped by the token cache's TTL), in a cache of its own.
        """
        unknown = generate_token()
        for _ in range(3):
            self.assertEqual(self.rejected(unknown).code, "token_not_found")
        self.assertEqual(self.store.token_reads, 1)
        self.assertEqual(self.validator.not_found_ttl, NOT_FOUND_TTL)
        self.clock.advance(NOT_FOUND_TTL)
        self.assertEqual(self.rejected(unknown).code, "token_not_found")
        self.assertEqual(self.store.token_reads, 2)
        # Made-up tokens do not push real ones out of the token cache.
        secret, _ = self.add_token()
        self.validate(secret)
        for _ in range(self.validator._tokens.max_entries + 1):
            self.rejected(generate_token())
        reads = self.store.token_reads
        self.validate(secret)
        self.assertEqual(self.store.token_reads, reads)

    def test_unknown_token_forgotten_on_announcement(self) -> None:
        secret = generate_token()
        self.assertEqual(self.rejected(secret).code, "token_not_found")
        # Only a token written to the store some other way than the management
        # API could appear after it was presented; an announcement covers it.
        _, token = self.add_token(token_hash=hash_token(secret))
        self.hub.token_changed(token.token_hash)
        self.assertEqual(self.validate(secret).id, token.id)

    def test_unknown_token_not_remembered_without_a_token_cache(self) -> None:
        validator = TokenValidator(self.store, self.clock, token_cache_ttl=0.0)
        secret = generate_token()
        for _ in range(2):
            d = defer.ensureDeferred(validator.validate(secret, count=False))
            self.assertEqual(self.failureResultOf(d, Rejection).value.code, "token_not_found")
        self.assertEqual(self.store.token_reads, 2)

    def test_concurrent_lookups_share_one_read(self) -> None:
        secret, token = self.add_token()
        unknown = generate_token()
        reads: dict[str, defer.Deferred[Token | None]] = {}

        def read(token_hash: str) -> defer.Deferred[Token | None]:
            self.assertNotIn(token_hash, reads)
            reads[token_hash] = defer.Deferred()
            return reads[token_hash]

        self.store.get_token_by_hash = read  # type: ignore[method-assign]
        known = [defer.ensureDeferred(self.validator.validate(secret)) for _ in range(3)]
        missing = [defer.ensureDeferred(self.validator.validate(unknown)) for _ in range(3)]
        # A client that leaves does not stop the read for the others.
        known[0].cancel()
        self.failureResultOf(known[0], defer.CancelledError)
        self.assertEqual(len(reads), 2)
        reads[token.token_hash].callback(token)
        reads[hash_token(unknown)].callback(None)
        for d in known[1:]:
            self.assertEqual(self.successResultOf(d).id, token.id)
        for d in missing:
            self.assertEqual(self.failureResultOf(d, Rejection).value.code, "token_not_found")
        # Both answers are cached: no further reads.
        self.validate(secret)
        self.rejected(unknown)
        self.assertEqual(len(reads), 2)

    def test_failed_shared_read_fails_every_waiter_and_is_not_cached(self) -> None:
        secret, token = self.add_token()
        slow: defer.Deferred[Token | None] = defer.Deferred()
        original = self.store.get_token_by_hash
        self.store.get_token_by_hash = lambda h: slow  # type: ignore[method-assign]
        waiting = [defer.ensureDeferred(self.validator.validate(secret)) for _ in range(2)]
        slow.errback(ConnectionError("database down"))
        for d in waiting:
            f = self.failureResultOf(d, Rejection)
            self.assertEqual(
                (f.value.code, f.value.description), ("invalid_token", "failed to retrieve token")
            )
        self.flushLoggedErrors(ConnectionError)
        self.store.get_token_by_hash = original  # type: ignore[method-assign]
        self.assertEqual(self.validate(secret).id, token.id)

    def test_store_error_is_invalid_token(self) -> None:
        secret, _ = self.add_token()
        self.store.fail = True
        r = self.rejected(secret)
        self.assertEqual((r.status, r.code), (401, "invalid_token"))
        self.assertEqual(r.description, "failed to retrieve token")
        self.flushLoggedErrors(ConnectionError)

    def test_inactive_and_expired(self) -> None:
        secret, _ = self.add_token(is_active=False)
        r = self.rejected(secret)
        self.assertEqual((r.status, r.error, r.code), (401, "Token is inactive", "token_inactive"))
        secret, _ = self.add_token(expires_at=START + datetime.timedelta(seconds=60))
        self.validate(secret)
        self.clock.advance(61)
        r = self.rejected(secret)
        self.assertEqual((r.status, r.error, r.code), (401, "Token has expired", "token_expired"))

    # -- caching and invalidation ---------------------------------------------------------

    def test_valid_token_is_cached(self) -> None:
        secret, token = self.add_token()
        self.assertEqual(self.validate(secret).id, token.id)
        self.validate(secret)
        self.validate(secret)
        self.assertEqual(self.store.token_reads, 1)

    def test_revocation_takes_effect_on_the_next_request(self) -> None:
        secret, token = self.add_token()
        self.validate(secret)
        self.set_token(token, is_active=False)
        self.hub.token_changed(token.token_hash)
        r = self.rejected(secret)
        self.assertEqual(r.code, "token_inactive")

    def test_cache_ttl_is_a_backstop(self) -> None:
        secret, token = self.add_token()
        self.validate(secret)
        self.set_token(token, is_active=False)  # changed behind our back, no announcement
        self.validate(secret)  # still cached
        self.clock.advance(self.validator.token_cache_ttl)
        self.assertEqual(self.rejected(secret).code, "token_inactive")

    def test_steady_use_refreshes_ahead_of_expiry(self) -> None:
        secret, token = self.add_token()
        self.validate(secret)
        self.set_token(token, is_active=False)  # changed behind our back
        self.clock.advance(self.validator.token_cache_ttl * 0.6)
        # Past half its TTL the entry is still served, and read again a little
        # later, off the path of the request that used it.
        self.assertEqual(self.validate(secret).id, token.id)
        self.assertEqual(self.store.token_reads, 1)
        self.clock.advance(REFRESH_DELAY)
        self.assertEqual(self.store.token_reads, 2)
        self.assertEqual(self.rejected(secret).code, "token_inactive")
        self.assertEqual(self.store.token_reads, 2)

    def test_one_refresh_at_a_time_and_a_failed_one_changes_nothing(self) -> None:
        secret, token = self.add_token()
        t = self.validate(secret)
        self.successResultOf(defer.ensureDeferred(self.validator.check_project(t)))
        slow: defer.Deferred[Project | None] = defer.Deferred()
        asked: list[str] = []
        self.store.get_project = lambda pid: asked.append(pid) or slow  # type: ignore[method-assign]
        self.clock.advance(3.0)  # past half of the 5 s project TTL
        for _ in range(3):
            self.successResultOf(defer.ensureDeferred(self.validator.check_project(t)))
        self.clock.advance(REFRESH_DELAY)
        self.successResultOf(defer.ensureDeferred(self.validator.check_project(t)))
        self.assertEqual(len(asked), 1)
        slow.errback(ConnectionError("database down"))
        del self.store.get_project
        # A failed refresh kept the entry; a later use tries again, and the change
        # is seen before the TTL runs out.
        self.store.projects[self.project.id] = attrs.evolve(self.project, is_active=False)
        self.clock.advance(1.8)
        self.successResultOf(defer.ensureDeferred(self.validator.check_project(t)))
        self.clock.advance(0.1)
        f = self.failureResultOf(defer.ensureDeferred(self.validator.check_project(t)), Rejection)
        self.assertEqual(f.value.code, "project_inactive")

    def test_lookup_racing_an_invalidation_is_not_cached(self) -> None:
        secret, token = self.add_token()
        slow: defer.Deferred[Token | None] = defer.Deferred()
        original = self.store.get_token_by_hash
        self.store.get_token_by_hash = lambda h: slow  # type: ignore[method-assign]
        d = defer.ensureDeferred(self.validator.validate(secret))
        # The token is revoked while the lookup is under way.
        self.set_token(token, is_active=False)
        self.hub.token_changed(token.token_hash)
        slow.callback(token)  # the stale, still-active row
        self.successResultOf(d)
        self.store.get_token_by_hash = original  # type: ignore[method-assign]
        self.assertEqual(self.rejected(secret).code, "token_inactive")

    def test_project_deactivation_is_seen_at_once(self) -> None:
        secret, token = self.add_token()
        t = self.validate(secret)
        self.successResultOf(defer.ensureDeferred(self.validator.check_project(t)))
        self.store.projects[self.project.id] = attrs.evolve(self.project, is_active=False)
        self.hub.project_changed(self.project.id)
        f = self.failureResultOf(
            defer.ensureDeferred(self.validator.check_project(self.validate(secret))), Rejection
        )
        self.assertEqual(
            (f.value.status, f.value.error, f.value.code),
            (403, "Project is inactive", "project_inactive"),
        )

    def test_project_lookup_failure_is_503(self) -> None:
        secret, token = self.add_token()
        t = self.validate(secret)
        self.store.fail = True
        f = self.failureResultOf(defer.ensureDeferred(self.validator.check_project(t)), Rejection)
        self.assertEqual((f.value.status, f.value.code), (503, "service_unavailable"))
        f = self.failureResultOf(defer.ensureDeferred(self.validator.api_key(t)), Rejection)
        self.assertEqual((f.value.status, f.value.code), (503, "upstream_auth_error"))
        self.assertEqual(f.value.description, "failed to load upstream API key")
        self.flushLoggedErrors(ConnectionError)

    def test_key_rotation_reaches_the_next_request(self) -> None:
        secret, _ = self.add_token()
        t = self.validate(secret)
        self.assertEqual(
            self.successResultOf(defer.ensureDeferred(self.validator.api_key(t))),
            "sk-upstream-key",
        )
        self.store.projects[self.project.id] = attrs.evolve(self.project, api_key="sk-new-key")
        self.hub.project_changed(self.project.id)
        self.assertEqual(
            self.successResultOf(defer.ensureDeferred(self.validator.api_key(t))), "sk-new-key"
        )

    def test_empty_key_is_upstream_auth_error(self) -> None:
        self.store.projects[self.project.id] = attrs.evolve(self.project, api_key="")
        secret, _ = self.add_token()
        t = self.validate(secret)
        f = self.failureResultOf(defer.ensureDeferred(self.validator.api_key(t)), Rejection)
        self.assertEqual(f.value.code, "upstream_auth_error")

    def test_caches_are_bounded(self) -> None:
        validator = TokenValidator(self.store, self.clock, token_cache_max=3)
        secrets = [self.add_token()[0] for _ in range(10)]
        for s in secrets:
            self.successResultOf(defer.ensureDeferred(validator.validate(s)))
        self.assertEqual(len(validator._tokens), 3)

    # -- quota and usage -------------------------------------------------------------------

    def test_quota_counted_on_every_request(self) -> None:
        secret, token = self.add_token(max_requests=2)
        self.validate(secret)
        self.validate(secret)
        r = self.rejected(secret)
        self.assertEqual(
            (r.status, r.error, r.code), (429, "Rate limit exceeded", "rate_limit_exceeded")
        )
        stored = self.store.tokens[token.id]
        self.assertEqual(stored.request_count, 2)
        self.assertIsNotNone(stored.last_used_at)
        self.assertEqual(self.usage.pending, 0)

    def test_limited_token_revoked_elsewhere_is_refused(self) -> None:
        # Quota tokens are checked by the store on every request, cache or not.
        secret, token = self.add_token(max_requests=100)
        self.validate(secret)
        self.set_token(token, is_active=False)
        self.assertEqual(self.rejected(secret).code, "token_inactive")

    def test_unlimited_usage_goes_to_the_flusher(self) -> None:
        secret, token = self.add_token()
        for _ in range(3):
            self.validate(secret)
        self.assertEqual(self.usage.pending, 3)
        self.assertEqual(self.store.tokens[token.id].request_count, 0)
        self.successResultOf(self.usage.flush())
        self.assertEqual(self.store.tokens[token.id].request_count, 3)

    def test_from_config(self) -> None:
        from llmproxy.config import Config

        config = Config.from_env(
            {
                "MANAGEMENT_TOKEN": "mt",
                "TOKEN_CACHE_TTL": "60s",
                "LLM_PROXY_ACTIVE_CACHE_TTL": "2s",
                "LLM_PROXY_API_KEY_CACHE_TTL": "10s",
            }
        )
        v = TokenValidator.from_config(config, self.store, self.clock, usage=None, hub=None)
        self.assertEqual(
            (v.token_cache_ttl, v.project_cache_ttl, v.api_key_cache_ttl), (60.0, 2.0, 10.0)
        )
