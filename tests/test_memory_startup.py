"""
What the daemon loads at startup on its defaults: modules it has no use for
(a migration tool for a schema that is already current, clients for
services that are not configured) stay out of its memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.config import env_names
from llmproxy.store.sql import bundled_head, head_revision, scan_head

#: Runs twistd like a user would and, once the reactor runs (every service
#: started, the database open), writes the names of the loaded modules.
_REPORT_MODULES = """
import json, os, sys
from twisted.internet import reactor
from twisted.scripts.twistd import run

def report():
    with open(os.environ["MODULES_REPORT"], "w") as f:
        json.dump(sorted(sys.modules), f)
    reactor.stop()

reactor.callWhenRunning(report)
sys.argv[0] = "twistd"
run()
"""


def startup_modules(case: SynchronousTestCase, workdir: str, **env: str) -> set[str]:
    """The modules C{twistd -n llmproxy} has loaded once it has started in C{workdir}."""
    report = os.path.join(workdir, "modules.json")
    full_env = {k: v for k, v in os.environ.items() if k not in env_names()}
    full_env.update(MANAGEMENT_TOKEN="m", MODULES_REPORT=report, **env)
    cmd = [sys.executable, "-c", _REPORT_MODULES, "-n", "--pidfile=", "llmproxy"]
    cmd += ["--port", "tcp:0:interface=127.0.0.1"]
    done = subprocess.run(
        cmd, cwd=workdir, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    case.assertEqual(done.returncode, 0, done.stdout.decode("utf-8", "replace"))
    with open(report) as f:
        return set(json.load(f))


def loaded(modules: set[str], package: str) -> list[str]:
    return sorted(m for m in modules if m == package or m.startswith(package + "."))


class StartupImportTests(SynchronousTestCase):
    def test_bundled_head_is_alembics_head(self) -> None:
        self.assertEqual(bundled_head(), head_revision())

    def test_current_schema_starts_without_alembic(self) -> None:
        """A new database is migrated with Alembic; a current one is only checked."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        first = startup_modules(self, workdir)
        self.assertIn("alembic.command", first)
        again = startup_modules(self, workdir)
        self.assertEqual(loaded(again, "alembic"), [])
        self.assertEqual(loaded(again, "sqlalchemy.dialects.postgresql"), [])
        self.assertEqual(loaded(again, "sqlalchemy.dialects.mysql"), [])

    def test_defaults_load_no_yaml_or_redis_client(self) -> None:
        """The built-in provider needs no YAML parser, a daemon without Redis no client."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        modules = startup_modules(self, workdir)
        self.assertEqual(loaded(modules, "yaml"), [])
        self.assertEqual(loaded(modules, "txredisapi"), [])


class ScanHeadTests(SynchronousTestCase):
    def versions(self, **scripts: str) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        for name, text in {"__init__": "", **scripts}.items():
            with open(os.path.join(path, name + ".py"), "w") as f:
                f.write(text)
        return path

    def test_chain(self) -> None:
        path = self.versions(
            a='revision = "0001"\ndown_revision = None\n',
            b='revision: str = "0002"\ndown_revision: str | None = "0001"\n',
        )
        self.assertEqual(scan_head(path), "0002")

    def test_merge(self) -> None:
        path = self.versions(
            a='revision = "a"\ndown_revision = None\n',
            b='revision = "b"\ndown_revision = "a"\n',
            c='revision = "c"\ndown_revision = "a"\n',
            m='revision = "m"\ndown_revision = ("b", "c")\n',
        )
        self.assertEqual(scan_head(path), "m")

    def test_left_to_alembic(self) -> None:
        """Two heads, branch labels, dependencies or computed ids: no answer."""
        base = 'revision = "a"\ndown_revision = None\n'
        for other in (
            'revision = "b"\ndown_revision = None\n',
            'revision = "b"\ndown_revision = "a"\nbranch_labels = ("x",)\n',
            'revision = "b"\ndown_revision = "a"\ndepends_on = "z"\n',
            'revision = "b"\ndown_revision = PARENT\n',
            'down_revision = "a"\n',
        ):
            self.assertIsNone(scan_head(self.versions(a=base, b=other)), other)
