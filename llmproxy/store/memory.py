"""
L{MemoryStore}: the whole L{IStore} in dictionaries. Used by tests of
everything above the store, and as the reference the SQL store is
checked against (the shared store test suite runs on both).
"""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Mapping, Sequence

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from llmproxy.store.interface import IStore
from llmproxy.store.records import (
    AUDIT_EQUALITY_FILTERS,
    AuditEvent,
    AuditQuery,
    DuplicateName,
    NotFound,
    Project,
    Token,
    UsageOutcome,
)

_SEARCH_FIELDS = (
    "request_id",
    "correlation_id",
    "client_ip",
    "action",
    "actor",
    "method",
    "path",
    "reason",
)


def classify_token(token: Token | None, now: datetime.datetime) -> UsageOutcome:
    """Why C{token} may (OK) or may not be counted at C{now}; shared by all stores."""
    if token is None:
        return UsageOutcome.NOT_FOUND
    if not token.is_active:
        return UsageOutcome.INACTIVE
    if token.expires_at is not None and token.expires_at <= now:
        return UsageOutcome.EXPIRED
    if (
        token.max_requests is not None
        and token.max_requests > 0
        and token.request_count >= token.max_requests
    ):
        return UsageOutcome.QUOTA_EXCEEDED
    return UsageOutcome.OK


def audit_matches(event: AuditEvent, query: AuditQuery) -> bool:
    """The filter semantics every store implements (search is case-insensitive)."""
    for name in AUDIT_EQUALITY_FILTERS:
        wanted = getattr(query, name)
        if wanted is not None and getattr(event, name) != wanted:
            return False
    if query.start_time is not None and event.timestamp < query.start_time:
        return False
    if query.end_time is not None and event.timestamp > query.end_time:
        return False
    if query.search:
        needle = query.search.lower()
        haystack = [getattr(event, name) or "" for name in _SEARCH_FIELDS]
        if event.details:
            haystack.append(
                json.dumps(event.details, sort_keys=True, ensure_ascii=False, default=str)
            )
        if not any(needle in h.lower() for h in haystack):
            return False
    return True


