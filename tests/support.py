"""Helpers shared by the test modules that talk to a real daemon over HTTP."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol

#: status, response headers (as the server spelled them), decoded JSON body (None when
#: empty, the text when it is not JSON).
Reply = tuple[int, dict[str, str], Any]


def http_json(
    url: str,
    method: str = "GET",
    body: Any = None,
    raw: bytes | None = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> Reply:
    """
    One blocking request with an optional JSON body (or C{raw} bytes) and
    bearer token; HTTP error statuses are returned, not raised.
    """
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", "Bearer " + token)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, response_headers, content = (
                response.status,
                dict(response.headers),
                response.read(),
            )
    except urllib.error.HTTPError as e:
        status, response_headers, content = e.code, dict(e.headers), e.read()
    try:
        decoded = json.loads(content) if content else None
    except ValueError:
        decoded = content.decode("utf-8", "replace")
    return status, response_headers, decoded


def poll(check: Callable[[], Any], seconds: float, interval: float = 0.02) -> tuple[Any, float]:
    """
    Call C{check} until it returns something true or C{seconds} pass; the
    last result and the time it took (measured from the first call).
    """
    started = time.monotonic()
    while True:
        result = check()
        elapsed = time.monotonic() - started
        if result or elapsed > seconds:
            return result, elapsed
        time.sleep(interval)


class LineSink:
    """A file-like object that keeps what is written to it (for C{AccessLog})."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, s: str) -> int:
        self.lines.extend(s.splitlines(keepends=True))
        self.writes = getattr(self, "writes", 0) + 1
        return len(s)

    def flush(self) -> None:
        pass


class BodyCollector(Protocol):
    """Reads a response body (C{deliverBody}), remembering its chunks and how it ended."""

    def __init__(self, on_data: Callable[[BodyCollector, bytes], Any] | None = None) -> None:
        self.chunks: list[bytes] = []
        self.reason: Any = None
        self.done: defer.Deferred[None] = defer.Deferred()
        self.on_data = on_data

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.on_data is not None:
            self.on_data(self, data)

    def connectionLost(self, reason: Any = None) -> None:
        # Kept aside: a Deferred fired with a Failure would fail instead.
        self.reason = reason
        self.done.callback(None)

    async def ended(self) -> Any:
        """The reason the body ended (a Failure: ResponseDone when complete)."""
        await self.done
        return self.reason
