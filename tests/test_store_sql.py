"""
What only the SQL store does: encryption at rest, the ENCRYPTION_KEY
check, migrations, dead connections, cross-instance quotas, and the
service that opens and closes it.
"""

from __future__ import annotations

import io
import threading
import uuid
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from twisted.internet import defer, reactor
from twisted.logger import FilteringLogObserver, PredicateResult, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmproxy.config import Config, ConfigError
from llmproxy.crypto import KeyCipher
from llmproxy.store import schema
from llmproxy.store.records import UsageOutcome
from llmproxy.store.service import StoreService
from llmproxy.store.sql import (
    SQLStore,
    current_revision,
    head_revision,
    make_store,
    migrate,
    mysql_url,
    postgres_url,
)
from tests.services import MYSQL_DSN, POSTGRES_DSN
from tests.test_store import T0, project, token
from tests.test_store_support import (
    KEY,
    OTHER_KEY,
    make_engine,
    new_location,
    open_store,
    sqlite_url_for,
)

TABLES = {"projects", "tokens", "audit_events", "llmproxy_meta"}


def table_names(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


class EncryptionTestsMixin:
    kind: str

    async def test_provider_key_encrypted_at_rest(self) -> None:
        location = new_location(self, self.kind)
        store = await open_store(self, self.kind, location, key=KEY)
        p = await store.create_project(project(api_key="sk-very-secret-provider-key"))
        await store.update_project(p)  # re-encrypts, never double-encrypts
        with store.engine.connect() as conn:
            raw = conn.execute(sa.select(schema.projects.c.api_key)).scalar_one()
        self.assertTrue(raw.startswith("enc:v1:"))
        self.assertNotIn("secret", raw)
        self.assertEqual(KeyCipher(KEY).decrypt(raw), "sk-very-secret-provider-key")
        got = await store.get_project(p.id)
        self.assertEqual(got.api_key, "sk-very-secret-provider-key")

    async def test_tokens_never_stored_in_plaintext(self) -> None:
        location = new_location(self, self.kind)
        store = await open_store(self, self.kind, location)
        p = await store.create_project(project())
        t = await store.create_token(token(p.id))
        with store.engine.connect() as conn:
            row = conn.execute(sa.select(schema.tokens)).one()._mapping
        self.assertEqual(row["token_hash"], t.token_hash)
        self.assertIn("****", row["display"])
        self.assertNotIn("token", row.keys())

    async def test_wrong_key_is_a_startup_error(self) -> None:
        location = new_location(self, self.kind)
        store = await open_store(self, self.kind, location, key=KEY)
        await store.create_project(project())
        await store.close()
        for key in (OTHER_KEY, None):
            other = SQLStore(
                make_engine(self.kind, location), reactor, KeyCipher(key) if key else None
            )
            self.addCleanup(other.close)
            with self.assertRaises(ConfigError) as e:
                await other.open()
            self.assertIn("ENCRYPTION_KEY", str(e.exception))
        again = await open_store(self, self.kind, location, key=KEY)
        self.assertEqual(len(await again.list_projects()), 1)

    async def test_encrypted_rows_without_key_check(self) -> None:
        """Rows encrypted elsewhere (the Go llm-proxy) are checked against the key too."""
        location = new_location(self, self.kind)
        engine = make_engine(self.kind, location)
        self.addCleanup(engine.dispose)
        migrate(engine)
        with engine.begin() as conn:
            conn.execute(
                schema.projects.insert().values(
                    id=str(uuid.uuid4()),
                    name="go",
                    api_key=KeyCipher(OTHER_KEY).encrypt("sk-go"),
                    is_active=True,
                    created_at=T0,
                    updated_at=T0,
                )
            )
        store = SQLStore(make_engine(self.kind, location), reactor, KeyCipher(KEY))
        self.addCleanup(store.close)
        with self.assertRaises(ConfigError):
            await store.open()

    async def test_migrate_down_and_up(self) -> None:
        location = new_location(self, self.kind)
        store = await open_store(self, self.kind, location)
        self.assertEqual(current_revision(store.engine), head_revision())
        self.assertTrue(TABLES <= table_names(store.engine))
        await store.create_project(project())
        await store.close()
        engine = make_engine(self.kind, location)
        self.addCleanup(engine.dispose)
        migrate(engine, "base", down=True)
        self.assertEqual(table_names(engine) & TABLES, set())
        self.assertIsNone(current_revision(engine))
        migrate(engine)
        self.assertEqual(current_revision(engine), head_revision())
        again = await open_store(self, self.kind, location)
        self.assertEqual(await again.list_projects(), [])
        await again.create_project(project())

    async def test_migrations_match_schema(self) -> None:
        location = new_location(self, self.kind)
        store = await open_store(self, self.kind, location)
        with store.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": False})
            diff = [
                d for d in compare_metadata(ctx, schema.metadata) if "alembic_version" not in str(d)
            ]
        self.assertEqual(diff, [])

    async def test_encrypt_existing_keys(self) -> None:
        location = new_location(self, self.kind)
        plain = await open_store(self, self.kind, location)
        await plain.create_project(project("a", api_key="sk-a"))
        await plain.create_project(project("b", api_key=""))
        await plain.close()
        store = SQLStore(make_engine(self.kind, location), reactor, KeyCipher(KEY))
        self.addCleanup(store.close)
        self.assertEqual(store.run_blocking(store.encrypt_existing_keys), 1)
        self.assertEqual(store.run_blocking(store.encrypt_existing_keys), 0)
        await store.open()
        keys = {p.name: p.api_key for p in await store.list_projects()}
        self.assertEqual(keys, {"a": "sk-a", "b": ""})


class SQLiteEncryptionTests(EncryptionTestsMixin, TestCase):
    kind = "sqlite"


class PostgresEncryptionTests(EncryptionTestsMixin, TestCase):
    kind = "postgres"


class MySQLEncryptionTests(EncryptionTestsMixin, TestCase):
    kind = "mysql"


class PostgresConnectionTests(TestCase):
    async def test_terminated_connection_does_not_fail_next_call(self) -> None:
        location = new_location(self, "postgres")
        app = "llmproxy_test_" + uuid.uuid4().hex[:8]
        location += f"&application_name={app}"
        store = await open_store(self, "postgres", location, pool_size=2)
        p = await store.create_project(project())
        await defer.gatherResults([store.ping(), store.ping()])
        admin = sa.create_engine(postgres_url(POSTGRES_DSN), poolclass=sa.pool.NullPool)
        self.addCleanup(admin.dispose)
        with admin.begin() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = :app"
                ),
                {"app": app},
            ).scalar_one()
        self.assertGreaterEqual(killed, 1)
        retried: list[dict[str, Any]] = []
        observer = FilteringLogObserver(
            retried.append,
            [
                lambda e: (
                    PredicateResult.yes
                    if e.get("log_namespace") == "llmproxy.store.sql"
                    else PredicateResult.no
                )
            ],
        )
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        results = await defer.gatherResults([store.get_project(p.id), store.list_projects()])
        self.assertEqual(results[0].name, p.name)
        self.assertEqual([x.id for x in results[1]], [p.id])
        self.assertIn("connection was lost", " ".join(e["log_format"] for e in retried))
        t = await store.create_token(token(p.id))
        self.assertEqual(await store.count_request(t.token_hash, T0), UsageOutcome.OK)

    async def test_quota_atomic_across_instances(self) -> None:
        """Two daemons sharing one database still admit exactly max_requests."""
        location = new_location(self, "postgres")
        one = await open_store(self, "postgres", location)
        two = await open_store(self, "postgres", location)
        p = await one.create_project(project())
        t = await one.create_token(token(p.id, max_requests=10))
        results = await defer.gatherResults(
            [s.count_request(t.token_hash, T0) for _ in range(25) for s in (one, two)]
        )
        self.assertEqual(results.count(UsageOutcome.OK), 10)
        self.assertEqual((await two.get_token(t.id)).request_count, 10)

    def test_concurrent_migrations(self) -> None:
        """Two instances starting at once: one migrates, the other waits, both succeed."""
        location = new_location(self, "postgres")
        engines = [make_engine("postgres", location) for _ in range(2)]
        errors: list[BaseException] = []

        def run(engine: sa.Engine) -> None:
            try:
                migrate(engine)
            except BaseException as e:
                errors.append(e)
            finally:
                engine.dispose()

        threads = [threading.Thread(target=run, args=(e,)) for e in engines]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        self.assertEqual(errors, [])
        engine = make_engine("postgres", location)
        self.addCleanup(engine.dispose)
        self.assertEqual(current_revision(engine), head_revision())


