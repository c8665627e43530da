"""
Load generators and stream clients for bench/run.py (standard library only).

* L{wrk_load}: keep-alive load with C{wrk} (preferred: C, one thread);
* L{python_load}: the same measurement with asyncio raw-socket connections,
  used when C{wrk} is not installed (it saturates near 10k requests/s on one
  core, so it understates the fastest targets);
* L{one_stream}: one SSE request on a blocking socket, timing the first byte,
  every event and the end;
* L{many_streams}: N SSE requests opened at once (asyncio), time to first
  event for each;
* L{slow_read}: read a large body at a fixed rate, to watch the proxy's memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of C{values}."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def build_request(url: str, method: str, headers: Mapping[str, str], body: bytes) -> bytes:
    u = urlsplit(url)
    path = u.path + ("?" + u.query if u.query else "")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {u.hostname}:{u.port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _addr(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 80


# --------------------------------------------------------------------- wrk


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def wrk_load(
    url: str,
    conns: int,
    duration: float,
    headers: Mapping[str, str],
    body: bytes,
    method: str = "POST",
    cpu: int | None = None,
) -> dict[str, Any]:
    """Keep-alive load with wrk (1 thread, C{conns} connections) for C{duration} s."""
    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as f:
        f.write(body)
        body_path = f.name
    try:
        cmd = [
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{max(1, int(round(duration)))}s",
            "--timeout",
            "10s",
            "-s",
            os.path.join(HERE, "wrk_report.lua"),
            url,
        ]
        if cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(cpu), *cmd]
        env = dict(
            os.environ,
            WRK_METHOD=method,
            WRK_BODY=body_path if body else "",
            WRK_HEADERS="\n".join(f"{k}: {v}" for k, v in headers.items()),
        )
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 60)
    finally:
        os.unlink(body_path)
    lines = [x for x in out.stdout.splitlines() if x.startswith("WRK_RESULT ")]
    if not lines:
        raise RuntimeError(f"wrk gave no result: {out.stdout[-300:]} {out.stderr[-300:]}")
    r = json.loads(lines[-1].split(" ", 1)[1])
    secs = r["duration_us"] / 1e6
    errors = {k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]}
    return {
        "tool": "wrk",
        "conns": conns,
        "requests": r["requests"],
        "rps": round((r["requests"] - r["status"]) / secs, 1),
        "p50_ms": r["p50_us"] / 1000,
        "p90_ms": r["p90_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "max_ms": r["max_us"] / 1000,
        "errors": errors,
    }


# --------------------------------------------------------------------- asyncio load


class _LoadProtocol(asyncio.Protocol):
    """One keep-alive connection sending the same request until C{stop_at}."""

    def __init__(self, request: bytes, stop_at: float, stats: dict[str, Any]) -> None:
        self.request = request
        self.stop_at = stop_at
        self.stats = stats
        self.buf = bytearray()
        self.end: int | None = None  # body end offset once the headers are in
        self.chunked = False
        self.status = 0
        self.sent_at = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if time.perf_counter() >= self.stop_at:
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.end is None:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head = bytes(self.buf[:i]).lower()
            self.status = int(head[9:12])
            j = head.find(b"\r\ncontent-length:")
            if j >= 0:
                k = head.find(b"\r\n", j + 2)
                length = int(head[j + 17 : k if k > 0 else len(head)])
                self.end = i + 4 + length
                self.chunked = False
            else:
                self.chunked = b"chunked" in head
                self.end = -1
        if self.chunked:
            if not self.buf.endswith(b"0\r\n\r\n"):
                return
        elif self.end is not None and self.end >= 0 and len(self.buf) < self.end:
            return
        elif self.end == -1:
            return  # close-delimited: finished in connection_lost
        self._complete()

    def _complete(self) -> None:
        latency = time.perf_counter() - self.sent_at
        if 200 <= self.status < 300:
            self.stats["latencies"].append(latency)
        else:
            self.stats["status_errors"] += 1
        self.buf.clear()
        self.end = None
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.end == -1 and self.status:
            latency = time.perf_counter() - self.sent_at
            self.stats["latencies"].append(latency)
        elif time.perf_counter() < self.stop_at:
            self.stats["read_errors"] += 1
        if not self.done.done():
            self.done.set_result(None)


async def _python_load(
    url: str, conns: int, duration: float, request: bytes
) -> tuple[dict[str, Any], float]:
    loop = asyncio.get_running_loop()
    stats: dict[str, Any] = {"latencies": [], "status_errors": 0, "read_errors": 0}
    start = time.perf_counter()
    stop_at = start + duration
    host, port = _addr(url)
    protocols = []
    for _ in range(conns):
        try:
            _t, p = await loop.create_connection(
                lambda: _LoadProtocol(request, stop_at, stats), host, port
            )
            protocols.append(p)
        except OSError:
            stats["read_errors"] += 1
    for p in protocols:
        # a connection the server closed (connection: close) is reopened
        while True:
            await p.done
            if time.perf_counter() >= stop_at or p.end != -1:
                break
            try:
                _t, p = await loop.create_connection(
                    lambda: _LoadProtocol(request, stop_at, stats), host, port
                )
            except OSError:
                stats["read_errors"] += 1
                break
    return stats, time.perf_counter() - start


def python_load(
    url: str,
    conns: int,
    duration: float,
    headers: Mapping[str, str],
    body: bytes,
    method: str = "POST",
    cpu: int | None = None,
) -> dict[str, Any]:
    """The wrk measurement with asyncio connections (the fallback generator)."""
    request = build_request(url, method, headers, body)
    stats, secs = asyncio.run(_python_load(url, conns, duration, request))
    lat = [x * 1000 for x in stats["latencies"]]
    errors = {k: stats[k] for k in ("status_errors", "read_errors") if stats[k]}
    return {
        "tool": "python",
        "conns": conns,
        "requests": len(lat) + stats["status_errors"],
        "rps": round(len(lat) / secs, 1),
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else None,
        "errors": errors,
    }


# --------------------------------------------------------------------- streams


class _Dechunker:
    """Incremental HTTP/1.1 chunked-body decoder."""

    def __init__(self) -> None:
        self.buf = b""
        self.left = -1  # -1: expecting a size line; 0: expecting the CRLF after data
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = []
        while not self.finished:
            if self.left == 0:
                if len(self.buf) < 2:
                    break
                self.buf = self.buf[2:]
                self.left = -1
            if self.left < 0:
                i = self.buf.find(b"\r\n")
                if i < 0:
                    break
                size = int(self.buf[:i].split(b";")[0] or b"0", 16)
                self.buf = self.buf[i + 2 :]
                if size == 0:
                    self.finished = True
                    break
                self.left = size
            take = self.buf[: self.left]
            if not take:
                break
            out.append(take)
            self.buf = self.buf[len(take) :]
            self.left -= len(take)
        return b"".join(out)


class _Body:
    """Splits a response into status, headers, and body bytes as they arrive."""

    def __init__(self) -> None:
        self.head = b""
        self.status: int | None = None
        self.dechunk: _Dechunker | None = None
        self.length: int | None = None
        self.got = 0

    def feed(self, data: bytes) -> bytes:
        if self.status is None:
            self.head += data
            i = self.head.find(b"\r\n\r\n")
            if i < 0:
                return b""
            head = self.head[:i].lower()
            self.status = int(head[9:12])
            if b"transfer-encoding: chunked" in head:
                self.dechunk = _Dechunker()
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    self.length = int(line.split(b":", 1)[1])
            data = self.head[i + 4 :]
        if self.dechunk is not None:
            data = self.dechunk.feed(data)
        self.got += len(data)
        return data

    @property
    def finished(self) -> bool:
        if self.dechunk is not None:
            return self.dechunk.finished
        return self.length is not None and self.got >= self.length


def one_stream(url: str, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """
    One streaming request on a fresh blocking socket: ms from sending the
    request to the first byte, to each C{data:} event, and to C{[DONE]}.
    """
    sock = socket.create_connection(_addr(url), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    resp = _Body()
    events: list[float] = []
    pending = b""
    done = False
    first_byte = None
    try:
        t0 = time.perf_counter()
        sock.sendall(build_request(url, "POST", headers, body))
        while not done:
            data = sock.recv(65536)
            now = time.perf_counter()
            if not data:
                break
            if first_byte is None:
                first_byte = now
            pending += resp.feed(data)
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                if event.startswith(b"data:"):
                    events.append(now)
                    if event.strip() == b"data: [DONE]":
                        done = True
            if resp.finished:
                break
    finally:
        sock.close()
    ms = [(t - t0) * 1000 for t in events]
    gaps = [b - a for a, b in zip(ms, ms[1:], strict=False)]
    return {
        "status": resp.status,
        "ok": resp.status == 200 and done,
        "ttfb_ms": (first_byte - t0) * 1000 if first_byte else None,
        "first_event_ms": ms[0] if ms else None,
        "done_ms": ms[-1] if done else None,
        "events": len(ms),
        "gap_median_ms": statistics.median(gaps) if gaps else None,
        "gap_max_ms": max(gaps) if gaps else None,
        # which event came after the longest gap (1 = the second event)
        "gap_max_at": gaps.index(max(gaps)) + 1 if gaps else None,
    }


async def _first_event(
    url: str, request: bytes, at: float, res: dict[str, Any], state: dict[str, int]
) -> None:
    host, port = _addr(url)
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    res["ok"] = False
    try:
        t_connect = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    except OSError as e:
        res["error"] = repr(e)
        return
    state["open"] += 1
    state["peak"] = max(state["peak"], state["open"])
    try:
        t0 = time.perf_counter()
        res["connect_ms"] = (t0 - t_connect) * 1000
        writer.write(request)
        resp = _Body()
        pending = b""
        while True:
            data = await reader.read(65536)
            if not data:
                break
            pending += resp.feed(data)
            if "first_event_ms" not in res:
                if b"data:" not in pending or b"\n\n" not in pending:
                    continue
                res["first_event_ms"] = (time.perf_counter() - t0) * 1000
            if b"data: [DONE]" in pending[-64:] or resp.finished:
                res["done_ms"] = (time.perf_counter() - t0) * 1000
                break
            pending = pending[-64:]
        res["status"] = resp.status
        res["ok"] = resp.status == 200 and "done_ms" in res and "first_event_ms" in res
    except OSError as e:
        res["error"] = repr(e)
    finally:
        state["open"] -= 1
        writer.close()


async def _many(url: str, request: bytes, n: int, ramp: float) -> tuple[list[Any], int]:
    results: list[dict[str, Any]] = [{} for _ in range(n)]
    state = {"open": 0, "peak": 0}
    start = time.perf_counter() + 0.1
    await asyncio.gather(
        *(_first_event(url, request, start + i * ramp / n, results[i], state) for i in range(n))
    )
    return results, state["peak"]


def many_streams(
    url: str, headers: Mapping[str, str], body: bytes, n: int, ramp: float
) -> dict[str, Any]:
    """
    Start C{n} streaming requests evenly over C{ramp} seconds (each on its own
    connection; the streams must last longer than the ramp so that all C{n}
    are open together); per stream, ms from its request to its first event.
    """
    request = build_request(url, "POST", headers, body)
    results, peak = asyncio.run(_many(url, request, n, ramp))
    first = [r["first_event_ms"] for r in results if r.get("first_event_ms") is not None]
    done = [r["done_ms"] for r in results if r.get("ok")]
    errors = [r.get("error") or f"status {r.get('status')}" for r in results if not r.get("ok")]
    return {
        "n": n,
        "ramp_s": ramp,
        "ok": len(done),
        "peak_open": peak,
        "first_event_p50_ms": percentile(first, 50),
        "first_event_p99_ms": percentile(first, 99),
        "first_event_max_ms": max(first) if first else None,
        "connect_max_ms": max((r.get("connect_ms") or 0) for r in results),
        "done_max_ms": max(done) if done else None,
        "errors": errors[:3],
    }


def slow_read(
    url: str,
    headers: Mapping[str, str],
    rate: float,
    sample: Callable[[], float],
    every: float = 0.5,
) -> dict[str, Any]:
    """
    GET C{url} and read its body at about C{rate} bytes/s, calling C{sample()}
    (the proxy's RSS in MiB) every C{every} seconds. Returns the samples.
    """
    sock = socket.create_connection(_addr(url), timeout=60)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    resp = _Body()
    samples: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    next_sample = t0
    read = 0
    try:
        sock.sendall(build_request(url, "GET", headers, b""))
        while not resp.finished:
            now = time.perf_counter()
            if now >= next_sample:
                samples.append((round(now - t0, 2), sample()))
                next_sample += every
            # stay on schedule: sleep while ahead of rate
            ahead = read / rate - (now - t0)
            if ahead > 0:
                time.sleep(min(ahead, 0.05))
                continue
            data = sock.recv(64 * 1024)
            if not data:
                break
            read += len(resp.feed(data))
    finally:
        sock.close()
    samples.append((round(time.perf_counter() - t0, 2), sample()))
    return {
        "status": resp.status,
        "bytes": read,
        "complete": resp.finished,
        "seconds": round(time.perf_counter() - t0, 1),
        "samples": samples,
    }
