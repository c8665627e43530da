"""
Eager writes for TCP transports.

A stock Twisted TCP transport buffers every C{write}, asks epoll to report
the socket writable (one C{epoll_ctl}), sends on the next loop turn, and
asks epoll to stop reporting it (another C{epoll_ctl}). For a proxy that
answers each request with one or two writes, that round trip is a
noticeable share of the CPU spent per request and adds a loop turn of
latency.

Here the buffered bytes are sent at the end of the reactor turn in which
they were written: one C{send} per connection per turn, however many
writes were made, and no epoll registration unless the kernel's buffer is
full (then the transport falls back to the stock behaviour until it has
drained). Backpressure, half-close, C{loseConnection} and
C{abortConnection} keep their stock meaning because the stock C{doWrite}
does the sending.

L{make_eager} changes the class of a live C{tcp.Server} or C{tcp.Client}
to a subclass that does this (Twisted creates the transport, so there is
no other place to choose its class, adopted and socket-activated ports
included). Other transports, and reactors without the POSIX base, are left
as they are.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class _Flusher:
    """Per reactor: the transports written to during this turn."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.dirty: list[Any] = []
        self.call: Any = None

    def mark(self, transport: Any) -> None:
        self.dirty.append(transport)
        if self.call is None:
            self.call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self.call = None
        dirty, self.dirty = self.dirty, []
        disconnect = self.reactor._disconnectSelectable
        for transport in dirty:
            transport._eager_pending = False
            if transport._eager_registered or transport.disconnected:
                continue
            transport._eager_wants = True
            try:
                why = transport.doWrite()
            except BaseException:
                why = sys.exc_info()[1]
                log.failure("writing to a connection failed", Failure())
            if why:
                disconnect(transport, why, False)
            elif transport._eager_wants and not transport.disconnected:
                # The kernel took only part of it: wait for writability as usual.
                transport._eager_registered = True
                transport.reactor.addWriter(transport)


_flushers: dict[int, _Flusher] = {}


def _flusher(reactor: Any) -> _Flusher:
    flusher = _flushers.get(id(reactor))
    if flusher is None or flusher.reactor is not reactor:
        flusher = _flushers[id(reactor)] = _Flusher(reactor)
    return flusher


class _EagerMixin:
    _eager_pending = False
    _eager_registered = False
    _eager_wants = False

    def startWriting(self) -> None:
        if self._eager_registered or self._eager_pending:
            return
        self._eager_pending = True
        _flusher(self.reactor).mark(self)  # type: ignore[attr-defined]

    def stopWriting(self) -> None:
        self._eager_wants = False
        if self._eager_registered:
            self._eager_registered = False
            self.reactor.removeWriter(self)  # type: ignore[attr-defined]


class EagerServer(_EagerMixin, tcp.Server):  # type: ignore[misc]
    """A C{tcp.Server} that sends at the end of the turn (see the module)."""


class EagerClient(_EagerMixin, tcp.Client):  # type: ignore[misc]
    """A C{tcp.Client} that sends at the end of the turn (see the module)."""


_EAGER = {tcp.Server: EagerServer, tcp.Client: EagerClient}


def make_eager(transport: Any) -> None:
    """Switch a plain TCP transport to eager writes; anything else is left alone."""
    eager = _EAGER.get(type(transport))
    if eager is None or not hasattr(transport.reactor, "_disconnectSelectable"):
        return
    transport.__class__ = eager
    if transport._tempDataBuffer or transport.dataBuffer:
        # Already written to the stock way, so already waiting for writability.
        transport._eager_registered = True
