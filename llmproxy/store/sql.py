"""
L{SQLStore}: L{IStore} on SQLite, PostgreSQL or MySQL/MariaDB through
SQLAlchemy Core, on a dedicated thread pool so the reactor never waits for
the database.

SQLite gets one connection and one thread (a single writer: concurrent
SQLite writers fail with ``database is locked``). PostgreSQL and MySQL get
C{DATABASE_POOL_SIZE} connections and as many threads; a connection that
died under us (server restart, ``pg_terminate_backend``) is discarded and
the operation retried once on a fresh one.
"""

from __future__ import annotations

import ast
import datetime
import fcntl
import functools
import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from llmproxy.config import ConfigError
from llmproxy.crypto import DecryptionError, KeyCipher, is_encrypted
from llmproxy.store import schema
from llmproxy.store.interface import IStore
from llmproxy.store.memory import classify_token
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

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

log = Logger()
T = TypeVar("T")

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
_PG_LOCK_ID = 3141592653
_MYSQL_LOCK_NAME = "llmproxy-migrations"
_KEY_CHECK_PLAINTEXT = "llmproxy-encryption-key-check"

_P, _T, _A = schema.projects.c, schema.tokens.c, schema.audit_events.c
_AUDIT_SEARCH = (
    "request_id",
    "correlation_id",
    "client_ip",
    "action",
    "actor",
    "method",
    "path",
    "reason",
    "metadata",
)


# -- engines -------------------------------------------------------------------

_GO_MYSQL_DSN = re.compile(
    r"^(?:(?P<user>[^:@/]*)(?::(?P<password>[^@]*))?@)?"
    r"(?:tcp\((?P<host>[^)]*)\)|unix\((?P<socket>[^)]*)\))?"
    r"/(?P<db>[^?]*)(?:\?(?P<params>.*))?$"
)


