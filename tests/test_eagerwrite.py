"""
Eager writes over real sockets: everything written arrives, in order, when
the kernel's buffer fills; a close after writing sends everything first;
an abort closes at once; writes made from timers are sent too.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from llmproxy.eagerwrite import EagerServer, make_eager
from llmproxy.web.site import LLMProxySite


class Reader(Protocol):
    """Reads everything, optionally pausing now and then; fires C{done} with the bytes."""

    def __init__(self, pause_every: int = 0) -> None:
        self.chunks: list[bytes] = []
        self.received = 0
        self.pause_every = pause_every
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        before, self.received = self.received, self.received + len(data)
        if self.pause_every and before // self.pause_every != self.received // self.pause_every:
            self.transport.pauseProducing()  # type: ignore[union-attr]
            reactor.callLater(0.01, self.transport.resumeProducing)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(b"".join(self.chunks))


class Writer(Protocol):
    """Runs C{action(transport)} once connected, on an eager transport."""

    def __init__(self, action: Any) -> None:
        self.action = action

    def connectionMade(self) -> None:
        make_eager(self.transport)
        self.action(self.transport)


class EagerWriteTests(TestCase):
    async def exchange(self, action: Any, pause_every: int = 0) -> tuple[bytes, Any]:
        transports: list[Any] = []

        def build(addr: Any) -> Writer:
            def run(transport: Any) -> None:
                transports.append(transport)
                action(transport)

            return Writer(run)

        port = reactor.listenTCP(0, Factory.forProtocol(lambda: build(None)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        reader = Reader(pause_every)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await connectProtocol(endpoint, reader)
        data = await reader.done
        return data, transports[0]

    async def test_large_writes_arrive_whole_and_in_order(self) -> None:
        payload = bytes(range(256)) * 40_000  # 10 MB: more than the socket buffers hold

        def write(transport: Any) -> None:
            for i in range(0, len(payload), 65_536):
                transport.write(payload[i : i + 65_536])
            transport.loseConnection()

        data, transport = await self.exchange(write, pause_every=1 << 20)
        self.assertIsInstance(transport, EagerServer)
        self.assertEqual(len(data), len(payload))
        self.assertEqual(data, payload)

    async def test_close_after_write_sends_everything_first(self) -> None:
        def write(transport: Any) -> None:
            transport.write(b"head ")
            transport.writeSequence([b"and ", b"tail"])
            transport.loseConnection()

        data, _ = await self.exchange(write)
        self.assertEqual(data, b"head and tail")

    async def test_writes_from_timers_are_sent(self) -> None:
        def write(transport: Any) -> None:
            reactor.callLater(0.01, transport.write, b"later ")
            reactor.callLater(0.02, transport.write, b"still later")
            reactor.callLater(0.03, transport.loseConnection)

        data, _ = await self.exchange(write)
        self.assertEqual(data, b"later still later")

    async def test_abort_closes_at_once(self) -> None:
        def write(transport: Any) -> None:
            transport.write(b"x" * 100)
            transport.abortConnection()

        data, _ = await self.exchange(write)
        # Whatever made it out before the abort, the connection is closed.
        self.assertLessEqual(len(data), 100)
        await deferLater(reactor, 0, lambda: None)


class ChannelSocketTests(TestCase):
    """The site's HTTP channel: its socket sends eagerly, with Nagle off."""

    async def test_accepted_socket(self) -> None:
        site = LLMProxySite(Resource(), clock=reactor, max_request_size=1024)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol()
        )
        self.addCleanup(client.transport.loseConnection)
        for _ in range(100):
            if site._channels:
                break
            await deferLater(reactor, 0.01, lambda: None)
        (channel,) = site._channels
        handle = channel.transport.getHandle()
        self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        self.assertIsInstance(channel.transport, EagerServer)