class StoreServiceTests(TestCase):
    def config(self, **env: str) -> Config:
        base = {"MANAGEMENT_TOKEN": "m", "DATABASE_PATH": sqlite_url_for(self)}
        base.update(env)
        return Config.from_env(base)

    async def test_start_migrates_and_stop_releases_threads(self) -> None:
        store = make_store(self.config(), reactor)
        svc = StoreService(store, exit_on_error=False)
        svc.startService()
        self.assertTrue(svc.running)
        self.assertTrue(TABLES <= table_names(store.engine))
        p = await store.create_project(project())
        self.assertEqual((await store.get_project(p.id)).name, p.name)
        await svc.stopService()
        self.assertFalse(store.pool.started)
        self.assertEqual([t for t in store.pool.threads if t.is_alive()], [])

    async def test_wrong_key_stops_startup(self) -> None:
        config = self.config(ENCRYPTION_KEY=KEY)
        svc = StoreService(make_store(config, reactor), exit_on_error=False)
        svc.startService()
        await svc.stopService()
        bad = make_store(
            self.config(ENCRYPTION_KEY=OTHER_KEY, DATABASE_PATH=config.database_path), reactor
        )
        svc = StoreService(bad, exit_on_error=False)
        self.assertRaises(ConfigError, svc.startService)
        self.assertFalse(svc.running)
        self.assertEqual([t for t in bad.pool.threads if t.is_alive()], [])
        err = io.StringIO()
        exiting = StoreService(
            make_store(
                self.config(ENCRYPTION_KEY=OTHER_KEY, DATABASE_PATH=config.database_path), reactor
            ),
            stderr=err,
        )
        self.assertRaises(SystemExit, exiting.startService)
        self.assertEqual(
            err.getvalue(),
            "llmproxy: configuration error: ENCRYPTION_KEY: does not match the key "
            "this database was encrypted with\n",
        )