def postgres_url(dsn: str) -> str:
    """A SQLAlchemy URL for psycopg 3 from ``postgres://``/``postgresql://`` URLs."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if dsn.startswith(prefix):
            return "postgresql+psycopg://" + dsn[len(prefix) :]
    raise ConfigError(
        "DATABASE_URL: expected postgresql://user:password@host:port/dbname for DB_DRIVER=postgres"
    )


def mysql_url(dsn: str) -> str:
    """
    A SQLAlchemy URL for PyMySQL from ``mysql://`` URLs or the Go driver's
    DSN (``user:pass@tcp(host:3306)/db?parseTime=true``).
    """
    for prefix in ("mysql+pymysql://", "mysql://", "mariadb://"):
        if dsn.startswith(prefix):
            rest = dsn[len(prefix) :]
            sep = "&" if "?" in rest else "?"
            if "charset=" not in rest:
                rest += sep + "charset=utf8mb4"
            return "mysql+pymysql://" + rest
    m = _GO_MYSQL_DSN.match(dsn)
    if m is None:
        raise ConfigError(
            "DATABASE_URL: expected mysql://user:password@host:port/dbname for DB_DRIVER=mysql"
        )
    auth = ""
    if m["user"]:
        auth = quote(m["user"], safe="")
        if m["password"]:
            auth += ":" + quote(m["password"], safe="")
        auth += "@"
    params = ["charset=utf8mb4"]
    if m["socket"]:
        params.append("unix_socket=" + quote(m["socket"], safe="/"))
    return f"mysql+pymysql://{auth}{m['host'] or ''}/{m['db']}?" + "&".join(params)


def _sqlite_pragmas(dbapi_conn: Any, record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def sqlite_engine(path: str) -> Engine:
    """One connection to the SQLite file C{path} (its directory is created)."""
    if path == ":memory:":
        engine = sa.create_engine(
            "sqlite://",
            poolclass=sa.pool.StaticPool,
            connect_args={"check_same_thread": False},
        )
    else:
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        engine = sa.create_engine(
            # A URL object, not a string: the path may contain ?, # or %.
            sa.engine.URL.create("sqlite", database=path),
            poolclass=sa.pool.QueuePool,
            pool_size=1,
            max_overflow=0,
            connect_args={"check_same_thread": False, "timeout": 5.0},
        )
    sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_reader_pragmas(dbapi_conn: Any, record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA query_only=ON")
    cur.close()


def sqlite_read_engine(path: str, size: int = 4) -> Engine:
    """
    Read-only connections to the SQLite file C{path}: with WAL, readers
    never wait for the single writer, so listings and token lookups do not
    queue behind audit batches.
    """
    uri = "file:" + quote(os.path.abspath(path), safe="/") + "?mode=ro"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=5.0)

    engine = sa.create_engine(
        "sqlite://",
        creator=connect,
        poolclass=sa.pool.QueuePool,
        pool_size=size,
        max_overflow=0,
    )
    sa.event.listen(engine, "connect", _sqlite_reader_pragmas)
    return engine


def server_engine(
    url: str,
    pool_size: int = 10,
    max_lifetime: float = 3600.0,
    connect_timeout: int = 5,
    pre_ping: bool = False,
    max_idle: int | None = None,
) -> Engine:
    """
    An engine for PostgreSQL or MySQL with at most C{pool_size}
    connections, of which C{max_idle} (default: all) stay open when idle.
    Connections are not pinged before
    each use (a round trip per query on the hot path); instead a query that
    finds its connection dead is retried once on a fresh one (L{SQLStore}),
    and SQLAlchemy then recycles every connection older than the failure.
    """
    kept = pool_size if max_idle is None else max(1, min(max_idle, pool_size))
    return sa.create_engine(
        url,
        pool_size=kept,
        max_overflow=pool_size - kept,
        pool_pre_ping=pre_ping,
        pool_recycle=max_lifetime if max_lifetime > 0 else -1,
        pool_timeout=30,
        connect_args={"connect_timeout": connect_timeout},
    )


def engine_from_config(config: Any) -> Engine:
    """The engine C{DB_DRIVER}, C{DATABASE_PATH} and C{DATABASE_URL} ask for."""
    if config.db_driver not in ("postgres", "mysql"):
        return sqlite_engine(config.database_path)
    to_url = postgres_url if config.db_driver == "postgres" else mysql_url
    return server_engine(
        to_url(config.database_url),
        config.database_pool_size,
        config.database_conn_max_lifetime,
        max_idle=config.database_max_idle_conns,
    )


def cipher_from_config(config: Any) -> KeyCipher | None:
    """The provider key cipher, or None without C{ENCRYPTION_KEY}."""
    return KeyCipher(config.encryption_key) if config.encryption_key else None


# -- migrations ----------------------------------------------------------------
# Alembic (and the SQLAlchemy dialects it loads for every database it
# supports) is imported only when a migration runs or is looked up: a
# daemon whose schema is already current never loads it.


def _alembic_config(conn: Connection) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", MIGRATIONS_DIR)
    cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str | None:
    """The newest migration bundled with this version of llmproxy."""
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", MIGRATIONS_DIR)
    return ScriptDirectory.from_config(cfg).get_current_head()


def _literal(node: ast.expr) -> set[str] | None:
    """The revision ids of a C{revision}/C{down_revision} value (None: not literal)."""
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return None
    if value is None:
        return set()
    if isinstance(value, str):
        return {value}
    if isinstance(value, tuple | list) and all(isinstance(v, str) for v in value):
        return set(value)
    return None


@functools.cache
def bundled_head() -> str | None:
    """
    The newest migration bundled with this version of llmproxy, found
    without importing Alembic; None when only Alembic can tell (also when
    the scripts cannot be read or parsed: Alembic then reports why).
    """
    try:
        return scan_head(os.path.join(MIGRATIONS_DIR, "versions"))
    except (OSError, SyntaxError, ValueError):
        return None


def scan_head(versions: str) -> str | None:
    """
    The head revision of the migration scripts in C{versions}, read from
    their C{revision} and C{down_revision} assignments; None unless there
    is exactly one head and every script is plain (literal ids, no branch
    labels, no dependencies).
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for name in sorted(os.listdir(versions)):
        if not name.endswith(".py") or name.startswith("_"):
            continue
        with open(os.path.join(versions, name), encoding="utf-8") as f:
            tree = ast.parse(f.read(), name)
        found: dict[str, set[str] | None] = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                target, value = node.target, node.value
            else:
                continue
            if isinstance(target, ast.Name):
                found[target.id] = _literal(value)
        revision, down = found.get("revision"), found.get("down_revision")
        if revision is None or down is None or len(revision) != 1:
            return None
        if any(found.get(name, set()) != set() for name in ("branch_labels", "depends_on")):
            return None  # branches and dependencies: Alembic's rules, not ours
        revisions |= revision
        parents |= down
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _at_bundled_head(conn: Connection) -> bool:
    """
    Whether the database is already at L{bundled_head}: the same question
    Alembic asks (its C{alembic_version} table) in one plain query.
    """
    head = bundled_head()
    if head is None or not sa.inspect(conn).has_table("alembic_version"):
        return False
    rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    return rows == [head]


