"""
Backpressure: a slow client reading a 200 MB answer must not make the
proxy buffer it. Measured as bytes waiting in the proxy's client-side
transport and as the process's resident memory, never as time.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.trial.unittest import TestCase

from llmproxy.testing.fake_upstream import FakeUpstream
from tests.test_proxy import make_harness

SIZE = 200 * 1024 * 1024
#: The client stops reading for a while after each slice of this size.
SLICE = 4 * 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def buffered(transport: Any) -> int:
    """Bytes a twisted TCP transport holds that the kernel has not taken yet."""
    if transport is None:
        return 0
    pending = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
    return pending + getattr(transport, "_tempDataLen", 0)


class SlowReader(Protocol):
    """Sends a GET, then reads in slices with pauses, hashing as it goes."""

    def __init__(self, request: bytes, sample: Any) -> None:
        self.request = request
        self.sample = sample
        self.received = 0
        self.since_pause = 0
        self.head = b""
        self.headers_done = False
        self.digest = hashlib.sha256()
        self.done: defer.Deferred[None] = defer.Deferred()
        self.pauses = 0

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self.headers_done:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            self.head, _, data = self.head.partition(b"\r\n\r\n")
            self.headers_done = True
        self.received += len(data)
        self.since_pause += len(data)
        if self.since_pause >= SLICE:
            self.since_pause = 0
            self.pauses += 1
            self.transport.pauseProducing()  # type: ignore[union-attr]
            reactor.callLater(0.05, self._resume)

    def _resume(self) -> None:
        self.sample()
        if self.transport is not None:
            self.transport.resumeProducing()

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(None)


class BackpressureTests(TestCase):
    timeout = 300

    async def test_slow_client_does_not_grow_proxy_memory(self) -> None:
        fake = FakeUpstream(clock=reactor)
        listening = fake.listen(reactor)
        self.addCleanup(listening.stop)
        h = await make_harness(self, listening.url, max_response_capture=65536)
        secret, _ = h.add_token()
        peaks = {"buffered": 0, "rss": 0}
        rss_before = rss_bytes()

        def sample() -> None:
            total = sum(buffered(c.transport) for c in list(h.site._channels))
            peaks["buffered"] = max(peaks["buffered"], total)
            peaks["rss"] = max(peaks["rss"], rss_bytes())

        request = (
            b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
            b"Authorization: Bearer " + secret.encode() + b"\r\n"
            b"X-Fake-Body-Bytes: " + str(SIZE).encode() + b"\r\n\r\n"
        )
        reader = SlowReader(request, sample)
        factory = ClientFactory.forProtocol(lambda: reader)
        port = h.url.rsplit(":", 1)[1]
        reactor.connectTCP("127.0.0.1", int(port), factory)
        await reader.done
        self.assertIn(b"200 OK", reader.head.split(b"\r\n", 1)[0])
        self.assertIn(b"Content-Length: %d" % SIZE, reader.head)
        self.assertEqual(reader.received, SIZE, reader.head)
        self.assertGreater(reader.pauses, 10)
        # The proxy never held more than a few socket buffers' worth...
        self.assertLess(peaks["buffered"], 8 * 1024 * 1024, peaks)
        # ...and the process did not grow by anything like the body size.
        self.assertLess(peaks["rss"] - rss_before, 64 * 1024 * 1024, (peaks, rss_before))
        record = h.observer.finished[-1]
        self.assertEqual(record.bytes_sent, SIZE)
        self.assertEqual(len(record.response_body), 65536)
        self.assertIsNone(record.error_kind)
        print(
            f"\n200 MB through a slow client: peak bytes buffered in the proxy "
            f"{peaks['buffered']} B, RSS growth {(peaks['rss'] - rss_before) / 1e6:.1f} MB"
        )