class ConfigToEngineTests(SynchronousTestCase):
    def store(self, **env: str) -> SQLStore:
        s = make_store(Config.from_env({"MANAGEMENT_TOKEN": "m", **env}), reactor)
        self.addCleanup(s.close_blocking)
        return s

    def test_drivers(self) -> None:
        self.assertEqual(self.store(DATABASE_PATH=sqlite_url_for(self)).dialect, "sqlite")
        pg = self.store(DB_DRIVER="postgres", DATABASE_URL="postgres://u:p@db:5433/x")
        self.assertEqual(
            (pg.dialect, pg.engine.url.drivername), ("postgresql", "postgresql+psycopg")
        )
        self.assertEqual((pg.engine.url.host, pg.engine.url.port), ("db", 5433))
        my = self.store(DB_DRIVER="mysql", DATABASE_URL="mysql://u@db/x")
        self.assertEqual(my.engine.url.drivername, "mysql+pymysql")

    def test_pool_settings(self) -> None:
        s = self.store(
            DB_DRIVER="postgres",
            DATABASE_URL="postgres://u@db/x",
            DATABASE_POOL_SIZE="7",
            DATABASE_MAX_IDLE_CONNS="3",
            DATABASE_CONN_MAX_LIFETIME="10m",
        )
        pool: Any = s.engine.pool
        self.assertEqual((pool.size(), pool._max_overflow, pool._recycle), (3, 4, 600.0))
        self.assertEqual(s.pool.max, 7)
        sqlite = self.store(DATABASE_PATH=sqlite_url_for(self), DATABASE_POOL_SIZE="7")
        self.assertEqual(sqlite.pool.max, 1)

    def test_sqlite_directory_created(self) -> None:
        import os

        path = sqlite_url_for(self)
        self.store(DATABASE_PATH=path)
        self.assertTrue(os.path.isdir(os.path.dirname(path)))

    def test_go_mysql_dsn(self) -> None:
        url = sa.engine.make_url(mysql_url("app:s%cr@tcp(db.example:3307)/llm?parseTime=true"))
        self.assertEqual(
            (url.drivername, url.username, url.password, url.host, url.port, url.database),
            ("mysql+pymysql", "app", "s%cr", "db.example", 3307, "llm"),
        )

    def test_bad_urls(self) -> None:
        for driver, url in [("postgres", "mysql://x/y"), ("mysql", "nonsense")]:
            e = self.assertRaises(
                ConfigError,
                make_store,
                Config.from_env(
                    {"MANAGEMENT_TOKEN": "m", "DB_DRIVER": driver, "DATABASE_URL": url}
                ),
                reactor,
            )
            self.assertIn("DATABASE_URL", str(e))

    def test_bad_key(self) -> None:
        e = self.assertRaises(
            ConfigError,
            make_store,
            Config.from_env(
                {
                    "MANAGEMENT_TOKEN": "m",
                    "ENCRYPTION_KEY": "short",
                    "DATABASE_PATH": sqlite_url_for(self),
                }
            ),
            reactor,
        )
        self.assertIn("ENCRYPTION_KEY", str(e))


