"""The real daemon and its database: created at start, wrong key refused."""

from __future__ import annotations

import json
import os
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.testing.daemon import start_daemon
from tests.test_store_support import KEY, OTHER_KEY


class DaemonDatabaseTests(SynchronousTestCase):
    def test_creates_database_and_refuses_wrong_key(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        env = {
            "MANAGEMENT_TOKEN": "x",
            "ENCRYPTION_KEY": KEY,
            "DB_DRIVER": "sqlite",
            "DATABASE_PATH": "./data/llmproxy.db",
        }
        daemon = start_daemon(workdir, env)
        try:
            with urllib.request.urlopen(daemon.url + "/ready", timeout=5) as r:
                body = json.loads(r.read())
            self.assertEqual(body["checks"]["database"], "ok")
            self.assertTrue(os.path.exists(os.path.join(workdir, "data", "llmproxy.db")))
        finally:
            self.assertEqual(daemon.terminate(), 0)

        with self.assertRaises(RuntimeError) as e:
            start_daemon(workdir, dict(env, ENCRYPTION_KEY=OTHER_KEY), timeout=30)
        message = str(e.exception)
        self.assertIn(
            "llmproxy: configuration error: ENCRYPTION_KEY: does not match the key", message
        )
        self.assertNotIn("Traceback", message)
        self.assertNotIn(OTHER_KEY, message)
