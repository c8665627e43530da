"""
A lean HTTP/1.1 client for the one thing the proxy does upstream: send a
request whose body is already in memory (or in the request's temporary
file), get the response headers, and relay the body chunk by chunk with
backpressure.

It replaces Twisted's C{Agent} on the hot path, which spends most of a
proxied request's client-side CPU in machinery the proxy does not need
(URI parsing per request, a line-by-line header parser, a retrying wrapper
and a timer per pooled connection). What the proxy relies on is kept:

- persistent connections, at most C{max_idle} idle ones per upstream,
  closed after C{idle_timeout} seconds of idleness;
- TLS through the same cached endpoints (certificates verified with
  service_identity);
- cancellation of the returned Deferred at any point (connect, waiting for
  headers), which closes the connection;
- response bodies framed by Content-Length, chunked transfer coding or the
  end of the connection, delivered to an C{IProtocol} whose transport
  pauses, resumes and stops the upstream connection;
- a request that fails on a reused connection before any byte of the
  answer arrived is sent once more on a new connection when that is safe
  (an idempotent method), as C{Agent} does;
- failures carry the same types as C{Agent}'s (C{ResponseNeverReceived},
  C{ResponseFailed} with the underlying reasons), so
  L{llmproxy.proxy.forward.describe_failure} maps them alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from llmproxy.eagerwrite import make_eager
from llmproxy.web.headerstore import add_clean
from llmproxy.web.site import no_delay

log = Logger()

#: Largest response head (status line and headers) accepted.
MAX_HEAD = 64 * 1024

#: Longest chunk-size line accepted (extensions included).
MAX_CHUNK_LINE = 4096

#: Methods sent again on a fresh connection when a reused one failed before
#: any byte of the answer arrived (RFC 9110 §9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

#: Methods whose empty body is still announced with C{Content-Length: 0}.
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


#: How a body ended, made once (a Failure is costly to build): completely,
#: or with the connection's close where nothing else framed it.
_DONE = Failure(ResponseDone())
_UNFRAMED_END = Failure(PotentialDataLoss())


class BadResponse(Exception):
    """The upstream's answer is not HTTP/1.x this client can frame."""


@implementer(IPushProducer)
class _BodyTransport:
    """
    What a body protocol sees as its transport: flow control over the
    upstream connection, valid only while that body is being delivered.
    """

    __slots__ = ("_conn", "paused")

    def __init__(self, conn: UpstreamConnection) -> None:
        self._conn = conn
        self.paused = False

    def pauseProducing(self) -> None:
        conn = self._conn
        if conn._body_transport is self and not self.paused:
            self.paused = True
            conn.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        conn = self._conn
        if conn._body_transport is self and self.paused:
            self.paused = False
            if not conn._hold_pause:
                conn.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        """Nobody wants the rest of the body: drop the connection."""
        conn = self._conn
        if conn._body_transport is self:
            conn._abandon()


