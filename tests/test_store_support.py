"""Fresh, isolated databases for store tests (removed again afterwards)."""

from __future__ import annotations

import base64
import os
import uuid
from typing import Any

import sqlalchemy as sa
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from llmproxy.crypto import KeyCipher
from llmproxy.store.sql import SQLStore, mysql_url, postgres_url, server_engine, sqlite_engine
from tests.services import MYSQL_DSN, POSTGRES_DSN, require_mysql, require_postgres

KEY = base64.b64encode(b"k" * 32).decode()
OTHER_KEY = base64.b64encode(b"o" * 32).decode()


def sqlite_url_for(testcase: TestCase) -> str:
    path = os.path.abspath(testcase.mktemp())
    return os.path.join(path, "data", "llmproxy.db")


def _scratch(testcase: TestCase, admin_url: str, create: str, drop: str, **engine_kw: Any) -> None:
    """Run C{create} now and C{drop} at cleanup, each on a fresh admin connection."""
    admin = sa.create_engine(admin_url, poolclass=sa.pool.NullPool, **engine_kw)
    with admin.begin() as conn:
        conn.execute(sa.text(create))

    def cleanup() -> None:
        with admin.begin() as conn:
            conn.execute(sa.text(drop))
        admin.dispose()

    testcase.addCleanup(cleanup)


def _with_database(url: str, name: str) -> str:
    return sa.engine.make_url(url).set(database=name).render_as_string(hide_password=False)


def new_postgres_schema(testcase: TestCase) -> str:
    """A SQLAlchemy URL whose connections use a new schema, dropped at cleanup."""
    require_postgres()
    name = "t_" + uuid.uuid4().hex[:16]
    base = postgres_url(POSTGRES_DSN)
    _scratch(testcase, base, f"CREATE SCHEMA {name}", f"DROP SCHEMA {name} CASCADE")
    sep = "&" if "?" in POSTGRES_DSN else "?"
    return base + f"{sep}options=-csearch_path%3D{name}"


def new_mysql_database(testcase: TestCase) -> str:
    """A SQLAlchemy URL of a new MySQL/MariaDB database, dropped at cleanup."""
    require_mysql()
    name = "t_" + uuid.uuid4().hex[:16]
    base = mysql_url(MYSQL_DSN)
    create = f"CREATE DATABASE {name} CHARACTER SET utf8mb4"
    _scratch(testcase, base, create, f"DROP DATABASE {name}")
    return _with_database(base, name)


def new_postgres_database(testcase: TestCase) -> str:
    """A fresh PostgreSQL database (dropped at cleanup); its URL."""
    require_postgres()
    name = "llmproxy_t_" + uuid.uuid4().hex[:12]
    base = postgres_url(POSTGRES_DSN)
    drop = f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    # CREATE/DROP DATABASE cannot run inside a transaction block
    _scratch(testcase, base, f"CREATE DATABASE {name}", drop, isolation_level="AUTOCOMMIT")
    return _with_database(base, name)


def make_engine(kind: str, location: str, pool_size: int = 10) -> sa.Engine:
    if kind == "sqlite":
        return sqlite_engine(location)
    return server_engine(location, pool_size=pool_size)


def new_location(testcase: TestCase, kind: str) -> str:
    if kind == "sqlite":
        return sqlite_url_for(testcase)
    if kind == "postgres":
        return new_postgres_schema(testcase)
    return new_mysql_database(testcase)


async def open_store(
    testcase: TestCase, kind: str, location: str, key: str | None = None, **kw: Any
) -> SQLStore:
    """An opened (migrated) SQLStore, closed at cleanup."""
    store = SQLStore(
        make_engine(kind, location, **kw), reactor, cipher=KeyCipher(key) if key else None
    )
    testcase.addCleanup(store.close)
    await store.open()
    return store
