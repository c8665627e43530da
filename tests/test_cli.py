"""``llmproxy migrate ...``: the schema and key maintenance commands."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import sqlalchemy as sa
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.cli import run
from llmproxy.crypto import KeyCipher
from llmproxy.store import schema
from llmproxy.store.sql import head_revision, sqlite_engine
from tests.test_store import T0
from tests.test_store_support import KEY, new_postgres_schema, sqlite_url_for


class NoDatabaseTests(SynchronousTestCase):
    def test_read_only_commands_create_nothing(self) -> None:
        where = os.path.join(os.path.abspath(self.mktemp()), "data", "llmproxy.db")
        env = {"DATABASE_PATH": where}
        for action, said in (
            ("status", f"current: base\nnewest: {head_revision()}\nmigrations pending\n"),
            ("encrypt-status", "schema is empty\n"),
            ("down", "schema is empty; nothing to undo\n"),
        ):
            out, err = io.StringIO(), io.StringIO()
            self.assertEqual(run(["migrate", action], env, out, err), 0)
            self.assertEqual((out.getvalue(), err.getvalue()), (said, ""))
        self.assertFalse(os.path.exists(os.path.dirname(os.path.dirname(where))))


class MigrateCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = sqlite_url_for(self)
        self.env = {"DATABASE_PATH": self.path}

    def cli(self, *argv: str, **env: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = run(["migrate", *argv], {**self.env, **env}, out, err)
        return code, out.getvalue(), err.getvalue()

    def test_up_status_down(self) -> None:
        head = head_revision()
        self.assertEqual(
            self.cli("status"), (0, "current: base\nnewest: 0001\nmigrations pending\n", "")
        )
        self.assertFalse(os.path.exists(self.path))  # asking created nothing
        self.assertEqual(self.cli("up"), (0, f"schema at revision {head}\n", ""))
        self.assertEqual(self.cli("status")[1], f"current: {head}\nnewest: {head}\nup to date\n")
        code, _, err = self.cli("down")
        self.assertEqual(code, 1)
        self.assertIn("--yes", err)
        self.assertEqual(self.cli("down", "--yes"), (0, "schema at revision base\n", ""))
        engine = sqlite_engine(self.path)
        self.addCleanup(engine.dispose)
        self.assertEqual(sa.inspect(engine).get_table_names(), ["alembic_version"])
        self.assertEqual(self.cli("down"), (0, "schema is empty; nothing to undo\n", ""))

    def test_encrypt(self) -> None:
        self.cli("up")
        engine = sqlite_engine(self.path)
        self.addCleanup(engine.dispose)
        with engine.begin() as conn:
            conn.execute(
                schema.projects.insert().values(
                    id="p1",
                    name="a",
                    api_key="sk-plain",
                    is_active=True,
                    created_at=T0,
                    updated_at=T0,
                )
            )
        self.assertEqual(
            self.cli("encrypt-status"), (0, "provider keys: 0 encrypted, 1 plaintext\n", "")
        )
        code, _, err = self.cli("encrypt")
        self.assertEqual(
            (code, err),
            (1, "llmproxy: configuration error: ENCRYPTION_KEY: required to encrypt keys\n"),
        )
        self.assertEqual(
            self.cli("encrypt", ENCRYPTION_KEY=KEY), (0, "encrypted 1 provider key(s)\n", "")
        )
        self.assertEqual(
            self.cli("encrypt", ENCRYPTION_KEY=KEY), (0, "encrypted 0 provider key(s)\n", "")
        )
        with engine.connect() as conn:
            raw = conn.execute(sa.select(schema.projects.c.api_key)).scalar_one()
        self.assertEqual(KeyCipher(KEY).decrypt(raw), "sk-plain")
        self.assertEqual(
            self.cli("encrypt-status"), (0, "provider keys: 1 encrypted, 0 plaintext\n", "")
        )

    def test_bad_config(self) -> None:
        code, out, err = self.cli("status", ENCRYPTION_KEY="nope")
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("llmproxy: configuration error: ENCRYPTION_KEY"), err)
        self.assertEqual(err.count("\n"), 1)
        code, _, err = self.cli("up", DB_DRIVER="postgres")
        self.assertEqual(
            (code, err),
            (1, "llmproxy: configuration error: DATABASE_URL: required when DB_DRIVER=postgres\n"),
        )

    def test_unreachable_database(self) -> None:
        code, _, err = self.cli(
            "status", DB_DRIVER="postgres", DATABASE_URL="postgresql://nobody@127.0.0.1:1/x"
        )
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith("llmproxy: database error: "), err)
        self.assertEqual(err.count("\n"), 1)

    def test_postgres(self) -> None:
        url = new_postgres_schema(self).replace("postgresql+psycopg://", "postgresql://")
        env = {"DB_DRIVER": "postgres", "DATABASE_URL": url}
        self.assertEqual(self.cli("up", **env)[0], 0)
        self.assertIn("up to date", self.cli("status", **env)[1])
        self.assertEqual(self.cli("down", "base", "--yes", **env)[0], 0)

    def test_console_script(self) -> None:
        """The installed command runs without MANAGEMENT_TOKEN and exits non-zero on errors."""
        env = {k: v for k, v in os.environ.items() if k != "MANAGEMENT_TOKEN"}
        env["DATABASE_PATH"] = self.path
        ok = subprocess.run(
            [sys.executable, "-c", "from llmproxy.cli import main; main()", "migrate", "up"],
            env=env,
            capture_output=True,
            text=True,
        )
        self.assertEqual((ok.returncode, ok.stdout.strip()), (0, "schema at revision 0001"))
        env["ENCRYPTION_KEY"] = "short"
        bad = subprocess.run(
            [sys.executable, "-c", "from llmproxy.cli import main; main()", "migrate", "status"],
            env=env,
            capture_output=True,
            text=True,
        )
        self.assertEqual(bad.returncode, 1)
        self.assertEqual(len(bad.stderr.splitlines()), 1)
