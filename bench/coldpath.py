"""
Where a proxy spends the time of a stream's first event, request by request.

``bench/run.py`` measures the stream first-event overhead from outside:
client to first event, through a proxy minus direct. This tool splits the
proxy's own part of it. It starts the benchmark's upstream, llmproxy and the
stock-Twisted baseline (pinned as ``bench/run.py`` pins them), each proxy
with a ``sitecustomize`` that timestamps every socket read and write of the
reactor (``tcp.Connection.doRead`` and ``writeSomeData``) and, in llmproxy,
entry and exit of a few functions on the request's and the answer's path.
Then it sends
paced streams (1 content event, 50 ms pacing) to each proxy in turn, one
every ``--gap`` seconds, each on a fresh connection, and prints the median
over the streams, in microseconds:

* *request*: from the read of the client's request to the write to the
  upstream (for the baseline this includes connecting to the upstream);
* *upstream*: from that write to the read of the upstream's answer;
* *answer*: from that read to the write of the first bytes to the client;
* for llmproxy, where in *request* and in *answer* each instrumented
  function starts and ends.

The timestamps cost a microsecond or two each, the same for both proxies.
A pause between streams (``--gap``, 0.3 s; at least 0.2 s, so that the
streams can be told apart from the pacing of their events) leaves the
proxy's core idle and its caches cold, as between a client's sporadic
requests::

    python bench/coldpath.py                # 25 streams each, 0.3 s apart
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loadgen
import run as rig

#: Functions timed in llmproxy (module, class or None, function, mark), on
#: the request's side (from the read of the client's request to the write
#: upstream) and on the answer's (from the read of the upstream's answer to
#: the first write to the client).
REQUEST_MARKS = [
    ("twisted.web.http", "HTTPChannel", "allHeadersReceived", "parse the request head"),
    ("llmproxy.web.site", "LLMProxyRequest", "process", "process the request"),
    ("llmproxy.proxy.resource", "ProxyResource", "_new_record", "  make the record"),
    ("llmproxy.proxy.resource", "ProxyResource", "_proxy_now", "  checks (token, project, cache)"),
    ("llmproxy.proxy.resource", "ProxyResource", "_exchange", "    start the exchange"),
    ("llmproxy.proxy.resource", None, "upstream_request_headers", "      upstream headers"),
    ("llmproxy.proxy.client", "UpstreamPool", "request", "      hand it to the pool"),
    ("llmproxy.eagerwrite", "_Flusher", "flush", "end-of-turn flush"),
]
ANSWER_MARKS = [
    ("llmproxy.proxy.client", "UpstreamConnection", "_parse_head", "parse the upstream head"),
    ("llmproxy.proxy.resource", "ProxyResource", "_answered", "answer the headers"),
    ("llmproxy.proxy.resource", None, "copy_response_headers", "  copy the headers"),
    ("llmproxy.proxy.resource", "ProxyResource", "_taps", "  make the body taps"),
    ("llmproxy.proxy.resource", None, "prepare_store", "  response cache plan"),
    ("llmproxy.proxy.resource", None, "overhead_header", "  overhead header"),
    ("llmproxy.proxy.resource", None, "BodyRelay", "  make the relay"),
    ("llmproxy.proxy.forward", "BodyRelay", "dataReceived", "relay the first chunk"),
    ("llmproxy.proxy.forward", "BodyRelay", "_relay", "  write it to the client"),
    ("llmproxy.web.site", "LLMProxyChannel", "writeHeaders", "    write the head"),
]
MARKS = REQUEST_MARKS + ANSWER_MARKS

SITECUSTOMIZE = r"""
import os, sys, threading, time

_LOG = []
_OUT = os.environ["COLDPATH_OUT"]
_MARKS = %(marks)r


def _timed(owner, name, tag):
    original = getattr(owner, name)
    now = time.perf_counter_ns

    def timed(*args, **kwargs):
        _LOG.append((now(), tag + ">"))
        try:
            return original(*args, **kwargs)
        finally:
            _LOG.append((now(), tag + "<"))

    setattr(owner, name, timed)


def _loaded(module, attr, seconds=60.0):
    # the module once it defines attr (imports run in the main thread)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = sys.modules.get(module)
        if found is not None and hasattr(found, attr):
            return found
        time.sleep(0.01)
    return None


def _install():
    tcp = _loaded("twisted.internet.tcp", "Server")
    _timed(tcp.Connection, "doRead", "R")
    _timed(tcp.Connection, "writeSomeData", "W")
    if os.environ.get("COLDPATH_MARKS"):
        for index, (module, cls, name) in enumerate(_MARKS):
            owner = _loaded(module, cls or name)
            if owner is not None:
                _timed(getattr(owner, cls) if cls else owner, name, "M%%d" %% index)
    while True:
        time.sleep(0.2)
        if os.path.exists(_OUT + ".dump"):
            os.unlink(_OUT + ".dump")
            with open(_OUT, "w") as f:
                f.write("\n".join("%%d %%s" %% row for row in _LOG))
            del _LOG[:]