@contextmanager
def migration_lock(engine: Engine) -> Iterator[Connection]:
    """
    A connection holding the cross-process migration lock: an advisory
    lock on PostgreSQL, C{GET_LOCK} on MySQL, a lock file beside the SQLite
    database, so two instances starting together never both migrate.
    """
    dialect = engine.dialect.name
    lock_file = None
    if dialect == "sqlite":
        database = engine.url.database
        if database and database != ":memory:":
            lock_file = open(database + ".lock", "a+")
            fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
        with engine.connect() as conn:
            if dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_lock(:id)"), {"id": _PG_LOCK_ID})
            elif dialect in ("mysql", "mariadb"):
                got = conn.execute(
                    sa.text("SELECT GET_LOCK(:name, 60)"), {"name": _MYSQL_LOCK_NAME}
                ).scalar()
                if got != 1:
                    raise RuntimeError("timed out waiting for the migration lock")
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                if dialect == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:id)"), {"id": _PG_LOCK_ID})
                elif dialect in ("mysql", "mariadb"):
                    conn.execute(sa.text("SELECT RELEASE_LOCK(:name)"), {"name": _MYSQL_LOCK_NAME})
                conn.commit()
    finally:
        if lock_file is not None:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
            lock_file.close()


def migrate(engine: Engine, revision: str = "head", down: bool = False) -> None:
    """
    Upgrade (or downgrade) the schema to C{revision}, under the migration
    lock. Upgrading a database already at the newest revision does not
    involve Alembic at all.
    """
    with migration_lock(engine) as conn:
        if revision == "head" and not down:
            if _at_bundled_head(conn):
                return
            conn.rollback()  # Alembic starts from a connection outside any transaction
        from alembic import command

        cfg = _alembic_config(conn)
        if down:
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, revision)
        conn.commit()


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None: empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_encryption_key(conn: Connection, cipher: KeyCipher | None) -> None:
    """
    Refuse to run with a key other than the one the data was written with,
    or without a key when provider keys are stored encrypted; both would
    otherwise only show at request time as garbage upstream keys.

    @raise ConfigError: naming C{ENCRYPTION_KEY}.
    """
    meta = schema.meta.c
    check = conn.execute(
        sa.select(meta.value).where(meta.key == schema.KEY_CHECK)
    ).scalar_one_or_none()
    sample = conn.execute(
        sa.select(_P.api_key).where(_P.api_key.like("enc:v1:%")).limit(1)
    ).scalar_one_or_none()
    if cipher is None:
        if check is not None or sample is not None:
            raise ConfigError(
                "ENCRYPTION_KEY: not set, but the database holds provider keys "
                "encrypted with a key; set the same ENCRYPTION_KEY again"
            )
        return
    for value in (check, sample):
        if value is None:
            continue
        try:
            cipher.decrypt(value)
        except DecryptionError:
            raise ConfigError(
                "ENCRYPTION_KEY: does not match the key this database was encrypted with"
            )
    if check is None:
        try:
            conn.execute(
                schema.meta.insert().values(
                    key=schema.KEY_CHECK, value=cipher.encrypt(_KEY_CHECK_PLAINTEXT)
                )
            )
        except IntegrityError:
            conn.rollback()
            check_encryption_key(conn, cipher)