class UpstreamResponse:
    """The parts of C{twisted.web.iweb.IResponse} the proxy uses."""

    __slots__ = ("version", "code", "phrase", "headers", "length", "_conn")

    def __init__(
        self,
        version: bytes,
        code: int,
        phrase: bytes,
        headers: Headers,
        length: Any,
        conn: UpstreamConnection,
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        #: An int, or C{UNKNOWN_LENGTH} (chunked, or until the connection closes).
        self.length = length
        self._conn = conn

    def deliverBody(self, protocol: Any) -> None:
        self._conn._deliver(protocol)


# Connection states.
_IDLE = 0
_WAITING = 1  # request sent, no complete head yet
_BODY = 2  # head parsed, body under way
_CLOSED = 3

# Body framings.
_NONE = 0
_LENGTH = 1
_CHUNKED = 2
_UNTIL_CLOSE = 3


class UpstreamConnection(Protocol):
    """One HTTP/1.1 connection to an upstream; one request at a time."""

    def __init__(self, pool: UpstreamPool, key: Any) -> None:
        self._pool = pool
        self._key = key
        self._state = _IDLE
        self._buf = b""
        self._result: defer.Deferred[UpstreamResponse] | None = None
        self._retry: Callable[[Failure], bool] | None = None
        self._head_method = False
        self._reusable = False
        self._received = False
        self._framing = _NONE
        self._remaining = 0
        self._chunk_state = 0  # 0: size line, 1: data, 2: CRLF after data, 3: trailers
        self._protocol: Any = None
        # While nobody reads the body yet: what arrived, and how it ended.
        self._held: list[bytes] | None = None
        self._held_end: tuple[Failure, bool] | None = None
        self._hold_pause = False
        self._body_transport: _BodyTransport | None = None
        self._producer: Any = None
        self._gone = False
        self.idle_since = 0.0
        self.lost: defer.Deferred[None] = defer.Deferred()

    # -- sending ----------------------------------------------------------------------

    def send(
        self,
        method: bytes,
        head: bytes,
        body: bytes | IBodyProducer | None,
        result: defer.Deferred[UpstreamResponse],
        retry: Callable[[Failure], bool] | None,
    ) -> None:
        """Write one request (C{head}: request line and headers, no blank line)."""
        self._state = _WAITING
        self._result = result
        self._retry = retry
        self._head_method = method == b"HEAD"
        self._received = False
        self._reusable = True
        transport = self.transport
        assert transport is not None
        if body is None:
            if method in _BODY_METHODS:
                transport.write(head + b"Content-Length: 0\r\n\r\n")
            else:
                transport.write(head + b"\r\n")
        elif isinstance(body, bytes):
            transport.write(b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body))
        else:
            transport.write(b"%sContent-Length: %d\r\n\r\n" % (head, body.length))
            self._produce(body)

    def _produce(self, producer: Any) -> None:
        """Stream a large body; the connection is not reused if it is cut short."""
        transport: Any = self.transport
        self._producer = producer
        transport.registerProducer(producer, True)
        d = producer.startProducing(transport)

        def done(result: Any) -> None:
            if self._producer is not producer:
                return
            self._producer = None
            transport.unregisterProducer()
            if isinstance(result, Failure):
                log.failure("reading the request body failed", result)
                self._abandon(result)

        d.addBoth(done)

    def _stop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            self._reusable = False
            try:
                producer.stopProducing()
            except Exception:
                pass  # it may have finished in the meantime
            if not self._gone:
                self.transport.unregisterProducer()  # type: ignore[union-attr]

    # -- Protocol -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        # Under TLS the socket is the wrapper's own transport.
        socket_transport = getattr(transport, "transport", None) or transport
        make_eager(socket_transport)
        no_delay(socket_transport)

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _BODY:
            self._body_data(data)
            return
        if state != _WAITING or self._result is None:
            # Bytes nobody asked for: the connection cannot be trusted any more.
            self._abandon()
            return
        self._received = True
        buf = self._buf + data if self._buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._abandon(Failure(BadResponse("response head too large")))
                    return
                self._buf = buf
                return
            try:
                response = self._parse_head(buf[:end])
            except BadResponse:
                self._abandon(Failure())
                return
            buf = buf[end + 4 :]
            if response is not None:
                break
            # An interim (1xx) answer: the real one follows.
        self._buf = b""
        self._state = _BODY
        result, self._result = self._result, None
        self._retry = None
        if self._producer is not None and response.code >= 300:
            # The upstream answered before taking the whole body (413, for
            # instance): stop sending it.
            self._stop_producer()
        result.callback(response)
        if self._state == _BODY and self._protocol is None:
            # Nobody reads the body yet: hold what came and leave the rest on the socket.
            self._held = []
            self._hold_pause = True
            self.transport.pauseProducing()  # type: ignore[union-attr]
        if buf or self._framing == _NONE:
            self._body_data(buf)

    def _parse_head(self, head: bytes) -> UpstreamResponse | None:
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        version = status[0]
        if len(status) < 2 or not version.startswith(b"HTTP/1.") or len(status[1]) != 3:
            raise BadResponse("malformed status line")
        try:
            code = int(status[1])
        except ValueError:
            raise BadResponse("malformed status code") from None
        if 100 <= code < 200 and code != 101:
            return None
        if code == 101 or code < 100:
            raise BadResponse("unexpected status code")
        if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
            raise BadResponse("line break inside a header line")
        phrase = status[2] if len(status) > 2 else b""
        headers = Headers()
        length = -1
        chunked = False
        close = version == b"HTTP/1.0"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name[-1:] in b" \t" or line[:1] in b" \t":
                raise BadResponse("malformed header line")
            value = value.strip(b" \t")
            lname = name.lower()
            if lname == b"content-length":
                if not value.isdigit():
                    raise BadResponse("malformed Content-Length")
                n = int(value)
                if length >= 0 and n != length:
                    raise BadResponse("conflicting Content-Length")
                length = n
            elif lname == b"transfer-encoding":
                if value.lower().rsplit(b",", 1)[-1].strip() != b"chunked":
                    raise BadResponse("unsupported Transfer-Encoding")
                chunked = True
            elif lname == b"connection":
                tokens = value.lower()
                if b"close" in tokens:
                    close = True
                elif b"keep-alive" in tokens and version == b"HTTP/1.0":
                    close = False
            try:
                add_clean(headers, name, value)
            except ValueError:
                raise BadResponse("malformed header name") from None
        if self._head_method or code in (204, 304):
            self._framing = _NONE
            out_length: Any = 0
        elif chunked:
            self._framing = _CHUNKED
            self._chunk_state = 0
            out_length = UNKNOWN_LENGTH
            if length >= 0:
                close = True  # both framings announced: never reuse (RFC 9112 §6.3)
        elif length > 0:
            self._framing = _LENGTH
            self._remaining = length
            out_length = length
        elif length == 0:
            self._framing = _NONE
            out_length = 0
        else:
            self._framing = _UNTIL_CLOSE
            out_length = UNKNOWN_LENGTH
            close = True
        if close:
            self._reusable = False
        return UpstreamResponse(version, code, phrase, headers, out_length, self)

    # -- the body ---------------------------------------------------------------------

    def _deliver(self, protocol: Any) -> None:
        if self._protocol is not None or self._body_transport is not None:
            raise RuntimeError("the body is already being delivered")
        self._protocol = protocol
        body_transport = self._body_transport = _BodyTransport(self)
        protocol.makeConnection(body_transport)
        held, self._held = self._held, None
        if held is None:
            return
        for piece in held:
            if self._protocol is not protocol:
                return
            protocol.dataReceived(piece)
        held_end, self._held_end = self._held_end, None
        if held_end is not None:
            self._end_body(*held_end)
        elif self._hold_pause:
            self._hold_pause = False
            if self._state == _BODY and not body_transport.paused and not self._gone:
                self.transport.resumeProducing()  # type: ignore[union-attr]

    def _emit(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(data)
        elif self._held is not None:
            self._held.append(data)

    def _body_data(self, data: bytes) -> None:
        framing = self._framing
        if framing == _LENGTH:
            remaining = self._remaining
            n = len(data)
            if n < remaining:
                self._remaining = remaining - n
                self._emit(data)
                return
            self._remaining = 0
            if n > remaining:
                self._reusable = False  # bytes after the body: the stream is out of step
                data = data[:remaining]
            self._emit(data)
            self._body_complete()
        elif framing == _CHUNKED:
            self._chunked(data)
        elif framing == _UNTIL_CLOSE:
            if data:
                self._emit(data)
        else:
            if data:
                self._reusable = False
            self._body_complete()

    def _chunked(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pos = 0
        end = len(buf)
        while pos < end and self._state == _BODY:
            state = self._chunk_state
            if state == 1:
                take = min(self._remaining, end - pos)
                piece = buf[pos : pos + take] if (pos or take != end) else buf
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._chunk_state = 2
                self._emit(piece)
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > MAX_CHUNK_LINE:
                    self._abandon(Failure(BadResponse("chunk line too long")))
                else:
                    self._buf = buf[pos:]
                return
            line = buf[pos:eol]
            pos = eol + 2
            if state == 0:
                size_text = line.split(b";", 1)[0].strip(b" \t")
                try:
                    if not size_text.isalnum():
                        raise ValueError(size_text)
                    size = int(size_text, 16)
                except ValueError:
                    self._abandon(Failure(BadResponse("malformed chunk size")))
                    return
                if size:
                    self._remaining = size
                    self._chunk_state = 1
                else:
                    self._chunk_state = 3
            elif state == 2:
                if line:
                    self._abandon(Failure(BadResponse("chunk longer than its size")))
                    return
                self._chunk_state = 0
            elif not line:  # the blank line that ends the (ignored) trailers
                if pos < end:
                    self._reusable = False
                self._body_complete()
                return

    def _body_complete(self) -> None:
        self._end_body(_DONE, self._reusable and self._producer is None)

    def _end_body(self, reason: Failure, reusable: bool) -> None:
        if self._state != _BODY:
            return
        protocol = self._protocol
        if protocol is None:
            # Ended before anyone asked for the body: tell whoever asks.
            if self._held_end is None:
                self._held_end = (reason, reusable)
            return
        self._protocol = None
        body_transport, self._body_transport = self._body_transport, None
        if reusable and not self._gone:
            self._state = _IDLE
            if self._hold_pause or (body_transport is not None and body_transport.paused):
                self._hold_pause = False
                self.transport.resumeProducing()  # type: ignore[union-attr]
            self._pool._release(self)
        else:
            self._state = _CLOSED
            self._reusable = False
            self._pool._discard(self)
            if not self._gone:
                self.transport.loseConnection()  # type: ignore[union-attr]
        protocol.connectionLost(reason)

    def _abandon(self, why: Failure | None = None) -> None:
        """Drop the connection now; whoever waits on it hears C{why}."""
        self._reusable = False
        self._pool._discard(self)
        state, self._state = self._state, _CLOSED
        if not self._gone:
            self._gone = True
            self.transport.abortConnection()  # type: ignore[union-attr]
        reason = why or Failure(ConnectionAborted())
        if state == _WAITING:
            result, self._result = self._result, None
            if result is not None:
                result.errback(ResponseNeverReceived([reason]))
        elif state == _BODY:
            self._state = _BODY
            self._end_body(Failure(ResponseFailed([reason])), False)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if reason is None:
            reason = Failure(ConnectionDone())
        self._gone = True
        self._pool._discard(self)
        self._stop_producer()
        state = self._state
        if state == _WAITING:
            self._state = _CLOSED
            result, self._result = self._result, None
            retry, self._retry = self._retry, None
            if result is not None and not (
                not self._received and retry is not None and retry(reason)
            ):
                result.errback(ResponseNeverReceived([reason]))
        elif state == _BODY:
            if self._framing == _UNTIL_CLOSE:
                self._end_body(_UNFRAMED_END, False)
            else:
                self._end_body(Failure(ResponseFailed([reason])), False)
        if self._held_end is None:
            self._state = _CLOSED
        # Twisted's TCP client and its connector refer to each other and
        # nothing breaks that when the connection ends: break it here, so
        # both (and this protocol) are freed at once, not by the collector.
        connector = getattr(self.transport, "connector", None)
        if connector is not None:
            connector.transport = None
        self.lost.callback(None)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: UpstreamPool, key: Any) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._pool, self._key)


