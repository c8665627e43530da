"""
Where the dispatcher delivers batches. A sink's C{send(events)} returns a
Deferred that fires with how many events it dropped for good, or fails
with L{RetryableError} (try again later) or L{PermanentError} (the whole
batch is refused: retrying cannot help).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import threads
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from llmproxy.events.dispatcher.transform import helicone_payload, is_llm_call, lunary_events

log = Logger()

HELICONE_ENDPOINT = "https://api.worker.helicone.ai/custom/v1/log"
LUNARY_ENDPOINT = "https://api.lunary.ai/v1/runs/ingest"


class SinkError(Exception):
    def __init__(self, message: str, done: int = 0) -> None:
        super().__init__(message)
        #: Events at the start of the batch that were delivered before the failure.
        self.done = done


class RetryableError(SinkError):
    """The receiver is down or overloaded: retry the batch later."""


class PermanentError(SinkError):
    """The receiver refused the batch; retrying would not help."""


class ISink(Interface):
    name = Attribute("Service name, for logs.")

    def send(events: list[dict[str, Any]]) -> Any:
        """Deliver a batch; see the module docstring."""


@implementer(ISink)
class FileSink:
    """JSON lines appended to C{path}, fsynced after each batch (in a thread)."""

    name = "file"

    def __init__(self, path: str, reactor: Any) -> None:
        self.path = path
        self.reactor = reactor

    def _write(self, data: bytes) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    async def send(self, events: list[dict[str, Any]]) -> int:
        data = b"".join(
            json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
            for e in events
        )
        try:
            await threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), self._write, data
            )
        except OSError as e:
            raise RetryableError(f"writing {self.path} failed: {e}")
        return 0


def classify(code: int, permanent: frozenset[int] | None = None) -> type[SinkError] | None:
    """None for 2xx; which error a status means otherwise."""
    if 200 <= code < 300:
        return None
    if permanent is not None:
        return PermanentError if code in permanent else RetryableError
    if 400 <= code < 500 and code not in (408, 425, 429):
        return PermanentError
    return RetryableError


class _HTTPSink:
    name = "http"
    permanent: frozenset[int] | None = None

    def __init__(
        self, endpoint: str, api_key: str = "", http: Any = None, timeout: float = 30.0
    ) -> None:
        import treq

        self.endpoint = endpoint
        self.api_key = api_key
        self.http = http if http is not None else treq
        self.timeout = timeout

    def _headers(self) -> dict[bytes, list[bytes]]:
        headers = {b"Content-Type": [b"application/json"]}
        if self.api_key:
            headers[b"Authorization"] = [b"Bearer " + self.api_key.encode("latin-1")]
        return headers

    async def _post(self, payload: Any, done: int = 0) -> None:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        try:
            response = await self.http.post(
                self.endpoint, data=body, headers=self._headers(), timeout=self.timeout
            )
            text = await response.content()
        except Exception as e:
            raise RetryableError(f"POST {self.endpoint} failed: {type(e).__name__}: {e}", done)
        error = classify(response.code, self.permanent)
        if error is not None:
            snippet = text[:200].decode("utf-8", "replace")
            raise error(f"POST {self.endpoint} answered {response.code}: {snippet}", done)


@implementer(ISink)
class WebhookSink(_HTTPSink):
    """POSTs each batch as a JSON array of events (the event schema as-is)."""

    name = "webhook"

    async def send(self, events: list[dict[str, Any]]) -> int:
        await self._post(events)
        return 0


@implementer(ISink)
class LunarySink(_HTTPSink):
    """One POST per batch: a start and an end event per model call."""

    name = "lunary"
    verbose = False

    async def send(self, events: list[dict[str, Any]]) -> int:
        payload = []
        for event in events:
            if is_llm_call(event):
                payload += lunary_events(event, self.verbose)
        if payload:
            await self._post(payload)
        return 0


@implementer(ISink)
class HeliconeSink(_HTTPSink):
    """
    One POST per model call. As in the Go llm-proxy, HTTP 400 and 500 are
    permanent for Helicone: that event is dropped, the rest of the batch
    still goes.
    """

    name = "helicone"
    permanent = frozenset({400, 500})

    async def send(self, events: list[dict[str, Any]]) -> int:
        dropped = 0
        for done, event in enumerate(events):
            if not is_llm_call(event) or event.get("response_body") is None:
                continue
            try:
                await self._post(helicone_payload(event), done)
            except PermanentError as e:
                dropped += 1
                log.warn(
                    "helicone refused event {event_id}: {error}",
                    event_id=event.get("event_id"),
                    error=e,
                )
        return dropped


def make_sink(
    service: str,
    endpoint: str,
    api_key: str,
    reactor: Any,
    http: Any = None,
    verbose: bool = False,
) -> ISink:
    """The sink for C{--service}; raises ValueError for a missing setting."""
    if service == "file":
        if not endpoint:
            raise ValueError("--endpoint (a file path) is required for --service file")
        return FileSink(endpoint, reactor)
    if service == "webhook":
        if not endpoint:
            raise ValueError("--endpoint (a URL) is required for --service webhook")
        return WebhookSink(endpoint, api_key, http)
    if service in ("helicone", "lunary"):
        if not api_key:
            raise ValueError(
                f"--api-key (or LLM_PROXY_API_KEY) is required for --service {service}"
            )
        if service == "helicone":
            return HeliconeSink(endpoint or HELICONE_ENDPOINT, api_key, http)
        sink = LunarySink(endpoint or LUNARY_ENDPOINT, api_key, http)
        sink.verbose = verbose
        return sink
    raise ValueError(f"unknown service {service!r} (choose file, webhook, helicone or lunary)")
