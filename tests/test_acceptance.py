"""
What an operator notices when starting the daemon: a port that cannot be
opened stops it with an error instead of leaving a process that serves
nothing.
"""

from __future__ import annotations

import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.testing.daemon import start_daemon


class StartupTests(SynchronousTestCase):
    def test_port_in_use_exits_with_error(self) -> None:
        taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        error = self.assertRaises(
            RuntimeError,
            start_daemon,
            workdir,
            {"MANAGEMENT_TOKEN": "acceptance-management-token"},
            port=port,
        )
        self.assertIn("exited with 1", str(error))
        self.assertIn("Address already in use", str(error))
