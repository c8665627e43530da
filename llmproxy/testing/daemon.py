"""
Start a real C{twistd -n llmproxy} (or any plugin) in a subprocess for
end-to-end tests, wait until it answers, stop it with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

import attrs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@attrs.define
class Daemon:
    """A running twistd process; C{url} is its base URL."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_daemon(
    workdir: str,
    env: Mapping[str, str],
    plugin: str = "llmproxy",
    args: Sequence[str] = (),
    port: int | None = None,
    health_path: str | None = "/health",
    timeout: float = 20.0,
) -> Daemon:
    """
    Run C{twistd -n --pidfile= <plugin> --port tcp:<port> <args>} in
    C{workdir} with C{env} added to this process's environment. Its output
    goes to C{<workdir>/<plugin>-<port>.log}.
    """
    port = port or free_port()
    full_env = dict(os.environ)
    full_env.update(env)
    log_path = os.path.join(workdir, f"{plugin}-{port}.log")
    out = open(log_path, "wb")
    cmd = [
        sys.executable,
        "-c",
        "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
        "-n",
        "--pidfile=",
        plugin,
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        *args,
    ]
    process = subprocess.Popen(cmd, cwd=workdir, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    daemon = Daemon(process, port, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{plugin} exited with {process.returncode}:\n{daemon.log()}")
        try:
            if health_path is None:
                wait_for_port(port, 0.2)
            else:
                with urllib.request.urlopen(daemon.url + health_path, timeout=1) as r:
                    r.read()
            return daemon
        except (OSError, urllib.error.URLError, TimeoutError):
            if time.monotonic() > deadline:
                daemon.kill()
                raise TimeoutError(f"{plugin} did not answer in {timeout}s:\n{daemon.log()}")
            time.sleep(0.1)
