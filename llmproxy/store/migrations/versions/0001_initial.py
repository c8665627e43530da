"""Initial schema: projects, tokens (hashed), audit_events, llmproxy_meta.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _ts() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("api_key", sa.Text, nullable=False),
        sa.Column("is_active", sa.Boolean(create_constraint=False), nullable=False),
        sa.Column("deactivated_at", _ts(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("display", sa.String(64), nullable=False),
        sa.Column(
            "project_id",
            sa.String(36),
            sa.ForeignKey("projects.id", ondelete="CASCADE", name="fk_tokens_project_id"),
            nullable=False,
        ),
        sa.Column("expires_at", _ts(), nullable=True),
        sa.Column("is_active", sa.Boolean(create_constraint=False), nullable=False),
        sa.Column("deactivated_at", _ts(), nullable=True),
        sa.Column("request_count", sa.BigInteger, nullable=False),
        sa.Column("max_requests", sa.BigInteger, nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("last_used_at", _ts(), nullable=True),
        sa.Column("cache_hit_count", sa.BigInteger, nullable=False),
    )
    op.create_index("idx_tokens_project_id", "tokens", ["project_id"])
    op.create_index("idx_tokens_expires_at", "tokens", ["expires_at"])
    op.create_index("idx_tokens_is_active", "tokens", ["is_active"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("timestamp", _ts(), nullable=False),
        sa.Column("action", sa.String(191), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("project_id", sa.String(64), nullable=True),
        sa.Column("request_id", sa.String(191), nullable=True),
        sa.Column("correlation_id", sa.String(191), nullable=True),
        sa.Column("client_ip", sa.String(45), nullable=True),
        sa.Column("method", sa.String(16), nullable=True),
        sa.Column("path", sa.Text, nullable=True),
        sa.Column("user_agent", sa.Text, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("token_id", sa.String(64), nullable=True),
        sa.Column(
            "metadata",
            sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb"),
            nullable=True,
        ),
        sa.CheckConstraint(
            "outcome IN ('success', 'failure', 'denied', 'error')",
            name="ck_audit_events_outcome",
        ),
    )
    op.create_index("idx_audit_timestamp", "audit_events", ["timestamp"])
    op.create_index("idx_audit_action", "audit_events", ["action"])
    op.create_index("idx_audit_project_id", "audit_events", ["project_id"])
    op.create_index("idx_audit_client_ip", "audit_events", ["client_ip"])
    op.create_index("idx_audit_request_id", "audit_events", ["request_id"])
    op.create_index("idx_audit_outcome", "audit_events", ["outcome"])
    op.create_index("idx_audit_ip_action", "audit_events", ["client_ip", "action"])
    op.create_table(
        "llmproxy_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("llmproxy_meta")
    op.drop_table("audit_events")
    op.drop_table("tokens")
    op.drop_table("projects")
