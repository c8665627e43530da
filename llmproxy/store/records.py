"""Value records the stores hand out. Times are timezone-aware UTC datetimes."""

from __future__ import annotations

import datetime
import enum
from typing import Any

import attrs


@attrs.frozen
class Project:
    id: str
    name: str
    #: The provider key in plaintext (the store decrypts on read).
    api_key: str
    is_active: bool
    created_at: datetime.datetime
    updated_at: datetime.datetime
    deactivated_at: datetime.datetime | None = None


@attrs.frozen
class Token:
    id: str
    #: Lowercase hex SHA-256 of the token string; the plaintext is never stored.
    token_hash: str
    #: Obfuscated form (``sk-abcd**************wxyz``) kept for listings.
    display: str
    project_id: str
    is_active: bool
    created_at: datetime.datetime
    expires_at: datetime.datetime | None = None
    deactivated_at: datetime.datetime | None = None
    request_count: int = 0
    #: None means unlimited.
    max_requests: int | None = None
    last_used_at: datetime.datetime | None = None
    cache_hit_count: int = 0


@attrs.frozen
class AuditEvent:
    id: str
    timestamp: datetime.datetime
    action: str
    actor: str
    #: success | failure | denied | error
    outcome: str
    project_id: str | None = None
    request_id: str | None = None
    correlation_id: str | None = None
    client_ip: str | None = None
    method: str | None = None
    path: str | None = None
    user_agent: str | None = None
    reason: str | None = None
    token_id: str | None = None
    details: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class AuditQuery:
    """Filters for listing audit events; all optional, exact match unless noted."""

    action: str | None = None
    client_ip: str | None = None
    project_id: str | None = None
    outcome: str | None = None
    actor: str | None = None
    request_id: str | None = None
    correlation_id: str | None = None
    method: str | None = None
    path: str | None = None
    #: Substring over request_id, correlation_id, client_ip, action, actor,
    #: method, path, reason, metadata.
    search: str | None = None
    start_time: datetime.datetime | None = None
    end_time: datetime.datetime | None = None


#: The L{AuditQuery} fields that filter by exact match.
AUDIT_EQUALITY_FILTERS = (
    "action",
    "client_ip",
    "project_id",
    "outcome",
    "actor",
    "request_id",
    "correlation_id",
    "method",
    "path",
)


class UsageOutcome(enum.Enum):
    """Result of atomically counting one request against a token."""

    OK = "ok"
    NOT_FOUND = "not_found"
    INACTIVE = "inactive"
    EXPIRED = "expired"
    QUOTA_EXCEEDED = "quota_exceeded"


class DuplicateName(Exception):
    """A project with this name exists already."""


class NotFound(Exception):
    """The record does not exist."""