@implementer(IStore)
class MemoryStore:
    """Thread-safe in-memory store; every call completes synchronously."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.projects: dict[str, Project] = {}
        self.tokens: dict[str, Token] = {}
        self.audit: dict[str, AuditEvent] = {}

    # -- projects --------------------------------------------------------------
    def create_project(self, project: Project) -> Deferred[Project]:
        with self._lock:
            if any(p.name == project.name for p in self.projects.values()):
                return defer.fail(DuplicateName(project.name))
            self.projects[project.id] = project
        return defer.succeed(project)

    def get_project(self, project_id: str) -> Deferred[Project | None]:
        return defer.succeed(self.projects.get(project_id))

    def list_projects(self) -> Deferred[list[Project]]:
        with self._lock:
            projects = sorted(self.projects.values(), key=lambda p: (p.name, p.id))
        return defer.succeed(projects)

    def update_project(self, project: Project) -> Deferred[Project]:
        with self._lock:
            old = self.projects.get(project.id)
            if old is None:
                return defer.fail(NotFound(project.id))
            if any(p.name == project.name and p.id != project.id for p in self.projects.values()):
                return defer.fail(DuplicateName(project.name))
            new = attrs.evolve(
                old,
                name=project.name,
                api_key=project.api_key,
                is_active=project.is_active,
                deactivated_at=project.deactivated_at,
                updated_at=project.updated_at,
            )
            self.projects[project.id] = new
        return defer.succeed(new)

    # -- tokens ------------------------------------------------------------------
    def create_token(self, token: Token) -> Deferred[Token]:
        with self._lock:
            if token.project_id not in self.projects:
                return defer.fail(NotFound(token.project_id))
            self.tokens[token.id] = token
        return defer.succeed(token)

    def get_token(self, token_id: str) -> Deferred[Token | None]:
        return defer.succeed(self.tokens.get(token_id))

    def _by_hash(self, token_hash: str) -> Token | None:
        for t in self.tokens.values():
            if t.token_hash == token_hash:
                return t
        return None

    def get_token_by_hash(self, token_hash: str) -> Deferred[Token | None]:
        with self._lock:
            return defer.succeed(self._by_hash(token_hash))

    def list_tokens(
        self,
        project_id: str | None = None,
        active_only: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> Deferred[list[Token]]:
        with self._lock:
            tokens = [
                t
                for t in self.tokens.values()
                if (project_id is None or t.project_id == project_id)
                and (not active_only or t.is_active)
            ]
        tokens.sort(key=lambda t: (t.created_at, t.id), reverse=True)
        tokens = tokens[offset:] if limit is None else tokens[offset : offset + limit]
        return defer.succeed(tokens)

    def update_token(self, token: Token) -> Deferred[Token]:
        with self._lock:
            old = self.tokens.get(token.id)
            if old is None:
                return defer.fail(NotFound(token.id))
            new = attrs.evolve(
                old,
                is_active=token.is_active,
                deactivated_at=token.deactivated_at,
                max_requests=token.max_requests,
                expires_at=token.expires_at,
            )
            self.tokens[token.id] = new
        return defer.succeed(new)

    def deactivate_project_tokens(self, project_id: str, now: datetime.datetime) -> Deferred[int]:
        count = 0
        with self._lock:
            for t in list(self.tokens.values()):
                if t.project_id == project_id and t.is_active:
                    self.tokens[t.id] = attrs.evolve(t, is_active=False, deactivated_at=now)
                    count += 1
        return defer.succeed(count)

    def count_request(self, token_hash: str, now: datetime.datetime) -> Deferred[UsageOutcome]:
        with self._lock:
            token = self._by_hash(token_hash)
            outcome = classify_token(token, now)
            if token is not None and outcome is UsageOutcome.OK:
                self.tokens[token.id] = attrs.evolve(
                    token, request_count=token.request_count + 1, last_used_at=now
                )
        return defer.succeed(outcome)

    def add_usage(self, counts: Mapping[str, tuple[int, datetime.datetime]]) -> Deferred[None]:
        with self._lock:
            for token_hash, (n, when) in counts.items():
                token = self._by_hash(token_hash)
                if token is not None:
                    self.tokens[token.id] = attrs.evolve(
                        token, request_count=token.request_count + n, last_used_at=when
                    )
        return defer.succeed(None)

    def add_cache_hits(self, counts: Mapping[str, int]) -> Deferred[None]:
        with self._lock:
            for token_hash, n in counts.items():
                token = self._by_hash(token_hash)
                if token is not None:
                    self.tokens[token.id] = attrs.evolve(
                        token, cache_hit_count=token.cache_hit_count + n
                    )
        return defer.succeed(None)

    # -- audit -------------------------------------------------------------------
    def insert_audit_events(self, events: Sequence[AuditEvent]) -> Deferred[None]:
        with self._lock:
            for e in events:
                self.audit[e.id] = e
        return defer.succeed(None)

    def list_audit_events(
        self, query: AuditQuery, limit: int, offset: int
    ) -> Deferred[tuple[list[AuditEvent], int]]:
        with self._lock:
            matching = [e for e in self.audit.values() if audit_matches(e, query)]
        matching.sort(key=lambda e: (e.timestamp, e.id), reverse=True)
        return defer.succeed((matching[offset : offset + limit], len(matching)))

    def get_audit_event(self, event_id: str) -> Deferred[AuditEvent | None]:
        return defer.succeed(self.audit.get(event_id))

    # -- lifecycle -----------------------------------------------------------------
    def ping(self) -> Deferred[None]:
        return defer.succeed(None)

    def close(self) -> Deferred[None]:
        return defer.succeed(None)
