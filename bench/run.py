"""
llmproxy benchmark: one command, three targets measured in the same run.

    .venv/bin/python bench/run.py            # full run (about 10 minutes)
    .venv/bin/python bench/run.py --quick    # smoke run (under 2 minutes)

It starts llmproxy's own fake upstream (bench/upstream.py), the llmproxy
daemon (C{twistd llmproxy}, default settings) and the stock-Twisted baseline
(bench/baseline_proxy.py), creates a project and a token through the
management API, and measures, interleaving the targets step by step:

* C{direct}: the fake upstream itself (no proxy: the ceiling);
* C{llmproxy}: the daemon, one process pinned to one core;
* C{baseline}: C{twisted.web.proxy.ReverseProxyResource}, pinned to the same core.

Figures: throughput and latency (p50/p90/p99) at 1, 10 and 100 keep-alive
connections; time to first byte and to the first SSE event of a paced stream
and the spacing of its events (a buffering proxy bunches them); N streams
opened at once (time to first event of each); the proxies' RSS idle and peak;
the RSS of llmproxy while a slow client reads a large body; and llmproxy with
C{--workers 1} against C{--workers 2}. Ratios are against the baseline.

Load comes from C{wrk} when installed, else from an asyncio generator
(bench/loadgen.py). On a machine with two or more cores the proxies run on
C{--proxy-cpu} and everything else (upstream, load generator, this script) on
C{--loadgen-cpu}. Output: a markdown table on stdout and, under
bench/results/, C{<timestamp>.json}, C{.md} and C{.png} (matplotlib, when
installed). Everything started is stopped at the end, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import loadgen  # noqa: E402

TARGETS = ("direct", "llmproxy", "baseline")
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
MANAGEMENT_TOKEN = "bench-management-token-0123456789abcdef"
UPSTREAM_KEY = "sk-bench-upstream-key"
CHAT = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello, how are you?"},
    ],
    "max_tokens": 64,
}
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------- /proc


def proc_tree(pid: int) -> list[int]:
    """C{pid} and all its descendants (a C{--workers N} daemon has children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def rss_mib(pid: int) -> float:
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total / 2**20


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / TICKS


class OtherCpu:
    """
    CPU used by processes that are not part of the run (other work on the
    machine), in % of one core: all busy time from /proc/stat minus the
    started processes, this script and its children (wrk).
    """

    def __init__(self, procs: Processes) -> None:
        self.procs = procs

    def _now(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / TICKS
        ours = sum(cpu_seconds(p.pid) for _n, p in self.procs.procs)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            ru = resource.getrusage(who)
            ours += ru.ru_utime + ru.ru_stime
        return time.monotonic(), busy, ours

    def begin(self) -> None:
        self.start = self._now()

    def end(self) -> float:
        t1, busy1, ours1 = self._now()
        t0, busy0, ours0 = self.start
        return round(max(0.0, (busy1 - busy0) - (ours1 - ours0)) * 100 / (t1 - t0))

    def wait_quiet(self, threshold: float, max_wait: float) -> float:
        """Wait until other processes use at most C{threshold}% of a core."""
        t0 = time.monotonic()
        while True:
            self.begin()
            time.sleep(1.0)
            other = self.end()
            if other <= threshold or time.monotonic() - t0 > max_wait:
                return other
            log(f"waiting for a quieter machine: other processes use {other}% of a core")


class RssMonitor(threading.Thread):
    """Samples the RSS of each watched process tree every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pids: dict[str, int] = {}
        self.samples: dict[str, list[tuple[float, float]]] = {}
        self.peak: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.stopping = threading.Event()
        self.phases: list[tuple[float, str]] = []

    def watch(self, name: str, pid: int) -> None:
        self.pids[name] = pid
        self.samples.setdefault(name, [])
        self.peak[name] = 0.0

    def phase(self, name: str) -> None:
        self.phases.append((round(time.monotonic() - self.t0, 2), name))

    def run(self) -> None:
        n = 0
        while not self.stopping.wait(0.05):
            n += 1
            for name, pid in list(self.pids.items()):
                mib = rss_mib(pid)
                if not mib:
                    continue
                self.peak[name] = max(self.peak[name], mib)
                if n % 4 == 0:
                    self.samples[name].append((round(time.monotonic() - self.t0, 2), mib))


# --------------------------------------------------------------------- processes


class Processes:
    """Everything this run started; C{stop_all} ends them by pid."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cpu: str = ""
    ) -> subprocess.Popen[bytes]:
        if cpu and shutil.which("taskset"):
            argv = ["taskset", "-c", cpu, *argv]
        logfile = open(os.path.join(self.workdir, f"{name}.log"), "wb")
        proc = subprocess.Popen(
            argv,
            cwd=self.workdir,
            env={**os.environ, **(env or {})},
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us, and we stop them in order
        )
        logfile.close()
        self.procs.append((name, proc))
        log(f"started {name} (pid {proc.pid}{', cpu ' + cpu if cpu else ''})")
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _name, proc in reversed(list(self.procs)):
            self.stop(proc)

    def tail(self, name: str) -> str:
        try:
            with open(os.path.join(self.workdir, f"{name}.log"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""


def http_json(
    url: str, method: str = "GET", body: Any = None, token: str | None = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw[:200]


def wait_http(url: str, proc: subprocess.Popen[bytes], name: str, procs: Processes) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{procs.tail(name)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                r.read()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer {url}:\n{procs.tail(name)}")
            time.sleep(0.1)


def providers_yaml(upstream: str) -> str:
    return (
        "default_api: openai\n"
        "apis:\n"
        "  openai:\n"
        f"    base_url: {upstream}\n"
        "    allowed_endpoints: [/v1/chat/completions, /v1/completions, /v1/embeddings,"
        " /v1/models]\n"
        "    allowed_methods: [GET, POST]\n"
    )


def start_upstream(a: argparse.Namespace, procs: Processes, cpu: str = "") -> tuple[str, int]:
    """
    Start the fake upstream (C{upstream.py}, primed with the benchmark's
    request) and wait until it answers; returns its base URL and port.
    """
    port = free_port()
    request_file = os.path.join(procs.workdir, "request.json")
    with open(request_file, "wb") as f:
        f.write(json.dumps(CHAT).encode())
    script = os.path.join(HERE, "upstream.py")
    argv = [a.python, script, "--port", str(port), "--request", request_file]
    proc = procs.start("upstream", argv, cpu=cpu)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/models", proc, "upstream", procs)
    return url, port


def start_llmproxy(
    a: argparse.Namespace, procs: Processes, name: str, upstream: str, workers: int, cpu: str
) -> tuple[subprocess.Popen[bytes], str, str | None, str | None]:
    """
    Start a daemon with its own database and make a project and a token;
    returns (process, base URL, client token or None, why there is none).
    """
    home = os.path.join(procs.workdir, name)
    os.makedirs(home, exist_ok=True)
    config = os.path.join(home, "providers.yaml")
    with open(config, "w") as f:
        f.write(providers_yaml(upstream))
    port = free_port()
    env = {
        "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
        "API_CONFIG_PATH": config,
        "DATABASE_PATH": os.path.join(home, "llmproxy.db"),
        "AUDIT_LOG_FILE": os.path.join(home, "audit.log"),
        **a.daemon_env,
    }
    # The schema is created first, as a deployment would run `llmproxy migrate
    # up` once before (re)starting daemons: a daemon whose database is current
    # never loads the migration tooling, so its memory is what a restarted
    # daemon uses, not a first start's.
    migrate = subprocess.run(
        [a.python, "-c", "from llmproxy.cli import main; main()", "migrate", "up"],
        cwd=home,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    if migrate.returncode != 0:
        raise RuntimeError(f"llmproxy migrate up failed:\n{migrate.stderr[-2000:]}")
    argv = [a.python, "-c", TWISTD, "-n", "--pidfile=", "llmproxy"]
    argv += ["--port", f"tcp:{port}:interface=127.0.0.1"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    proc = procs.start(name, argv, env, cpu)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", proc, name, procs)
    status, project = http_json(
        base + "/manage/projects",
        "POST",
        {"name": f"bench-{name}", "api_key": UPSTREAM_KEY},
        MANAGEMENT_TOKEN,
    )
    if status != 201:
        return proc, base, None, f"POST /manage/projects answered {status} {project}"
    status, token = http_json(
        base + "/manage/tokens",
        "POST",
        {"project_id": project["id"], "duration_minutes": 600},
        MANAGEMENT_TOKEN,
    )
    if status not in (200, 201) or not isinstance(token, dict) or "token" not in token:
        return proc, base, None, f"POST /manage/tokens answered {status}"
    return proc, base, token["token"], None


# --------------------------------------------------------------------- measuring


class Rig:
    """The started targets and how to reach them."""

    def __init__(self, a: argparse.Namespace, other: OtherCpu) -> None:
        self.a = a
        self.other = other
        self.base: dict[str, str] = {}
        self.token: dict[str, str] = {}
        self.pid: dict[str, int] = {}
        self.available: list[str] = []
        self.notes: list[str] = []

    def headers(self, target: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.token[target]}", "Content-Type": "application/json"}
        h.update(extra or {})
        return h

    def load(self, target: str, conns: int, duration: float) -> dict[str, Any]:
        """
        One load step; repeated (up to C{--noise-retries} times, keeping the
        quietest) when other processes used more than C{--noise} % of a core.
        """
        best: dict[str, Any] | None = None
        for attempt in range(self.a.noise_retries + 1):
            r = self._load_once(target, conns, duration)
            r["attempt"] = attempt + 1
            if best is None or r["other_cpu_pct"] < best["other_cpu_pct"]:
                best = r
            if self.a.quiet < 0 or r["other_cpu_pct"] <= self.a.noise:
                break
            log(f"{target} c={conns}: other processes used {r['other_cpu_pct']}% of a core: again")
        assert best is not None
        best["noisy"] = self.a.quiet >= 0 and best["other_cpu_pct"] > self.a.noise
        return best

    def warm(self, target: str) -> None:
        """Warm-up load (connection pools, caches): not measured, never repeated."""
        quiet, self.a.quiet = self.a.quiet, -1.0
        try:
            self._load_once(target, 10, self.a.warmup)
        finally:
            self.a.quiet = quiet

    def _load_once(self, target: str, conns: int, duration: float) -> dict[str, Any]:
        fn = loadgen.wrk_load if self.a.generator == "wrk" else loadgen.python_load
        pid = self.pid.get(target)
        if self.a.quiet >= 0:
            self.other.wait_quiet(self.a.quiet, self.a.quiet_wait)
        cpu0 = cpu_seconds(pid) if pid else 0.0
        t0 = time.monotonic()
        self.other.begin()
        r = fn(
            self.base[target] + "/v1/chat/completions",
            conns,
            duration,
            self.headers(target),
            json.dumps(CHAT).encode(),
            cpu=self.a.loadgen_cpu_int,
        )
        r["other_cpu_pct"] = self.other.end()
        if pid:
            r["proxy_cpu_pct"] = round(100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0))
        return r


def median(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def sanity(rig: Rig) -> None:
    for target in TARGETS:
        if not rig.token.get(target):
            continue
        try:
            status, body = http_json(
                rig.base[target] + "/v1/chat/completions", "POST", CHAT, rig.token[target]
            )
        except OSError as e:
            status, body = 0, repr(e)
        ok = status == 200 and isinstance(body, dict) and bool(body.get("choices"))
        s = loadgen.one_stream(
            rig.base[target] + "/v1/chat/completions",
            rig.headers(target, {"X-Fake-Chunks": "3"}),
            json.dumps({**CHAT, "stream": True}).encode(),
        )
        if ok and s["ok"]:
            rig.available.append(target)
            log(f"sanity {target}: ok")
        else:
            note = f"{target} not measured: POST /v1/chat/completions answered {status}"
            note += f" {str(body)[:120]}; stream ok={s['ok']} status={s['status']}"
            rig.notes.append(note)
            log(note)


def phase_load(rig: Rig) -> dict[str, Any]:
    a = rig.a
    out: dict[str, Any] = {}
    for target in rig.available:  # warm-up: connection pools and caches
        rig.warm(target)
    for rnd in range(a.rounds):
        for conns in a.conns:
            order = (
                rig.available[rnd % len(rig.available) :]
                + rig.available[: rnd % len(rig.available)]
            )
            for target in order:
                r = rig.load(target, conns, a.duration)
                out.setdefault(target, {}).setdefault(str(conns), []).append(r)
                log(
                    f"load round {rnd + 1} c={conns:<3} {target:<9} {r['rps']:>8.0f} req/s"
                    f"  p50 {r['p50_ms']:.2f}  p90 {r['p90_ms']:.2f}  p99 {r['p99_ms']:.2f} ms"
                    f"  cpu {r.get('proxy_cpu_pct', '-')}%  errors {r['errors'] or 0}"
                    f"  other {r['other_cpu_pct']}%"
                )
    summary: dict[str, Any] = {}
    for target, per_conns in out.items():
        for conns, runs in per_conns.items():
            summary.setdefault(target, {})[conns] = {
                k: median([r.get(k) for r in runs])
                for k in (
                    "rps",
                    "p50_ms",
                    "p90_ms",
                    "p99_ms",
                    "max_ms",
                    "proxy_cpu_pct",
                    "other_cpu_pct",
                )
            } | {
                "errors": sum(sum(r["errors"].values()) for r in runs),
                "runs": len(runs),
                "noisy": any(r.get("noisy") for r in runs),
            }
    return {"runs": out, "summary": summary}


def py_spy() -> str | None:
    """py-spy on the PATH, beside this Python (a virtualenv not activated) or in ~/.local."""
    found = shutil.which("py-spy")
    for candidate in (
        os.path.join(os.path.dirname(sys.executable), "py-spy"),
        os.path.expanduser("~/.local/bin/py-spy"),
    ):
        if found is None and os.access(candidate, os.X_OK):
            found = candidate
    return found


def phase_profile(rig: Rig) -> dict[str, Any]:
    """
    py-spy on llmproxy during an extra load step (not counted in the
    figures: sampling slows the process): where its reactor thread spends
    CPU, by function, self and inclusive.
    """
    a = rig.a
    spy = py_spy()
    if spy is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    raw = os.path.join(tempfile.mkdtemp(prefix="llmproxy-prof-"), "profile.txt")
    conns = max(a.conns)
    seconds = max(3, int(a.duration))
    loader = threading.Thread(target=rig.load, args=("llmproxy", conns, seconds + 2), daemon=True)
    loader.start()
    time.sleep(1.0)
    out = subprocess.run(
        [spy, "record", "-p", str(rig.pid["llmproxy"]), "-d", str(seconds), "-r", "100"]
        + ["-f", "raw", "-o", raw],
        capture_output=True,
        text=True,
    )
    loader.join()
    if not os.path.exists(raw):
        return {"error": f"py-spy failed: {out.stderr[-300:]}"}
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    with open(raw) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if "ReactorBase.run" not in stack:
                continue  # idle threads (thread pools)
            frames = stack.split(";")
            total += int(n)
            own[frames[-1]] = own.get(frames[-1], 0) + int(n)
            for fr in set(frames):
                inclusive[fr] = inclusive.get(fr, 0) + int(n)
    os.makedirs(a.out, exist_ok=True)
    kept = os.path.join(a.out, time.strftime("%Y%m%d-%H%M%S") + "-profile.txt")
    shutil.move(raw, kept)
    shutil.rmtree(os.path.dirname(raw), ignore_errors=True)
    log(f"py-spy samples (raw, one stack per line): {kept}")

    def top(counts: dict[str, int], n: int, keep: Any = lambda f: True) -> list[Any]:
        rows = sorted(((c, f) for f, c in counts.items() if keep(f)), reverse=True)[:n]
        return [[round(100.0 * c / max(1, total), 1), f] for c, f in rows]

    def ours(frame: str) -> bool:
        return "llmproxy/" in frame or "_parseContentType" in frame or "Agent.request" in frame

    result = {
        "raw": kept,
        "samples": total,
        "self": top(own, 20),
        "inclusive": top(inclusive, 30, ours),
    }
    log(f"profile: {total} samples of the reactor thread; top self: {result['self'][:5]}")
    return result


def phase_stream(rig: Rig) -> dict[str, Any]:
    a = rig.a
    knobs = {"X-Fake-Chunks": str(a.chunks), "X-Fake-Chunk-Delay-Ms": str(a.pace_ms)}
    body = json.dumps({**CHAT, "stream": True}).encode()
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in rig.available}
    for i in range(a.stream_runs + 1):
        for target in rig.available:
            r = loadgen.one_stream(
                rig.base[target] + "/v1/chat/completions", rig.headers(target, knobs), body
            )
            if i:  # the first of each is a warm-up
                runs[target].append(r)
    summary: dict[str, Any] = {}
    for target, rs in runs.items():
        summary[target] = {
            k: median([r[k] for r in rs])
            for k in ("ttfb_ms", "first_event_ms", "done_ms", "gap_median_ms")
        }
        summary[target]["gap_max_ms"] = max((r["gap_max_ms"] or 0) for r in rs)
        summary[target]["gap_max_at"] = sorted({r["gap_max_at"] for r in rs}, key=str)
        summary[target]["events"] = median([r["events"] for r in rs])
        summary[target]["ok"] = sum(r["ok"] for r in rs)
        summary[target]["n"] = len(rs)
        gap = summary[target]["gap_median_ms"]
        summary[target]["buffered"] = gap is None or gap < 0.5 * a.pace_ms
    direct = summary.get("direct", {})
    for target, s in summary.items():
        for k in ("ttfb_ms", "first_event_ms"):
            if s.get(k) is not None and direct.get(k) is not None:
                s["overhead_" + k] = s[k] - direct[k]
        log(
            f"stream {target:<9} ttfb {s['ttfb_ms']:.3f} ms  first event {s['first_event_ms']:.3f}"
            f" ms  overhead {s.get('overhead_first_event_ms', 0):+.3f} ms  gaps median"
            f" {s['gap_median_ms']:.1f} max {s['gap_max_ms']:.1f} ms (before event"
            f" {s['gap_max_at']} of {s['events']})"
            f"  {'BUFFERED' if s['buffered'] else 'streams'}"
        )
    return {"runs": runs, "summary": summary, "chunks": a.chunks, "pace_ms": a.pace_ms}


def phase_many(rig: Rig) -> dict[str, Any]:
    a = rig.a
    # every stream lasts 10 pacing intervals, at least a second longer than the
    # ramp, so all of them are open together at the end of the ramp
    pace = max(100, int((a.streams_ramp + 1.0) * 100))
    knobs = {"X-Fake-Chunks": "10", "X-Fake-Chunk-Delay-Ms": str(pace)}
    body = json.dumps({**CHAT, "stream": True}).encode()
    out: dict[str, Any] = {}
    for target in rig.available:
        time.sleep(1)
        r = loadgen.many_streams(
            rig.base[target] + "/v1/chat/completions",
            rig.headers(target, knobs),
            body,
            a.streams,
            a.streams_ramp,
        )
        out[target] = r
        log(
            f"{a.streams} streams {target:<9} ok {r['ok']} open together {r['peak_open']}"
            f"  first event p50"
            f" {r['first_event_p50_ms'] or 0:.1f} p99 {r['first_event_p99_ms'] or 0:.1f}"
            f" max {r['first_event_max_ms'] or 0:.1f} ms {r['errors'] or ''}"
        )
    return out


def phase_slow_client(rig: Rig, monitor: RssMonitor) -> dict[str, Any]:
    a = rig.a
    pid = rig.pid["llmproxy"]
    headers = rig.headers("llmproxy", {"X-Fake-Body-Bytes": str(a.slow_bytes)})
    monitor.phase("slow client")
    r = loadgen.slow_read(
        rig.base["llmproxy"] + "/v1/models", headers, a.slow_rate * 2**20, lambda: rss_mib(pid)
    )
    mibs = [m for _t, m in r["samples"]]
    r.update(rss_start_mib=mibs[0], rss_peak_mib=max(mibs), rss_end_mib=mibs[-1], size=a.slow_bytes)
    log(
        f"slow client: {r['bytes'] / 2**20:.0f} MiB in {r['seconds']} s (status {r['status']});"
        f" llmproxy RSS start {r['rss_start_mib']:.1f} peak {r['rss_peak_mib']:.1f}"
        f" end {r['rss_end_mib']:.1f} MiB"
    )
    return r


def phase_workers(rig: Rig, procs: Processes, monitor: RssMonitor, upstream: str) -> dict[str, Any]:
    """
    Fresh daemons with --workers 1 and --workers N, measured interleaved; the
    daemons and the load generator may use every core (the upstream stays
    where it is), so this shows what a second worker buys on this machine.
    """
    a = rig.a
    monitor.phase("workers")
    everything = ",".join(str(c) for c in sorted(range(os.cpu_count() or 1)))
    pinned = os.sched_getaffinity(0)
    saved = a.loadgen_cpu_int
    names = ("llmproxy-w1", f"llmproxy-w{a.workers}")
    started: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {"conns": a.workers_conns, "workers": a.workers}
    try:
        for name, n in zip(names, (1, a.workers), strict=True):
            proc, base, token, why = start_llmproxy(a, procs, name, upstream, n, everything)
            started.append(proc)
            if token is None:
                return {"error": f"{name}: {why}"}
            rig.base[name], rig.token[name], rig.pid[name] = base, token, proc.pid
        time.sleep(1.0)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        a.loadgen_cpu_int = None
        for name in names:
            rig.warm(name)
        runs: dict[str, list[dict[str, Any]]] = {}
        for rnd in range(a.rounds):
            for name in names if rnd % 2 == 0 else names[::-1]:
                r = rig.load(name, a.workers_conns, a.duration)
                runs.setdefault(name, []).append(r)
                log(
                    f"workers c={a.workers_conns} {name:<12} {r['rps']:>8.0f} req/s"
                    f"  p99 {r['p99_ms']:.2f} ms  cpu {r.get('proxy_cpu_pct')}%"
                    f"  errors {r['errors'] or 0}"
                )
        for name, rs in runs.items():
            out[name] = {
                k: median([r.get(k) for r in rs])
                for k in ("rps", "p50_ms", "p99_ms", "proxy_cpu_pct")
            }
    finally:
        a.loadgen_cpu_int = saved
        os.sched_setaffinity(0, pinned)
        for proc in started:
            procs.stop(proc)
    return out


# --------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    wrk = None
    if loadgen.have_wrk():
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
        wrk = (
            (out.stdout or out.stderr).splitlines()[0].strip()
            if (out.stdout or out.stderr)
            else "wrk"
        )
    import twisted

    try:
        commit = subprocess.run(
            ["git", "-C", os.path.dirname(HERE), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "commit": commit or "unknown",
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "wrk": wrk,
    }


def fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if abs(x) >= 100:
        s = f"{x:.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.2f}"
    return s + unit


def ratio(a: Any, b: Any) -> str:
    if a is None or b is None or not b:
        return "n/a"
    return f"{a / b:.2f}x"


def targets_met(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows for the goals llmproxy is held to."""
    rows: list[tuple[str, str, str]] = []
    load = res.get("load", {}).get("summary", {})
    lp, bl = load.get("llmproxy", {}), load.get("baseline", {})

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "NOT met")

    top = str(max(res["config"]["conns"]))
    r = (lp.get(top, {}).get("rps") or 0) / (bl.get(top, {}).get("rps") or 1) if lp else None
    rows.append(
        (
            f"throughput at c={top} >= 1.5x baseline (aim 2.5x)",
            ratio(lp.get(top, {}).get("rps"), bl.get(top, {}).get("rps")),
            verdict(None if r is None else r >= 1.5),
        )
    )
    p99 = lp.get(top, {}).get("p99_ms")
    rows.append(
        (f"p99 at c={top} < 20 ms", fmt(p99, " ms"), verdict(None if p99 is None else p99 < 20))
    )
    st = res.get("stream", {}).get("summary", {}).get("llmproxy", {})
    ov = st.get("overhead_first_event_ms")
    rows.append(
        (
            "stream first-event overhead < 0.5 ms",
            fmt(ov, " ms"),
            verdict(None if ov is None else ov < 0.5),
        )
    )
    buffered = st.get("buffered")
    rows.append(
        (
            "stream events not buffered",
            "buffered" if buffered else ("spaced" if st else "n/a"),
            verdict(None if buffered is None else not buffered),
        )
    )
    many = res.get("many", {}).get("llmproxy")
    n = res["config"]["streams"]
    if many:
        ok = many["ok"] == many["n"] and (many["first_event_max_ms"] or 1e9) < 50
        rows.append(
            (
                f"{n} concurrent streams, every first event < 50 ms",
                f"{many['ok']}/{many['n']} ok, max {fmt(many['first_event_max_ms'], ' ms')}",
                verdict(ok),
            )
        )
    else:
        rows.append((f"{n} concurrent streams, every first event < 50 ms", "n/a", verdict(None)))
    peak = res.get("rss", {}).get("llmproxy", {}).get("peak_mib")
    rows.append(
        ("RSS peak < 80 MiB", fmt(peak, " MiB"), verdict(None if peak is None else peak < 80))
    )
    slow = res.get("slow_client")
    if slow:
        growth = slow["rss_peak_mib"] - slow["rss_start_mib"]
        rows.append(
            (
                f"flat memory while a slow client reads {slow['size'] / 2**30:.2f} GiB"
                " (growth < 16 MiB)",
                f"+{growth:.1f} MiB",
                verdict(growth < 16 and slow["complete"]),
            )
        )
    else:
        rows.append(("flat memory while a slow client reads 1 GiB", "n/a", verdict(None)))
    return rows


def markdown(res: dict[str, Any]) -> str:
    out: list[str] = []
    m = res["machine"]
    out.append(
        f"llmproxy benchmark, {res['date']}; {m['nproc']} CPUs ({m['cpu_model']}), Python "
        f"{m['python']}, Twisted {m['twisted']}, load: {res['config']['generator']}"
    )
    out.append("")
    out.append(f"command: `{res['command']}` (llmproxy at commit {m.get('commit', 'unknown')})")
    out.append("")
    settings = " ".join(f"{k}={v}" for k, v in res["config"]["daemon_env"].items())
    out.append(f"llmproxy settings: defaults, except {settings}\n")
    avail = res["available"]
    load = res.get("load", {}).get("summary", {})
    if load:
        out.append(
            "| non-stream POST /v1/chat/completions | "
            + " | ".join(avail)
            + " | llmproxy / baseline |"
        )
        out.append("|---" * (len(avail) + 2) + "|")
        for per in load.values():
            for v in per.values():
                if v.get("proxy_cpu_pct") and v.get("rps"):
                    # CPU time per request: comparable across machines and loads
                    v["cpu_us_per_req"] = v["proxy_cpu_pct"] * 1e4 / v["rps"]
        for conns in [str(c) for c in res["config"]["conns"]]:
            for key, label, unit in (
                ("rps", "req/s", ""),
                ("p50_ms", "p50", " ms"),
                ("p90_ms", "p90", " ms"),
                ("p99_ms", "p99", " ms"),
                ("proxy_cpu_pct", "proxy CPU", "%"),
                ("cpu_us_per_req", "proxy CPU per request", " us"),
                ("other_cpu_pct", "other processes' CPU", "%"),
                ("errors", "errors", ""),
            ):
                vals = [load.get(t, {}).get(conns, {}).get(key) for t in avail]
                lp = load.get("llmproxy", {}).get(conns, {}).get(key)
                bl = load.get("baseline", {}).get(conns, {}).get(key)
                cells = [
                    fmt(v, unit)
                    if not (key in ("proxy_cpu_pct", "cpu_us_per_req") and t == "direct")
                    else "-"
                    for v, t in zip(vals, avail, strict=True)
                ]
                if key == "rps":
                    noisy = [load.get(t, {}).get(conns, {}).get("noisy") for t in avail]
                    cells = [c + (" *" if n else "") for c, n in zip(cells, noisy, strict=True)]
                elif key == "errors":
                    cells = [str(int(v)) if v is not None else "n/a" for v in vals]
                with_ratio = ("rps", "p50_ms", "p90_ms", "p99_ms", "cpu_us_per_req")
                rcell = ratio(lp, bl) if key in with_ratio else ""
                out.append(f"| c={conns} {label} | " + " | ".join(cells) + f" | {rcell} |")
        if any(v.get("noisy") for per in load.values() for v in per.values()):
            out.append(
                "\n\\* other processes used more than --noise % of a core during every try"
                " of this step.\n"
            )
        else:
            out.append("")
    st = res.get("stream", {}).get("summary", {})
    many = res.get("many", {})
    rss = res.get("rss", {})
    if st or many:
        cfg = res["config"]
        out.append("| streaming and memory | " + " | ".join(avail) + " | llmproxy / baseline |")
        out.append("|---" * (len(avail) + 2) + "|")

        def row(label: str, get: Any, unit: str = " ms", with_ratio: bool = True) -> None:
            vals = [get(t) for t in avail]
            lp, bl = get("llmproxy"), get("baseline")
            out.append(
                f"| {label} | "
                + " | ".join(fmt(v, unit) for v in vals)
                + f" | {ratio(lp, bl) if with_ratio else ''} |"
            )

        pace = f"{cfg['chunks']} events x {cfg['pace_ms']} ms"
        row(f"stream TTFB, median ({pace})", lambda t: st.get(t, {}).get("ttfb_ms"))
        row("stream first event, median", lambda t: st.get(t, {}).get("first_event_ms"))
        row(
            "first-event overhead vs direct",
            lambda t: st.get(t, {}).get("overhead_first_event_ms"),
            with_ratio=False,
        )
        row(
            f"event gap median (pacing {cfg['pace_ms']} ms)",
            lambda t: st.get(t, {}).get("gap_median_ms"),
            with_ratio=False,
        )
        row("event gap max", lambda t: st.get(t, {}).get("gap_max_ms"), with_ratio=False)
        out.append(
            "| buffered? | "
            + " | ".join(
                ("yes" if st[t]["buffered"] else "no") if t in st else "n/a" for t in avail
            )
            + " | |"
        )
        n = cfg["streams"]
        out.append(
            f"| {n} streams open together: ok | "
            + " | ".join(f"{many[t]['ok']}/{many[t]['n']}" if t in many else "n/a" for t in avail)
            + " | |"
        )
        row(f"{n} streams: first event p50", lambda t: many.get(t, {}).get("first_event_p50_ms"))
        row(f"{n} streams: first event p99", lambda t: many.get(t, {}).get("first_event_p99_ms"))
        row(f"{n} streams: first event max", lambda t: many.get(t, {}).get("first_event_max_ms"))
        row("RSS idle", lambda t: rss.get(t, {}).get("idle_mib"), " MiB")
        row("RSS peak", lambda t: rss.get(t, {}).get("peak_mib"), " MiB")
        out.append("")
    slow = res.get("slow_client")
    if slow:
        out.append(
            f"Slow client through llmproxy: {slow['bytes'] / 2**20:.0f} MiB read at "
            f"{res['config']['slow_rate']} MiB/s in {slow['seconds']} s"
            f" (complete: {slow['complete']}); "
            f"llmproxy RSS start {slow['rss_start_mib']:.1f} / peak {slow['rss_peak_mib']:.1f} / "
            f"end {slow['rss_end_mib']:.1f} MiB.\n"
        )
    w = res.get("workers")
    if w and "error" not in w:
        w1, wn = w.get("llmproxy-w1"), w.get(f"llmproxy-w{w['workers']}")
        if w1 and wn:
            out.append(
                f"Workers, c={w['conns']}, daemons and load generator free to use every core: "
                f"--workers 1 {fmt(w1['rps'])} req/s (p99 {fmt(w1['p99_ms'], ' ms')}, CPU "
                f"{fmt(w1['proxy_cpu_pct'], '%')}), "
                f"--workers {w['workers']} {fmt(wn['rps'])} req/s "
                f"(p99 {fmt(wn['p99_ms'], ' ms')}, CPU {fmt(wn['proxy_cpu_pct'], '%')}): "
                f"{ratio(wn['rps'], w1['rps'])}.\n"
            )
    elif w:
        out.append(f"Workers comparison failed: {w['error']}\n")
    out.append("| target (llmproxy, one process, one core) | measured | verdict |")
    out.append("|---|---|---|")
    for goal, measured, verdict in targets_met(res):
        out.append(f"| {goal} | {measured} | {verdict} |")
    prof = res.get("profile")
    if prof and "error" not in prof:
        out.append(
            f"\nProfile of llmproxy's reactor thread under c={max(res['config']['conns'])} load"
            f" (py-spy, {prof['samples']} samples), self time:\n"
        )
        out += [f"- {pct}% {frame}" for pct, frame in prof["self"][:12]]
        out.append("\nInclusive (llmproxy code and notable Twisted calls):\n")
        out += [f"- {pct}% {frame}" for pct, frame in prof["inclusive"][:20]]
    elif prof:
        out.append(f"\nProfile: {prof['error']}")
    for note in res.get("notes", []):
        out.append(f"\nNote: {note}")
    return "\n".join(out) + "\n"


def to_rst(md: str) -> str:
    """The markdown report as reStructuredText (for docs/performance.rst to include)."""
    out: list[str] = []
    table: list[list[str]] = []

    def cell(text: str) -> str:
        text = text.strip().replace("*", "\\*")
        if text == "-":
            return "\\-"
        return text.replace("`", "``")

    def flush() -> None:
        if not table:
            return
        out.extend([".. list-table::", "   :header-rows: 1", ""])
        for row in table:
            out.append(("   * - " + cell(row[0])).rstrip())
            out.extend(("     - " + cell(c)).rstrip() for c in row[1:])
        out.append("")
        table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            if not set(line.strip()) <= set("|-: "):
                table.append(line.strip().strip("|").split(" | "))
            continue
        flush()
        out.append(line.replace("`", "``"))
    flush()
    return "\n".join(out) + "\n"


def chart(res: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no chart (pip install matplotlib)")
        return False
    avail = res["available"]
    colors = {"direct": "#9e9e9e", "llmproxy": "#1f77b4", "baseline": "#ff7f0e"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    load = res.get("load", {}).get("summary", {})
    conns = [str(c) for c in res["config"]["conns"]]
    width = 0.8 / max(1, len(avail))
    ax = axes[0][0]
    for i, t in enumerate(avail):
        vals = [load.get(t, {}).get(c, {}).get("rps") or 0 for c in conns]
        bars = ax.bar(
            [j + i * width for j in range(len(conns))], vals, width, label=t, color=colors.get(t)
        )
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(
        [j + width * (len(avail) - 1) / 2 for j in range(len(conns))], [f"c={c}" for c in conns]
    )
    ax.set_ylabel("requests/s")
    ax.set_title("Throughput, non-stream chat completions")
    ax.legend()
    ax = axes[0][1]
    for i, t in enumerate(avail):
        for k, (key, hatch) in enumerate((("p50_ms", ""), ("p99_ms", "//"))):
            vals = [load.get(t, {}).get(c, {}).get(key) or 0 for c in conns]
            ax.bar(
                [j + i * width + k * width / 2 for j in range(len(conns))],
                vals,
                width / 2,
                color=colors.get(t),
                hatch=hatch,
                edgecolor="white",
                label=f"{t} {key[:3]}",
            )
    if load:
        ax.set_yscale("log")
    ax.set_xticks(
        [j + width * (len(avail) - 1) / 2 for j in range(len(conns))], [f"c={c}" for c in conns]
    )
    ax.set_ylabel("ms (log)")
    ax.set_title("Latency p50 (plain) and p99 (hatched)")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1][0]
    st = res.get("stream", {}).get("summary", {})
    many = res.get("many", {})
    labels = [
        "stream TTFB",
        "first event",
        f"{res['config']['streams']} streams\nfirst event p99",
        f"{res['config']['streams']} streams\nfirst event max",
    ]
    for i, t in enumerate(avail):
        vals = [
            st.get(t, {}).get("ttfb_ms"),
            st.get(t, {}).get("first_event_ms"),
            many.get(t, {}).get("first_event_p99_ms"),
            many.get(t, {}).get("first_event_max_ms"),
        ]
        bars = ax.bar(
            [j + i * width for j in range(len(labels))],
            [v or 0 for v in vals],
            width,
            label=t,
            color=colors.get(t),
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    if st or many:
        ax.set_yscale("log")
    ax.set_xticks(
        [j + width * (len(avail) - 1) / 2 for j in range(len(labels))], labels, fontsize=8
    )
    ax.set_ylabel("ms (log)")
    ax.set_title("Streaming: time to first byte / event")
    ax.legend()
    ax = axes[1][1]
    samples = res.get("rss", {}).get("samples", {})
    for t, pts in samples.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=t, color=colors.get(t, None))
    for at, name in res.get("rss", {}).get("phases", []):
        ax.axvline(at, color="#cccccc", linewidth=0.8)
        ax.text(
            at,
            ax.get_ylim()[1] * 0.98 if ax.get_ylim()[1] else 1,
            name,
            rotation=90,
            fontsize=7,
            va="top",
            ha="right",
        )
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("RSS MiB")
    ax.set_title("Proxy memory over the run")
    ax.legend()
    m = res["machine"]
    fig.suptitle(
        f"llmproxy benchmark {res['date']} - {m['nproc']} CPUs {m['cpu_model']} - "
        f"proxies on 1 core - load: {res['config']['generator']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# --------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="llmproxy benchmark: direct vs llmproxy vs stock Twisted",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--quick", action="store_true", help="smoke run: short steps, fewer streams")
    p.add_argument(
        "--report",
        metavar="RESULT.json",
        help="only redraw the table and chart of a recorded run (the only argument)",
    )
    p.add_argument("--duration", type=float, help="seconds per load step (10; quick 3)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up load per target (3; quick 1)")
    p.add_argument("--connections", default="1,10,100", help="keep-alive connections per step")
    p.add_argument("--rounds", type=int, help="interleaved rounds of the load steps (2; quick 1)")
    p.add_argument("--stream-runs", type=int, help="paced streams per target (10; quick 5)")
    p.add_argument("--chunks", type=int, default=20, help="events in the paced stream")
    p.add_argument("--pace-ms", type=int, default=50, help="ms between the paced stream's events")
    p.add_argument("--streams", type=int, help="streams open together (1000; quick 200)")
    p.add_argument(
        "--streams-ramp",
        type=float,
        help="seconds over which they are started (default: 100 new streams a second)",
    )
    p.add_argument("--slow-bytes", help="body size the slow client reads (1GB; quick 128MB)")
    p.add_argument("--slow-rate", type=float, default=64.0, help="slow client read rate, MiB/s")
    p.add_argument("--workers", type=int, default=2, help="compare --workers 1 with this (0: skip)")
    p.add_argument("--workers-conns", type=int, default=100)
    p.add_argument("--skip", default="", help="comma-separated: load,stream,many,slow,workers")
    p.add_argument(
        "--quiet",
        type=float,
        help="before each load step wait until other processes use at most this %% of a core"
        " (25; -1: do not wait, the default with --quick)",
    )
    p.add_argument("--quiet-wait", type=float, default=60.0, help="longest wait for quiet, s")
    p.add_argument(
        "--noise",
        type=float,
        default=40.0,
        help="a load step during which other processes used more than this %% of a core"
        " is measured again",
    )
    p.add_argument("--noise-retries", type=int, default=2)
    p.add_argument(
        "--profile", action="store_true", help="also sample llmproxy with py-spy under load"
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="setting for the llmproxy daemons (repeatable); by default only"
        " MAX_CONCURRENT_REQUESTS is raised to twice --streams",
    )
    p.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--proxy-cpu", default="1", help="CPU for the two proxies ('' = no pinning)")
    p.add_argument("--loadgen-cpu", default="0", help="CPU for everything else ('' = no pinning)")
    p.add_argument(
        "--python", default=sys.executable, help="interpreter that has llmproxy installed"
    )
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--keep-workdir", action="store_true", help="keep daemon logs and databases")
    a = p.parse_args(argv)
    q = a.quick
    a.duration = a.duration or (3.0 if q else 10.0)
    a.warmup = a.warmup or (1.0 if q else 3.0)
    a.rounds = a.rounds or (1 if q else 2)
    if a.quiet is None:
        a.quiet = -1.0 if q else 25.0
    a.stream_runs = a.stream_runs or (5 if q else 10)
    a.streams = a.streams or (200 if q else 1000)
    a.streams_ramp = a.streams_ramp if a.streams_ramp is not None else a.streams / 100.0
    a.slow_bytes = parse_size(a.slow_bytes or ("128MB" if q else "1GB"))
    a.conns = [int(c) for c in a.connections.split(",") if c]
    # the default cap (100 upstream requests in flight) would queue the
    # concurrent-streams step behind the first 100 streams
    a.daemon_env = {"MAX_CONCURRENT_REQUESTS": str(max(100, 2 * a.streams))}
    for item in a.env:
        name, _, value = item.partition("=")
        a.daemon_env[name] = value
    a.skip = set(filter(None, a.skip.split(",")))
    if a.generator == "auto":
        a.generator = "wrk" if loadgen.have_wrk() else "python"
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        a.proxy_cpu = a.loadgen_cpu = ""
    a.loadgen_cpu_int = int(a.loadgen_cpu) if a.loadgen_cpu else None
    return a


def parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    t = text.strip().upper()
    for u, mul in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mul)
    return int(t)


def write_report(res: dict[str, Any], base: str) -> None:
    """C{base}.md, C{.rst} and C{.png} from a result; prints the table."""
    table = markdown(res)
    with open(base + ".md", "w") as f:
        f.write(table)
    with open(base + ".rst", "w") as f:
        f.write(to_rst(table))
    print(table)
    if chart(res, base + ".png"):
        log(f"chart: {base}.png")
    log(f"results: {base}.json, .md, .rst")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if len(argv) == 2 and argv[0] == "--report":
        # redraw the table and chart of a recorded run
        with open(argv[1]) as f:
            write_report(json.load(f), argv[1].removesuffix(".json"))
        return 0
    a = parse_args(argv)
    stamp = datetime.datetime.now(datetime.UTC)
    workdir = tempfile.mkdtemp(prefix="llmproxy-bench-")
    procs = Processes(workdir)
    monitor = RssMonitor()
    rig = Rig(a, OtherCpu(procs))
    res: dict[str, Any] = {
        "date": stamp.strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(
            shlex.quote(x) for x in ["python", "bench/run.py", *(argv or sys.argv[1:])]
        ),
        "machine": machine(),
        "config": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(a).items()},
    }

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started with SIGINT ignored
    if a.loadgen_cpu:
        os.sched_setaffinity(0, {int(a.loadgen_cpu)})
    try:
        upstream, up_port = start_upstream(a, procs, a.loadgen_cpu)
        bl_port = free_port()
        bl = procs.start(
            "baseline",
            [
                a.python,
                os.path.join(HERE, "baseline_proxy.py"),
                "--port",
                str(bl_port),
                "--upstream",
                f"127.0.0.1:{up_port}",
            ],
            cpu=a.proxy_cpu,
        )
        wait_http(f"http://127.0.0.1:{bl_port}/v1/models", bl, "baseline", procs)
        lp, lp_base, lp_token, why = start_llmproxy(a, procs, "llmproxy", upstream, 1, a.proxy_cpu)
        if lp_token is None:
            rig.notes.append(f"llmproxy not measured: {why}")
            log(rig.notes[-1])
        rig.base = {
            "direct": upstream,
            "llmproxy": lp_base,
            "baseline": f"http://127.0.0.1:{bl_port}",
        }
        rig.token = {"direct": UPSTREAM_KEY, "llmproxy": lp_token or "", "baseline": UPSTREAM_KEY}
        rig.pid = {"llmproxy": lp.pid, "baseline": bl.pid}
        monitor.watch("llmproxy", lp.pid)
        monitor.watch("baseline", bl.pid)
        monitor.start()
        time.sleep(1.0)
        idle = {t: rss_mib(p) for t, p in rig.pid.items()}
        sanity(rig)
        res["available"] = rig.available
        if "load" not in a.skip:
            monitor.phase("load")
            res["load"] = phase_load(rig)
            _status, res["upstream_stats"] = http_json(upstream + "/__bench/stats")
            log(f"upstream: {res['upstream_stats']}")
        if "stream" not in a.skip:
            monitor.phase("stream")
            res["stream"] = phase_stream(rig)
        if a.profile and "llmproxy" in rig.available:
            monitor.phase("profile")
            res["profile"] = phase_profile(rig)
        if "many" not in a.skip:
            monitor.phase(f"{a.streams} streams")
            res["many"] = phase_many(rig)
        res["rss"] = {t: {"idle_mib": idle[t], "peak_mib": monitor.peak[t]} for t in rig.pid}
        if "slow" not in a.skip and "llmproxy" in rig.available:
            res["slow_client"] = phase_slow_client(rig, monitor)
        if "workers" not in a.skip and a.workers > 1 and "llmproxy" in rig.available:
            res["workers"] = phase_workers(rig, procs, monitor, upstream)
        res["rss"]["samples"] = {t: monitor.samples[t] for t in ("llmproxy", "baseline")}
        res["rss"]["phases"] = monitor.phases
        res["notes"] = rig.notes
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        procs.stop_all()
        return 130
    finally:
        monitor.stopping.set()
        procs.stop_all()
        if not a.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs and databases kept in {workdir}")
    os.makedirs(a.out, exist_ok=True)
    name = stamp.strftime("%Y%m%d-%H%M%S") + ("-quick" if a.quick else "")
    base = os.path.join(a.out, name)
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1, default=str)
    write_report(res, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