class Origin:
    """One upstream's address, with what every request to it repeats."""

    __slots__ = ("scheme", "host", "port", "key", "host_header", "factory")

    def __init__(self, scheme: bytes, host: bytes, port: int, pool: UpstreamPool) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.key = (scheme, host, port)
        default = 443 if scheme == b"https" else 80
        name = b"[" + host + b"]" if b":" in host else host
        self.host_header = name if port == default else b"%s:%d" % (name, port)
        self.factory = _ConnectionFactory(pool, self.key)


class _Attempt:
    """One request on its way: where it is sent, and how to cancel or retry it."""

    __slots__ = (
        "pool",
        "origin",
        "method",
        "head",
        "body",
        "result",
        "conn",
        "connecting",
        "retried",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        origin: Origin,
        method: bytes,
        head: bytes,
        body: bytes | IBodyProducer | None,
    ) -> None:
        self.pool = pool
        self.origin = origin
        self.method = method
        self.head = head
        self.body = body
        self.result: defer.Deferred[UpstreamResponse] = defer.Deferred(self._cancel)
        self.conn: UpstreamConnection | None = None
        self.connecting: defer.Deferred[Any] | None = None
        self.retried = False

    def send(self, conn: UpstreamConnection, retry: Callable[[Failure], bool] | None) -> None:
        self.conn = conn
        conn.send(self.method, self.head, self.body, self.result, retry)

    def retry(self, reason: Failure) -> bool:
        """A reused connection closed before answering: send once more if that is safe."""
        replayable = self.method in IDEMPOTENT and (
            self.body is None or isinstance(self.body, bytes)
        )
        if self.retried or not replayable or self.result.called:
            return False
        self.retried = True
        log.debug("reused upstream connection closed before answering; retrying once")
        self.connect()
        return True

    def connect(self) -> None:
        origin = self.origin
        try:
            endpoint = self.pool._endpoint_for(origin.scheme, origin.host, origin.port)
            connecting = endpoint.connect(origin.factory)
        except Exception:
            self.result.errback()
            return
        self.connecting = connecting
        connecting.addCallbacks(self._connected, self._not_connected)

    def _connected(self, conn: UpstreamConnection) -> None:
        self.connecting = None
        if self.result.called:
            conn.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.send(conn, None)

    def _not_connected(self, failure: Failure) -> None:
        self.connecting = None
        if not self.result.called:
            self.result.errback(failure)

    def _cancel(self, result: defer.Deferred[UpstreamResponse]) -> None:
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()
            return
        conn = self.conn
        if conn is not None:
            conn._result = None
            conn._abandon()