# -- the store -----------------------------------------------------------------


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    thread = threading.Thread(*args, **kwargs)
    thread.daemon = True
    return thread


class DBThreadPool(ThreadPool):
    """
    The store's thread pool. Its threads are daemon threads: when startup
    fails after the store opened (another component refuses to start), the
    process must still exit; a normal stop joins them as usual.
    """

    threadFactory = staticmethod(_daemon_thread)  # type: ignore[assignment]


def _project_from_row(row: Any, cipher: KeyCipher | None) -> Project:
    api_key = row.api_key
    if cipher is not None:
        api_key = cipher.decrypt(api_key)
    return Project(
        id=row.id,
        name=row.name,
        api_key=api_key,
        is_active=bool(row.is_active),
        created_at=row.created_at,
        updated_at=row.updated_at,
        deactivated_at=row.deactivated_at,
    )


def _token_from_row(row: Any) -> Token:
    return Token(
        id=row.id,
        token_hash=row.token_hash,
        display=row.display,
        project_id=row.project_id,
        is_active=bool(row.is_active),
        created_at=row.created_at,
        expires_at=row.expires_at,
        deactivated_at=row.deactivated_at,
        request_count=int(row.request_count),
        max_requests=None if row.max_requests is None else int(row.max_requests),
        last_used_at=row.last_used_at,
        cache_hit_count=int(row.cache_hit_count),
    )


def _audit_from_row(row: Any) -> AuditEvent:
    m = row._mapping
    details = json.loads(m["metadata"]) if m["metadata"] else {}
    return AuditEvent(
        id=m["id"],
        timestamp=m["timestamp"],
        action=m["action"],
        actor=m["actor"],
        outcome=m["outcome"],
        project_id=m["project_id"],
        request_id=m["request_id"],
        correlation_id=m["correlation_id"],
        client_ip=m["client_ip"],
        method=m["method"],
        path=m["path"],
        user_agent=m["user_agent"],
        reason=m["reason"],
        token_id=m["token_id"],
        details=details if isinstance(details, dict) else {"value": details},
    )


#: Length limits of the audit columns: values such as a client's
#: X-Request-ID are cut to fit rather than failing the whole batch.
_AUDIT_LIMITS = {
    c.name: c.type.length
    for c in schema.audit_events.columns
    if isinstance(c.type, sa.String) and c.type.length
}


def _fit(row: dict[str, Any]) -> dict[str, Any]:
    for name, limit in _AUDIT_LIMITS.items():
        value = row.get(name)
        if isinstance(value, str) and len(value) > limit:
            row[name] = value[:limit]
    return row


def _audit_row(e: AuditEvent) -> dict[str, Any]:
    return _fit(
        {
            "id": e.id,
            "timestamp": e.timestamp,
            "action": e.action,
            "actor": e.actor,
            "outcome": e.outcome,
            "project_id": e.project_id,
            "request_id": e.request_id,
            "correlation_id": e.correlation_id,
            "client_ip": e.client_ip,
            "method": e.method,
            "path": e.path,
            "user_agent": e.user_agent,
            "reason": e.reason,
            "token_id": e.token_id,
            "metadata": json.dumps(e.details, sort_keys=True, ensure_ascii=False, default=str)
            if e.details
            else None,
        }
    )


