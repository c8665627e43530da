"""
Instructions per proxied request, counted by valgrind's callgrind.

Timing a proxy on a shared or virtual machine moves by 5-10 % from run to
run; counting the instructions its process executes for a fixed number of
requests moves far less (to the last thousand on a steady machine, within
about 1.5 % on a busier one: compare medians of a few runs).
That makes this the tool for comparing two versions of the hot path:
run it on each and compare the counts. It counts user-space instructions
only, so a change that saves system calls (fewer epoll registrations, for
instance) shows less here than in ``bench/run.py``.

It starts the benchmark's upstream and one llmproxy daemon under
``valgrind --tool=callgrind`` with collection off, sends a warm-up, turns
collection on, sends ``--requests`` sequential requests on one keep-alive
connection (or fresh streaming requests with ``--stream``), and prints the
instructions per request::

    python bench/instructions.py              # 400 chat completions
    python bench/instructions.py --stream     # 400 streams of 3 events

Needs ``valgrind`` (``apt-get install valgrind``). Run with ``PYTHONPATH``
set to another checkout to measure that one with the same harness.
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loadgen
import run as rig


def wait_answering(url: str, seconds: float = 600.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                r.read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--stream", action="store_true", help="streaming requests (3 events each)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    a = rig.parse_args(["--quick"])
    a.daemon_env = dict(e.split("=", 1) for e in args.env)
    workdir = tempfile.mkdtemp(prefix="llmproxy-instructions-")
    procs = rig.Processes(workdir)
    start = procs.start

    def start_wrapped(
        name: str, argv: list[str], env: dict[str, str] | None = None, cpu: str = ""
    ) -> Any:
        if name == "llmproxy":
            out = os.path.join(workdir, "callgrind.out.%p")
            valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
            argv = [*valgrind, f"--callgrind-out-file={out}", *argv]
        return start(name, argv, env, "")

    procs.start = start_wrapped  # type: ignore[method-assign]
    rig.wait_http = lambda url, proc, name, procs_: wait_answering(url)  # type: ignore[assignment]
    try:
        upstream, _port = rig.start_upstream(a, procs)
        daemon, base, token, why = rig.start_llmproxy(a, procs, "llmproxy", upstream, 1, "")
        if token is None:
            print(f"llmproxy not measured: {why}", file=sys.stderr)
            return 1
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        if args.stream:
            body = json.dumps({**rig.CHAT, "stream": True}).encode()
            headers.update({"X-Fake-Chunks": "3", "X-Fake-Chunk-Delay-Ms": "0"})
            url = base + "/v1/chat/completions"

            def send(n: int) -> None:
                for _ in range(n):
                    if not loadgen.one_stream(url, headers, body)["ok"]:
                        raise RuntimeError("a stream failed")

        else:
            body = json.dumps(rig.CHAT).encode()
            conn = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]))

            def send(n: int) -> None:
                for _ in range(n):
                    conn.request("POST", "/v1/chat/completions", body, headers)
                    response = conn.getresponse()
                    response.read()
                    if response.status != 200:
                        raise RuntimeError(f"answered {response.status}")

        send(args.warmup)
        time.sleep(3)  # past the daemon's start-up heap freeze
        pid = str(daemon.pid)
        subprocess.run(["callgrind_control", "-i", "on", pid], capture_output=True, check=True)
        send(args.requests)
        subprocess.run(["callgrind_control", "-i", "off", pid], capture_output=True, check=True)
        subprocess.run(["callgrind_control", "-d", pid], capture_output=True, check=True)
        time.sleep(1)
        total = 0
        for path in glob.glob(os.path.join(workdir, "callgrind.out.*")):
            with open(path) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        total = max(total, int(line.split()[1]))
        kind = "stream" if args.stream else "chat completion"
        print(
            f"{total / args.requests / 1000:.0f}k instructions per {kind} "
            f"({args.requests} requests after {args.warmup} warm-up)"
        )
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
