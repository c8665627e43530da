"""
The store seam. Every method returns a Deferred and never blocks the
reactor: SQL implementations run on their own thread pool.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence

from twisted.internet.defer import Deferred
from zope.interface import Interface

from llmproxy.store.records import AuditEvent, AuditQuery, Project, Token, UsageOutcome


class IStore(Interface):
    # -- projects --------------------------------------------------------------
    def create_project(project: Project) -> Deferred[Project]:
        """Insert; errback L{DuplicateName} when the name is taken."""

    def get_project(project_id: str) -> Deferred[Project | None]:
        """The project, or None."""

    def list_projects() -> Deferred[list[Project]]:
        """All projects ordered by name."""

    def update_project(project: Project) -> Deferred[Project]:
        """Write name, api_key, is_active, deactivated_at, updated_at.

        Errback L{NotFound} or L{DuplicateName}."""

    # -- tokens ------------------------------------------------------------------
    def create_token(token: Token) -> Deferred[Token]:
        """Insert a token record."""

    def get_token(token_id: str) -> Deferred[Token | None]:
        """By management id (UUID)."""

    def get_token_by_hash(token_hash: str) -> Deferred[Token | None]:
        """By SHA-256 hex of the secret."""

    def list_tokens(
        project_id: str | None = None,
        active_only: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> Deferred[list[Token]]:
        """Newest first."""

    def update_token(token: Token) -> Deferred[Token]:
        """Write is_active, deactivated_at, max_requests, expires_at. Errback L{NotFound}."""

    def deactivate_project_tokens(project_id: str, now: datetime.datetime) -> Deferred[int]:
        """Revoke every active token of a project (deactivated_at = now); return how many."""

    def count_request(token_hash: str, now: datetime.datetime) -> Deferred[UsageOutcome]:
        """
        Atomically: if the token exists, is active, unexpired at C{now} and
        below its quota, add one to request_count and set last_used_at; in
        one statement, so concurrent callers can never exceed max_requests.
        Otherwise say why not.
        """

    def add_usage(
        counts: Mapping[str, tuple[int, datetime.datetime]],
    ) -> Deferred[None]:
        """Batch: for each token hash, request_count += n and last_used_at = t."""

    def add_cache_hits(counts: Mapping[str, int]) -> Deferred[None]:
        """Batch: for each token hash, cache_hit_count += n."""

    # -- audit -------------------------------------------------------------------
    def insert_audit_events(events: Sequence[AuditEvent]) -> Deferred[None]:
        """Batch insert."""

    def list_audit_events(
        query: AuditQuery, limit: int, offset: int
    ) -> Deferred[tuple[list[AuditEvent], int]]:
        """Newest first; also the total count matching C{query}."""

    def get_audit_event(event_id: str) -> Deferred[AuditEvent | None]:
        """One event or None."""

    # -- lifecycle -----------------------------------------------------------------
    def ping() -> Deferred[None]:
        """Succeed when the database answers (used by /ready)."""

    def close() -> Deferred[None]:
        """Release connections and threads."""