def _audit_where(query: AuditQuery) -> list[Any]:
    where: list[Any] = []
    for name in AUDIT_EQUALITY_FILTERS:
        value = getattr(query, name)
        if value is not None:
            where.append(_A[name] == value)
    if query.start_time is not None:
        where.append(_A.timestamp >= query.start_time)
    if query.end_time is not None:
        where.append(_A.timestamp <= query.end_time)
    if query.search:
        needle = query.search.lower()
        where.append(
            sa.or_(
                *(
                    sa.func.lower(_A[name]).contains(needle, autoescape=True)
                    for name in _AUDIT_SEARCH
                )
            )
        )
    return where


def _usable_now(now: datetime.datetime) -> list[Any]:
    """The WHERE clause of a token that may be counted at C{now}."""
    return [
        _T.is_active == sa.true(),
        sa.or_(_T.expires_at.is_(None), _T.expires_at > now),
        sa.or_(
            _T.max_requests.is_(None),
            _T.max_requests <= 0,
            _T.request_count < _T.max_requests,
        ),
    ]


@implementer(IStore)
class SQLStore:
    """
    The store on a SQL database.

    @param engine: a SQLAlchemy engine (see L{engine_from_config}).
    @param reactor: delivers results back to the reactor thread.
    @param cipher: encrypts provider keys at rest; None stores them as given.
    @param threads: size of the store's own thread pool (1 for SQLite).
    @param read_threads: for a SQLite file, the number of extra read-only
        connections (and threads) serving lookups and listings; 0 sends
        reads to the writer too.
    """

    def __init__(
        self,
        engine: Engine,
        reactor: Any,
        cipher: KeyCipher | None = None,
        threads: int | None = None,
        read_threads: int = 4,
    ) -> None:
        self.engine = engine
        self.reactor = reactor
        self.cipher = cipher
        self.dialect = engine.dialect.name
        if threads is None:
            pool: Any = engine.pool
            threads = 1 if self.dialect == "sqlite" else max(1, pool.size() + pool._max_overflow)
        self.pool = DBThreadPool(
            minthreads=0, maxthreads=threads, name=f"llmproxy-db-{self.dialect}"
        )
        self.read_engine: Engine | None = None
        self.read_pool: DBThreadPool | None = None
        database = engine.url.database
        if self.dialect == "sqlite" and read_threads > 0 and database and database != ":memory:":
            self.read_engine = sqlite_read_engine(database, read_threads)
            self.read_pool = DBThreadPool(
                minthreads=0, maxthreads=read_threads, name="llmproxy-db-sqlite-read"
            )
        self._closed = False

    # -- plumbing ------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread pool (idempotent)."""
        if not self.pool.started:
            self.pool.start()
        if self.read_pool is not None and not self.read_pool.started:
            self.read_pool.start()

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run C{fn(conn, *args)} in one transaction; retry once on a dead connection."""
        return self._call_on(self.engine, fn, *args)

    def _call_on(self, engine: Engine, fn: Callable[..., T], *args: Any) -> T:
        for attempt in (1, 2):
            try:
                with engine.begin() as conn:
                    return fn(conn, *args)
            except DBAPIError as e:
                if attempt == 1 and e.connection_invalidated:
                    log.warn("database connection was lost; retrying on a new connection")
                    continue
                raise
        raise AssertionError("unreachable")

    def _run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._closed:
            return defer.fail(RuntimeError("the store is closed"))
        self.start()
        return deferToThreadPool(self.reactor, self.pool, self._call, fn, *args)

    def _read(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Like L{_run} for statements that only read."""
        if self.read_engine is None or self.read_pool is None:
            return self._run(fn, *args)
        if self._closed:
            return defer.fail(RuntimeError("the store is closed"))
        self.start()
        return deferToThreadPool(
            self.reactor, self.read_pool, self._call_on, self.read_engine, fn, *args
        )

    def run_blocking(self, fn: Callable[[], T]) -> T:
        """
        Run C{fn()} on the store's thread pool and wait for it; only for
        startup and command-line use, before or outside the reactor.
        """
        self.start()
        done = threading.Event()
        result: list[Any] = []

        def finished(ok: bool, value: Any) -> None:
            result.append((ok, value))
            done.set()

        self.pool.callInThreadWithCallback(finished, fn)
        done.wait()
        ok, value = result[0]
        if not ok:
            value.raiseException()
        return value  # type: ignore[no-any-return]

    def prepare(self) -> None:
        """Migrate to the newest schema and check ENCRYPTION_KEY (blocking)."""
        migrate(self.engine)
        with migration_lock(self.engine) as conn:
            check_encryption_key(conn, self.cipher)
            conn.commit()
        if self.cipher is None:
            log.warn(
                "ENCRYPTION_KEY is not set: provider API keys are stored in plaintext "
                "in the database"
            )

    def open(self) -> Deferred[None]:
        """Start the pool, migrate and check the key, without blocking the reactor."""
        self.start()
        return deferToThreadPool(self.reactor, self.pool, self.prepare)

    def close_blocking(self) -> None:
        """Dispose of connections and stop the pool's threads."""
        if self._closed:
            return
        self._closed = True
        self._stop_readers()
        self.engine.dispose()
        if self.pool.started:
            self.pool.stop()

    def _stop_readers(self) -> None:
        if self.read_engine is not None:
            self.read_engine.dispose()
        if self.read_pool is not None and self.read_pool.started:
            self.read_pool.stop()

    def _encrypt(self, api_key: str) -> str:
        return self.cipher.encrypt(api_key) if self.cipher is not None else api_key

    # -- projects --------------------------------------------------------------------
    def _project_values(self, project: Project) -> dict[str, Any]:
        """The columns an insert and an update both write (the key encrypted)."""
        return {
            "name": project.name,
            "api_key": self._encrypt(project.api_key),
            "is_active": project.is_active,
            "deactivated_at": project.deactivated_at,
            "updated_at": project.updated_at,
        }

    def create_project(self, project: Project) -> Deferred[Project]:
        def insert(conn: Connection) -> Project:
            try:
                with conn.begin_nested():
                    conn.execute(
                        schema.projects.insert().values(
                            id=project.id,
                            created_at=project.created_at,
                            **self._project_values(project),
                        )
                    )
            except IntegrityError:
                raise DuplicateName(project.name)
            return project

        return self._run(insert)

    def _get_project(self, conn: Connection, project_id: str) -> Project | None:
        row = conn.execute(sa.select(schema.projects).where(_P.id == project_id)).first()
        return None if row is None else _project_from_row(row, self.cipher)

    def get_project(self, project_id: str) -> Deferred[Project | None]:
        return self._read(self._get_project, project_id)

    def list_projects(self) -> Deferred[list[Project]]:
        def select(conn: Connection) -> list[Project]:
            rows = conn.execute(sa.select(schema.projects).order_by(_P.name, _P.id))
            return [_project_from_row(r, self.cipher) for r in rows]

        return self._read(select)

    def update_project(self, project: Project) -> Deferred[Project]:
        def update(conn: Connection) -> Project:
            try:
                with conn.begin_nested():
                    result = conn.execute(
                        schema.projects.update()
                        .where(_P.id == project.id)
                        .values(**self._project_values(project))
                    )
            except IntegrityError:
                raise DuplicateName(project.name)
            if result.rowcount == 0:
                raise NotFound(project.id)
            new = self._get_project(conn, project.id)
            if new is None:
                raise NotFound(project.id)
            return new

        return self._run(update)

    # -- tokens --------------------------------------------------------------------------
    def create_token(self, token: Token) -> Deferred[Token]:
        def insert(conn: Connection) -> Token:
            exists = conn.execute(
                sa.select(_P.id).where(_P.id == token.project_id)
            ).scalar_one_or_none()
            if exists is None:
                raise NotFound(token.project_id)
            conn.execute(
                schema.tokens.insert().values(
                    id=token.id,
                    token_hash=token.token_hash,
                    display=token.display,
                    project_id=token.project_id,
                    expires_at=token.expires_at,
                    is_active=token.is_active,
                    deactivated_at=token.deactivated_at,
                    request_count=token.request_count,
                    max_requests=token.max_requests,
                    created_at=token.created_at,
                    last_used_at=token.last_used_at,
                    cache_hit_count=token.cache_hit_count,
                )
            )
            return token

        return self._run(insert)

    @staticmethod
    def _get_token_where(conn: Connection, where: Any) -> Token | None:
        row = conn.execute(sa.select(schema.tokens).where(where)).first()
        return None if row is None else _token_from_row(row)

    def get_token(self, token_id: str) -> Deferred[Token | None]:
        return self._read(self._get_token_where, _T.id == token_id)

    def get_token_by_hash(self, token_hash: str) -> Deferred[Token | None]:
        return self._read(self._get_token_where, _T.token_hash == token_hash)

    def list_tokens(
        self,
        project_id: str | None = None,
        active_only: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> Deferred[list[Token]]:
        stmt = sa.select(schema.tokens).order_by(_T.created_at.desc(), _T.id.desc())
        if project_id is not None:
            stmt = stmt.where(_T.project_id == project_id)
        if active_only:
            stmt = stmt.where(_T.is_active == sa.true())
        if limit is not None:
            stmt = stmt.limit(limit)
        if offset:
            stmt = stmt.offset(offset)

        def select(conn: Connection) -> list[Token]:
            return [_token_from_row(r) for r in conn.execute(stmt)]

        return self._read(select)

    def update_token(self, token: Token) -> Deferred[Token]:
        def update(conn: Connection) -> Token:
            result = conn.execute(
                schema.tokens.update()
                .where(_T.id == token.id)
                .values(
                    is_active=token.is_active,
                    deactivated_at=token.deactivated_at,
                    max_requests=token.max_requests,
                    expires_at=token.expires_at,
                )
            )
            if result.rowcount == 0:
                raise NotFound(token.id)
            new = self._get_token_where(conn, _T.id == token.id)
            if new is None:
                raise NotFound(token.id)
            return new

        return self._run(update)

    def deactivate_project_tokens(self, project_id: str, now: datetime.datetime) -> Deferred[int]:
        def update(conn: Connection) -> int:
            result = conn.execute(
                schema.tokens.update()
                .where(_T.project_id == project_id, _T.is_active == sa.true())
                .values(is_active=False, deactivated_at=now)
            )
            return int(result.rowcount)

        return self._run(update)

    def count_request(self, token_hash: str, now: datetime.datetime) -> Deferred[UsageOutcome]:
        stmt = (
            schema.tokens.update()
            .where(_T.token_hash == token_hash, *_usable_now(now))
            .values(request_count=_T.request_count + 1, last_used_at=now)
        )

        def count(conn: Connection) -> UsageOutcome:
            # One conditional UPDATE is the whole admission decision, so
            # concurrent callers (threads or processes) never exceed the quota.
            # The SELECT afterwards only explains a refusal.
            for _ in range(3):
                if conn.execute(stmt).rowcount == 1:
                    return UsageOutcome.OK
                outcome = classify_token(
                    self._get_token_where(conn, _T.token_hash == token_hash), now
                )
                if outcome is not UsageOutcome.OK:
                    return outcome
            return UsageOutcome.QUOTA_EXCEEDED

        return self._run(count)

    def add_usage(self, counts: Mapping[str, tuple[int, datetime.datetime]]) -> Deferred[None]:
        rows = [{"h": h, "n": n, "t": t} for h, (n, t) in counts.items()]

        def update(conn: Connection) -> None:
            if rows:
                conn.execute(
                    schema.tokens.update()
                    .where(_T.token_hash == sa.bindparam("h"))
                    .values(
                        request_count=_T.request_count + sa.bindparam("n"),
                        last_used_at=sa.bindparam("t", type_=schema.UTCDateTime),
                    ),
                    rows,
                )

        return self._run(update)

    def add_cache_hits(self, counts: Mapping[str, int]) -> Deferred[None]:
        rows = [{"h": h, "n": n} for h, n in counts.items()]

        def update(conn: Connection) -> None:
            if rows:
                conn.execute(
                    schema.tokens.update()
                    .where(_T.token_hash == sa.bindparam("h"))
                    .values(cache_hit_count=_T.cache_hit_count + sa.bindparam("n")),
                    rows,
                )

        return self._run(update)

    # -- audit -------------------------------------------------------------------------
    def insert_audit_events(self, events: Sequence[AuditEvent]) -> Deferred[None]:
        rows = [_audit_row(e) for e in events]

        def insert(conn: Connection) -> None:
            if rows:
                conn.execute(schema.audit_events.insert(), rows)

        return self._run(insert)

    def list_audit_events(
        self, query: AuditQuery, limit: int, offset: int
    ) -> Deferred[tuple[list[AuditEvent], int]]:
        where = _audit_where(query)

        def select(conn: Connection) -> tuple[list[AuditEvent], int]:
            total = conn.execute(
                sa.select(sa.func.count()).select_from(schema.audit_events).where(*where)
            ).scalar_one()
            rows = conn.execute(
                sa.select(schema.audit_events)
                .where(*where)
                .order_by(_A.timestamp.desc(), _A.id.desc())
                .limit(limit)
                .offset(offset)
            )
            return [_audit_from_row(r) for r in rows], int(total)

        return self._read(select)

    def get_audit_event(self, event_id: str) -> Deferred[AuditEvent | None]:
        def select(conn: Connection) -> AuditEvent | None:
            row = conn.execute(sa.select(schema.audit_events).where(_A.id == event_id)).first()
            return None if row is None else _audit_from_row(row)

        return self._read(select)

    # -- maintenance -----------------------------------------------------------------------
    def encrypt_existing_keys(self) -> int:
        """Encrypt every plaintext provider key (blocking; for C{llmproxy migrate encrypt})."""
        cipher = self.cipher
        if cipher is None:
            raise ConfigError("ENCRYPTION_KEY: required to encrypt provider keys")

        def encrypt(conn: Connection) -> int:
            rows = conn.execute(sa.select(_P.id, _P.api_key)).all()
            count = 0
            for row in rows:
                if row.api_key and not is_encrypted(row.api_key):
                    conn.execute(
                        schema.projects.update()
                        .where(_P.id == row.id)
                        .values(api_key=cipher.encrypt(row.api_key))
                    )
                    count += 1
            return count

        return self._call(encrypt)

    # -- lifecycle ---------------------------------------------------------------------------
    def ping(self) -> Deferred[None]:
        def select(conn: Connection) -> None:
            conn.execute(sa.text("SELECT 1"))

        return self._run(select)

    def close(self) -> Deferred[None]:
        if self._closed or not self.pool.started:
            self.close_blocking()
            return defer.succeed(None)
        self._closed = True
        self._stop_readers()
        d = deferToThreadPool(self.reactor, self.pool, self.engine.dispose)

        def stop(result: Any) -> Any:
            self._closed = True
            if self.pool.started:
                self.pool.stop()
            return result

        d.addBoth(stop)
        return d


def make_store(config: Any, reactor: Any) -> SQLStore:
    """The store C{config} describes (not opened yet: see L{StoreService})."""
    threads = 1 if config.db_driver == "sqlite" else config.database_pool_size
    return SQLStore(
        engine_from_config(config), reactor, cipher=cipher_from_config(config), threads=threads
    )