class AbortedStartupTests(SynchronousTestCase):
    def test_process_exits_when_startup_fails_after_the_store_opened(self) -> None:
        """A later component refusing to start must not leave the process hanging."""
        import subprocess
        import sys

        script = (
            "import sys\n"
            "from twisted.internet import reactor\n"
            "from llmproxy.store.sql import SQLStore, sqlite_engine\n"
            "s = SQLStore(sqlite_engine(sys.argv[1]), reactor)\n"
            "s.run_blocking(s.prepare)\n"
            "raise SystemExit(3)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, sqlite_url_for(self)], timeout=60, capture_output=True
        )
        self.assertEqual(done.returncode, 3)


class SQLiteReadersTests(TestCase):
    async def test_odd_path_and_reads_during_writes(self) -> None:
        """Reads use their own read-only connections and see every committed write."""
        import os

        base = os.path.abspath(self.mktemp())
        path = os.path.join(base, "odd dir #1?x", "db file.db")
        store = await open_store(self, "sqlite", path)
        self.assertIsNotNone(store.read_engine)
        p = await store.create_project(project())
        work = []
        for _ in range(40):
            work.append(store.create_token(token(p.id, created_at=T0)))
            work.append(store.list_tokens(project_id=p.id))
            work.append(store.get_project(p.id))
        await defer.gatherResults(work)
        self.assertEqual(len(await store.list_tokens(project_id=p.id)), 40)
        t = await store.create_token(token(p.id))
        self.assertEqual(await store.get_token_by_hash(t.token_hash), t)
        self.assertTrue(os.path.exists(path))


class MySQLConnectionTests(TestCase):
    async def test_killed_connection_does_not_fail_next_call(self) -> None:
        location = new_location(self, "mysql")
        store = await open_store(self, "mysql", location, pool_size=2)
        p = await store.create_project(project())
        await defer.gatherResults([store.ping(), store.ping()])
        database = sa.engine.make_url(location).database
        admin = sa.create_engine(mysql_url(MYSQL_DSN), poolclass=sa.pool.NullPool)
        self.addCleanup(admin.dispose)
        with admin.begin() as conn:
            ids = conn.execute(
                sa.text("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = :db"),
                {"db": database},
            ).scalars()
            killed = 0
            for i in list(ids):
                conn.execute(sa.text(f"KILL {int(i)}"))
                killed += 1
        self.assertGreaterEqual(killed, 1)
        results = await defer.gatherResults([store.get_project(p.id), store.list_projects()])
        self.assertEqual(results[0].name, p.name)
        t = await store.create_token(token(p.id))
        self.assertEqual(await store.count_request(t.token_hash, T0), UsageOutcome.OK)