threading.Thread(target=_install, daemon=True).start()
"""


def segments(rows: list[tuple[int, str]], quiet_ns: int) -> list[dict[str, float]]:
    """
    Per stream: the first read after C{quiet_ns} of silence is the client's
    request; then the first write (to the upstream), the next read (its
    answer) and the next write (to the client). Marks inside the answer are
    in microseconds from the answer's read.
    """
    found: list[dict[str, float]] = []
    i, last = 0, 0
    n = len(rows)

    def after(j: int, kind: str) -> int:
        while j < n and rows[j][1] != kind:
            j += 1
        return j

    while i < n:
        t, kind = rows[i]
        if kind == "R>" and t - last > quiet_ns:
            w1 = after(i + 1, "W>")
            r2 = after(w1 + 1, "R>")
            w2 = after(r2 + 1, "W>")
            if w2 >= n:
                break
            t0, t1, t2, t3 = t, rows[w1][0], rows[r2][0], rows[w2][0]
            seg = {
                "request": (t1 - t0) / 1e3,
                "upstream": (t2 - t1) / 1e3,
                "answer": (t3 - t2) / 1e3,
            }
            for lo, hi, t_from in ((i, r2, t0), (r2, w2, t2)):
                for tt, k in rows[lo:hi]:
                    if k.startswith("M") and k not in seg:
                        seg[k] = (tt - t_from) / 1e3
            found.append(seg)
            i = w2
        last = rows[i][0]
        i += 1
    return found


def dump(path: str) -> None:
    """Have a proxy write its timestamps to C{path} (and forget them)."""
    open(path + ".dump", "w").close()
    deadline = time.monotonic() + 10
    while os.path.exists(path + ".dump"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no timestamps in {path}: see the proxies' logs")
        time.sleep(0.05)
    time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=25, help="streams per proxy (25)")
    p.add_argument("--gap", type=float, default=0.3, help="seconds between streams (0.3)")
    args = p.parse_args(argv)
    if args.gap < 0.2:
        p.error("--gap must be at least 0.2 s")
    a = rig.parse_args(["--quick"])
    workdir = tempfile.mkdtemp(prefix="llmproxy-coldpath-")
    sitedir = os.path.join(workdir, "site")
    os.makedirs(sitedir)
    with open(os.path.join(sitedir, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE % {"marks": [m[:3] for m in MARKS]})
    out = {name: os.path.join(workdir, name + ".times") for name in ("llmproxy", "baseline")}
    env = {name: {"PYTHONPATH": sitedir, "COLDPATH_OUT": path} for name, path in out.items()}
    env["llmproxy"]["COLDPATH_MARKS"] = "1"
    procs = rig.Processes(workdir)
    if a.loadgen_cpu:
        os.sched_setaffinity(0, {int(a.loadgen_cpu)})
    try:
        upstream, up_port = rig.start_upstream(a, procs, a.loadgen_cpu)
        bl_port = rig.free_port()
        bl = procs.start(
            "baseline",
            [a.python, os.path.join(rig.HERE, "baseline_proxy.py"), "--port", str(bl_port)]
            + ["--upstream", f"127.0.0.1:{up_port}"],
            env=env["baseline"],
            cpu=a.proxy_cpu,
        )
        rig.wait_http(f"http://127.0.0.1:{bl_port}/v1/models", bl, "baseline", procs)
        a.daemon_env = env["llmproxy"]
        lp, lp_base, token, why = rig.start_llmproxy(a, procs, "llmproxy", upstream, 1, a.proxy_cpu)
        if token is None:
            print(f"llmproxy not measured: {why}", file=sys.stderr)
            return 1
        body = json.dumps({**rig.CHAT, "stream": True}).encode()
        knobs = {"X-Fake-Chunks": "1", "X-Fake-Chunk-Delay-Ms": "50"}
        targets = {
            "llmproxy": (lp_base, {"Authorization": f"Bearer {token}", **knobs}),
            "baseline": (f"http://127.0.0.1:{bl_port}", {"Authorization": "Bearer sk-x", **knobs}),
        }
        time.sleep(3)  # past llmproxy's start-up heap freeze
        for path in out.values():
            dump(path)  # drop what start-up and the management calls logged
        for _ in range(args.streams + 1):
            for base, headers in targets.values():
                time.sleep(args.gap)
                r = loadgen.one_stream(
                    base + "/v1/chat/completions",
                    {"Content-Type": "application/json", **headers},
                    body,
                )
                if not r["ok"]:
                    raise RuntimeError(f"a stream through {base} failed: {r}")
        report: dict[str, dict[str, float]] = {}
        for name, path in out.items():
            dump(path)
            with open(path) as f:
                rows = [(int(t), k) for t, k in (line.split() for line in f if line.strip())]
            # a new stream: a read after at least half the gap of silence
            found = segments(rows, quiet_ns=int(args.gap * 0.5e9))[1:]
            keys = sorted({k for s in found for k in s})
            report[name] = {k: statistics.median(s[k] for s in found if k in s) for k in keys}
            report[name]["n"] = len(found)
        print(f"median over {report['llmproxy']['n']:.0f} streams, {args.gap} s apart (us)")
        print(f"{'':34} {'llmproxy':>9} {'baseline':>9}")
        for k in ("request", "upstream", "answer"):
            print(f"{k:34} {report['llmproxy'][k]:9.0f} {report['baseline'][k]:9.0f}")
        for side, marks, offset in (
            ("request, from the read of the client's request", REQUEST_MARKS, 0),
            ("answer, from the read of the upstream's answer", ANSWER_MARKS, len(REQUEST_MARKS)),
        ):
            print(f"in llmproxy's {side} (start / end):")
            for index, (_m, _c, _n, label) in enumerate(marks, offset):
                start = report["llmproxy"].get(f"M{index}>")
                end = report["llmproxy"].get(f"M{index}<")
                if start is not None and end is not None:
                    print(f"  {label:32} {start:7.0f} {end:7.0f}")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
