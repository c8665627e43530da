"""
The database schema as SQLAlchemy Core tables: the single description
that queries are written against. Migrations (``migrations/versions``)
create the same tables; a test checks both agree.

Times are stored as naive UTC (``DATETIME``/``TIMESTAMP`` without zone,
``DATETIME(6)`` on MySQL) and come back as aware UTC datetimes, so
comparisons in SQL are portable across the three databases.
"""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

# sqlalchemy.dialects.mysql is imported only in the MySQL branches below:
# SQLite and PostgreSQL never load it.

OUTCOMES = ("success", "failure", "denied", "error")


class UTCDateTime(TypeDecorator[datetime.datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out; naive UTC at rest."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects import mysql

            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, str):  # pragma: no cover - drivers return datetimes
            value = datetime.datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=datetime.UTC)
        return value.astimezone(datetime.UTC)


class LongText(TypeDecorator[str]):
    """C{TEXT}; C{MEDIUMTEXT} on MySQL/MariaDB, whose C{TEXT} holds only 64 KiB."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects import mysql

            return dialect.type_descriptor(mysql.MEDIUMTEXT())
        return super().load_dialect_impl(dialect)


metadata = MetaData()

projects = Table(
    "projects",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(255), nullable=False, unique=True),
    #: plaintext, or ``enc:v1:...`` when ENCRYPTION_KEY is set
    Column("api_key", Text, nullable=False),
    Column("is_active", Boolean(create_constraint=False), nullable=False),
    Column("deactivated_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(36), primary_key=True),
    #: lowercase hex SHA-256 of the token; the token itself is never stored
    Column("token_hash", String(64), nullable=False, unique=True),
    #: obfuscated token for listings (sk-abcd**************wxyz)
    Column("display", String(64), nullable=False),
    Column(
        "project_id",
        String(36),
        ForeignKey("projects.id", ondelete="CASCADE", name="fk_tokens_project_id"),
        nullable=False,
    ),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("is_active", Boolean(create_constraint=False), nullable=False),
    Column("deactivated_at", UTCDateTime, nullable=True),
    Column("request_count", BigInteger, nullable=False),
    Column("max_requests", BigInteger, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_used_at", UTCDateTime, nullable=True),
    Column("cache_hit_count", BigInteger, nullable=False),
    Index("idx_tokens_project_id", "project_id"),
    Index("idx_tokens_expires_at", "expires_at"),
    Index("idx_tokens_is_active", "is_active"),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("timestamp", UTCDateTime, nullable=False),
    Column("action", String(191), nullable=False),
    Column("actor", String(255), nullable=False),
    Column("project_id", String(64), nullable=True),
    Column("request_id", String(191), nullable=True),
    Column("correlation_id", String(191), nullable=True),
    Column("client_ip", String(45), nullable=True),
    Column("method", String(16), nullable=True),
    Column("path", Text, nullable=True),
    Column("user_agent", Text, nullable=True),
    Column("outcome", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("token_id", String(64), nullable=True),
    #: JSON object (the event's details)
    Column("metadata", LongText, nullable=True),
    CheckConstraint(
        "outcome IN ('success', 'failure', 'denied', 'error')", name="ck_audit_events_outcome"
    ),
    Index("idx_audit_timestamp", "timestamp"),
    Index("idx_audit_action", "action"),
    Index("idx_audit_project_id", "project_id"),
    Index("idx_audit_client_ip", "client_ip"),
    Index("idx_audit_request_id", "request_id"),
    Index("idx_audit_outcome", "outcome"),
    Index("idx_audit_ip_action", "client_ip", "action"),
)

#: Small key/value table: the encryption key check lives here.
meta = Table(
    "llmproxy_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

#: Keys in L{meta}.
KEY_CHECK = "encryption_key_check"

__all__ = [
    "KEY_CHECK",
    "OUTCOMES",
    "LongText",
    "UTCDateTime",
    "audit_events",
    "meta",
    "metadata",
    "projects",
    "tokens",
]
