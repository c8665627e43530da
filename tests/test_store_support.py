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


def new_postgres_schema(testcase: TestCase) -> str:
    """A SQLAlchemy URL whose connections use a new schema, dropped at cleanup."""
    require_postgres()
    name = "t_" + uuid.uuid4().hex[:16]
    admin = sa.create_engine(postgres_url(POSTGRES_DSN), poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {name}"))

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {name} CASCADE"))
        admin.dispose()

    testcase.addCleanup(drop)
    sep = "&" if "?" in POSTGRES_DSN else "?"
    return postgres_url(POSTGRES_DSN) + f"{sep}options=-csearch_path%3D{name}"


def new_mysql_database(testcase: TestCase) -> str:
    """A SQLAlchemy URL of a new MySQL/MariaDB database, dropped at cleanup."""
    require_mysql()
    name = "t_" + uuid.uuid4().hex[:16]
    base = mysql_url(MYSQL_DSN)
    admin = sa.create_engine(base, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP DATABASE {name}"))
        admin.dispose()

    testcase.addCleanup(drop)
    url = sa.engine.make_url(base).set(database=name)
    return url.render_as_string(hide_password=False)


def new_postgres_database(testcase: TestCase) -> str:
    """A fresh PostgreSQL database (dropped at cleanup); its URL."""
    require_postgres()
    name = "llmproxy_t_" + uuid.uuid4().hex[:12]
    base = postgres_url(POSTGRES_DSN)
    admin = sa.create_engine(base, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()

    testcase.addCleanup(drop)
    url = sa.engine.make_url(base).set(database=name)
    return url.render_as_string(hide_password=False)


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