class UpstreamPool:
    """
    Keeps idle connections per upstream and sends requests over them.

    @param endpoint_for: C{(scheme, host, port) -> IStreamClientEndpoint}.
    @param max_idle: idle connections kept per upstream; more are closed.
    @param idle_timeout: seconds an idle connection is kept.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint_for: Callable[[bytes, bytes, int], IStreamClientEndpoint],
        *,
        max_idle: int = 100,
        idle_timeout: float = 90.0,
    ) -> None:
        self._reactor = reactor
        self._endpoint_for = endpoint_for
        self.max_idle = max(1, max_idle)
        self.idle_timeout = idle_timeout
        self._idle: dict[Any, list[UpstreamConnection]] = {}
        self._sweep_call: Any = None
        self._origins: dict[tuple[bytes, bytes, int], Origin] = {}

    def origin(self, scheme: bytes, host: bytes, port: int) -> Origin:
        key = (scheme, host, port)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = Origin(scheme, host, port, self)
        return origin

    def idle_count(self, origin: Origin) -> int:
        return len(self._idle.get(origin.key, ()))

    # -- requests ---------------------------------------------------------------------

    def request(
        self,
        origin: Origin,
        method: bytes,
        path: bytes,
        headers: Headers | Sequence[tuple[bytes, bytes]],
        body: bytes | IBodyProducer | None = None,
    ) -> defer.Deferred[UpstreamResponse]:
        """
        Send C{method path} with C{headers} (a L{Headers}, or C{(name,
        value)} pairs in sending order; Host and Content-Length are added)
        and fire with the response once its head arrived.
        """
        if isinstance(headers, Headers):
            headers = [(n, v) for n, values in headers.getAllRawHeaders() for v in values]
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s" % (
            method,
            path,
            origin.host_header,
            b"".join([b"%s: %s\r\n" % pair for pair in headers]),
        )
        attempt = _Attempt(self, origin, method, head, body)
        conn = self._take(origin.key)
        if conn is not None:
            attempt.send(conn, attempt.retry)
        else:
            attempt.connect()
        return attempt.result

    # -- the idle pool ----------------------------------------------------------------

    def _take(self, key: Any) -> UpstreamConnection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = self._reactor.seconds()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < self.idle_timeout and not conn._gone:
                return conn
            conn._abandon()
        return None

    def _release(self, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn._key, [])
        if len(idle) >= self.max_idle:
            conn._state = _CLOSED
            conn.transport.loseConnection()  # type: ignore[union-attr]
            return
        conn.idle_since = self._reactor.seconds()
        idle.append(conn)
        if self._sweep_call is None:
            self._sweep_call = self._reactor.callLater(self.idle_timeout, self._sweep)

    def _discard(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn._key)
        if idle and conn in idle:
            idle.remove(conn)

    def _sweep(self) -> None:
        """Close connections idle longer than the timeout; run while any are idle."""
        self._sweep_call = None
        now = self._reactor.seconds()
        oldest = now
        for idle in self._idle.values():
            keep = []
            for conn in idle:
                if now - conn.idle_since >= self.idle_timeout:
                    conn._state = _CLOSED
                    if conn.transport is not None:
                        conn.transport.loseConnection()
                else:
                    keep.append(conn)
                    oldest = min(oldest, conn.idle_since)
            idle[:] = keep
        if any(self._idle.values()):
            delay = max(0.5, oldest + self.idle_timeout - now)
            self._sweep_call = self._reactor.callLater(delay, self._sweep)

    def close_idle(self) -> defer.Deferred[Any]:
        """Close every idle connection; fires once they are all closed."""
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        waits = []
        for idle in self._idle.values():
            for conn in idle:
                conn._state = _CLOSED
                waits.append(conn.lost)
                if conn.transport is not None:
                    conn.transport.loseConnection()
            idle.clear()
        return defer.DeferredList(waits)
