"""
The HTTP site: request-body cap, in-flight tracking for draining, and a
cheap access log.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import IO, Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site
from twisted.web.server import version as server_version

from llmproxy.eagerwrite import make_eager
from llmproxy.reopen import ReopenableFile
from llmproxy.web.clientip import TrustedProxies
from llmproxy.web.headerstore import set_clean

log = Logger()

REQUEST_ID = b"x-request-id"
CORRELATION_ID = b"x-correlation-id"
#: Request bodies of a known length below this are kept in memory, larger
#: or chunked ones in a temporary file (as Twisted does).
BODY_IN_MEMORY = 100_000


def client_ip(request: Request) -> str:
    """
    The site's L{TrustedProxies} answer, when it has some (C{TRUSTED_PROXIES});
    else the reference's rule: the first X-Forwarded-For entry, else
    X-Real-IP, else the peer address.
    """
    site = getattr(request, "site", None) or getattr(
        getattr(request, "channel", None), "site", None
    )
    trusted = getattr(site, "trusted_proxies", None)
    if trusted is not None:
        return trusted.client_of(request)  # type: ignore[no-any-return]
    xff = request.getHeader(b"x-forwarded-for")
    if xff:
        first = xff.split(b",", 1)[0].strip()
        if first:
            return first.decode("latin-1")
    real = request.getHeader(b"x-real-ip")
    if real and real.strip():
        return real.strip().decode("latin-1")
    peer = request.getClientAddress()
    return getattr(peer, "host", "") or ""


def no_delay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off: streamed events are small writes, and
    waiting for the previous one's ACK delays them (by up to the peer's
    delayed-ACK time on a real network). Transports without TCP ignore it.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


def http_date() -> bytes:
    """The current time as an HTTP date, formatted once per second."""
    now = int(time.time())
    if _date[0] != now:
        _date[0] = now
        _date[1] = http.datetimeToString(now)
    return _date[1]  # type: ignore[no-any-return]


_date: list[Any] = [0, b""]


def new_request_id() -> str:
    """
    A random (version 4) UUID as text, eight times cheaper than
    C{str(uuid.uuid4())}: the random bytes come from the OS 256 ids at a time.
    """
    pool = _random_hex
    pos = pool[1]
    if pos >= len(pool[0]):
        pool[0] = os.urandom(4096).hex()
        pos = 0
    pool[1] = pos + 32
    h = pool[0][pos : pos + 32]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


#: Unused random hex digits, and the position of the next unused one.
_random_hex: list[Any] = ["", 0]

#: RFC 4122 variant: the two high bits of the clock sequence are 10.
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def _json_str(text: str) -> str:
    """C{json.dumps(text)}, without its cost for the usual plain ASCII text."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return '"' + text + '"'
    return json.dumps(text)


def _phrase(code: int) -> bytes | None:
    """The standard reason phrase of C{code}, or None for a code without one."""
    try:
        return HTTPStatus(code).phrase.encode("ascii")
    except ValueError:
        return None


class LLMProxyRequest(Request):
    """
    A request that refuses bodies above the site's size cap while they
    arrive (413 JSON, connection closed), and remembers when it started.
    """

    request_id: str = ""
    #: Set by the proxy once computed (see L{client_ip}), for the access log.
    client_ip: str | None = None
    body_limit_hit: bool = False
    #: Called once with the reason if the connection is lost before the
    #: answer is complete: what C{notifyFinish().addErrback} does, without
    #: a Deferred per request.
    on_connection_lost: Callable[[Failure], Any] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = time.monotonic()
        self._body_received = 0

    def process(self) -> None:
        if self.body_limit_hit:
            # Already answered 413; the rest of the body must not reach a resource.
            return
        site = self.channel.site  # type: ignore[attr-defined]
        site.request_started(self)
        proxy = site.proxy_resource
        path = self.path
        if proxy is None or not (path.startswith(b"/v1/") or path == b"/v1"):
            super().process()
            return
        # The proxy's route, as Request.process would reach it, without the
        # generic resource traversal (and with the Date header made once a second).
        self.site = site
        set_clean(self.responseHeaders, b"Server", [server_version])
        set_clean(self.responseHeaders, b"Date", [http_date()])
        self.prepath = [b"v1"]
        self.postpath = []
        try:
            self.render(proxy)
        except BaseException:
            self.processingFailed(Failure())

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        # Twisted's table has no phrase for 429 and a few others ("Unknown Status").
        if message is None and code not in http.RESPONSES:
            message = _phrase(code)
        super().setResponseCode(code, message)

    def finish(self) -> None:
        # The answer is complete: the callback is not needed any more, and
        # dropping it breaks the request -> callback -> relay -> request
        # cycle, so the request is freed at once instead of by the cyclic
        # garbage collector (whose passes were the latency tail under load).
        self.on_connection_lost = None
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        # Nothing will be produced for a connection that is gone; the
        # producer (a body relay, which holds this request) is let go, so
        # both are freed by reference counting instead of by the collector.
        self.producer = None
        lost, self.on_connection_lost = self.on_connection_lost, None
        if lost is not None:
            lost(reason)

    def gotLength(self, length: int | None) -> None:
        limit = self.channel.site.max_request_size  # type: ignore[attr-defined]
        if length is not None and length > limit:
            self._reject_too_large(limit)
            # Still create a (tiny) buffer so the parser has somewhere to put
            # the bytes it sees before the connection closes.
            super().gotLength(0)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_limit_hit:
            return
        self._body_received += len(data)
        limit = self.channel.site.max_request_size  # type: ignore[attr-defined]
        if self._body_received > limit:
            self._reject_too_large(limit)
            return
        super().handleContentChunk(data)

    def _reject_too_large(self, limit: int) -> None:
        """
        Answer 413 before the body is read, then close. The request never
        reaches a resource, so nothing has been accepted or stored.
        """
        self.body_limit_hit = True
        if self.content is not None:
            self.content.close()
        self.content = io.BytesIO()
        body = json.dumps(
            {
                "error": "Request body too large",
                "code": "request_too_large",
                "description": f"request bodies are limited to {limit} bytes",
            }
        ).encode()
        transport: Any = self.channel.transport
        transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n" + body
        )
        site: LLMProxySite = self.channel.site  # type: ignore[attr-defined]
        site.access_log.line(self, 413, len(body))
        # Half-close so the client can read the answer, then make sure the
        # connection goes away even if it keeps sending.
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
        site.clock.callLater(5, transport.abortConnection)
        # Read nothing more from this connection.
        self.channel.pauseProducing()


class AccessLog:
    """
    One line per request written straight to a buffered stream: formatting
    through the twisted.logger machinery costs ~20% of proxy CPU, this does
    not. Flushed every second and on stop.
    """

    #: Lines held before they are written in one go (also written every second).
    BATCH = 256

    def __init__(self, stream: IO[str] | ReopenableFile | None, fmt: str = "json") -> None:
        self._stream = stream
        self._json = fmt == "json"
        # Whole lines, written together: fewer system calls than the stream's
        # own small buffer, and a line is never split between two writes.
        self._lines: list[str] = []

    @classmethod
    def from_setting(cls, setting: str, fmt: str) -> AccessLog:
        if setting.lower() in ("off", "none", "false", ""):
            return cls(None, fmt)
        if setting == "-":
            return cls(sys.__stdout__, fmt)
        return cls(ReopenableFile(setting, "a", encoding="utf-8", buffering=65536), fmt)

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    @property
    def to_file(self) -> bool:
        """Whether the lines go to a file of ours (which SIGHUP reopens)."""
        return isinstance(self._stream, ReopenableFile)

    def line(self, request: Request, status: int, size: int) -> None:
        stream = self._stream
        if stream is None:
            return
        started = getattr(request, "started", None)
        ms = (time.monotonic() - started) * 1000.0 if started is not None else 0.0
        # Path only: query strings may carry things that must not be logged.
        path = request.uri.split(b"?", 1)[0].decode("latin-1")
        method = request.method.decode("latin-1")
        rid = getattr(request, "request_id", "")
        ip = getattr(request, "client_ip", None)
        if ip is None:
            ip = client_ip(request)
        if self._json:
            self._lines.append(
                '{"ts":%.3f,"msg":"request","client_ip":%s,"method":%s,"path":%s,'
                '"status_code":%d,"bytes":%d,"duration_ms":%.2f,"request_id":%s}\n'
                % (
                    time.time(),
                    _json_str(ip),
                    _json_str(method),
                    _json_str(path),
                    status,
                    size,
                    ms,
                    _json_str(rid),
                )
            )
        else:
            self._lines.append(f'{ip} "{method} {path}" {status} {size} {ms:.2f}ms {rid}\n')
        if len(self._lines) >= self.BATCH:
            self.flush()

    def reopen(self) -> None:
        """Write what is held to the old file, then go on in a new one (SIGHUP)."""
        self.flush()
        if isinstance(self._stream, ReopenableFile):
            self._stream.reopen()

    def flush(self) -> None:
        stream = self._stream
        if stream is None:
            return
        lines, self._lines = self._lines, []
        try:
            if lines:
                stream.write("".join(lines))
            stream.flush()
        except (OSError, ValueError):
            pass


_CLOSED_CLEANLY = Failure(ConnectionDone())


#: Bodies for requests the channel refuses before they are parsed.
_UNPARSEABLE = {
    400: b'{"error":"Bad request","code":"bad_request",'
    b'"description":"the request is not valid HTTP/1.1"}',
    408: b'{"error":"Request timeout","code":"request_timeout",'
    b'"description":"the request head did not arrive within REQUEST_TIMEOUT, '
    b'or its body paused for longer"}',
    431: b'{"error":"Request header fields too large","code":"request_headers_too_large",'
    b'"description":"request line and headers are limited to 16384 bytes and 500 headers"}',
}


class LLMProxyChannel(http.HTTPChannel):
    """
    The HTTP/1.1 channel: tells its site when it closes, makes its transport
    send at the end of the reactor turn (L{make_eager}), asks the kernel for
    its local address once, and writes a response head as one piece.
    (C{HTTPChannel.connectionMade} already turns Nagle off on TCP.)
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        transport = self.transport
        make_eager(transport)
        # Every request asks for the local address; it cannot change during
        # a connection, so ask the kernel once.
        host = transport.getHost()  # type: ignore[union-attr]
        self.getHost = lambda: host  # type: ignore[method-assign]

    #: Fires L{_read_timed_out} while a request is only partly received.
    _read_deadline: Any = None

    def connectionLost(self, reason: Failure = _CLOSED_CLEANLY) -> None:
        site = getattr(self, "site", None)
        if site is not None:
            site._channels.discard(self)
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        # A request that did not arrive whole in this read has the site's
        # request_timeout (REQUEST_TIMEOUT) for its head, counted from here,
        # and its body may not pause for longer than that (a large upload on
        # a slow link may take longer in all). A request that arrives in one
        # read, the usual case, costs no timer.
        if self._handlingRequest or not (self.requests or self._buffer):
            return
        timeout = self.site.request_timeout  # type: ignore[attr-defined]
        if timeout <= 0:
            return
        if self._read_deadline is None:
            self._read_deadline = self.site.clock.callLater(timeout, self._read_timed_out)  # type: ignore[attr-defined]
        elif not self.line_mode:  # in the body: it is still arriving
            self._read_deadline.reset(timeout)

    def allContentReceived(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None
        super().allContentReceived()

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self._handlingRequest or not (self.requests or self._buffer):
            return
        transport = self.transport
        if transport is None or transport.disconnecting:  # type: ignore[attr-defined]
            return
        if self.requests and self.requests[-1].startedWriting:
            self.loseConnection()  # already answered (413 while the body arrived)
            return
        self._refuse(408)

    def lineLengthExceeded(self, line: bytes) -> None:
        # A request line or a header line over MAX_LENGTH (16 KiB); Twisted
        # would close the connection without a word.
        self._refuse(431)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's answer to a request it cannot parse is a bare 400.
        too_large = (
            self._receivedHeaderSize > self.totalHeadersSize
            or self._receivedHeaderCount > self.maxHeaders
        )
        self._refuse(431 if too_large else 400)

    def _refuse(self, status: int) -> None:
        """Answer a request that never became one with a JSON error, and close."""
        body = _UNPARSEABLE[status]
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, _phrase(status) or b"", len(body), body)
        )
        self.loseConnection()

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """
        As Twisted's, but as one C{bytes} written once: Twisted's hands the
        transport some sixty small pieces, each checked on its own.
        """
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        lines = b"".join(
            [
                b"%s: %s\r\n" % (name, value)
                for name, values in headers.getAllRawHeaders()
                for value in values
            ]
        )
        self.transport.write(b"%s %s %s\r\n%s\r\n" % (version, code, reason, lines))  # type: ignore[union-attr]


class LLMProxySite(Site):
    """
    A L{Site} that tracks in-flight requests and open connections so the web
    service can stop accepting, let requests finish, and close the rest.
    """

    requestFactory = LLMProxyRequest
    # The HTTP/1.1 channel itself, without the wrapper that would negotiate
    # HTTP/2 over TLS (one function call less on every read and write).
    protocol = LLMProxyChannel  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        resource: Any,
        *,
        clock: IReactorTime,
        max_request_size: int,
        access_log: AccessLog | None = None,
        request_timeout: float = 30.0,
        idle_timeout: float | None = 60.0,
        trusted_proxies: TrustedProxies | None = None,
    ) -> None:
        # Never parse POST bodies as HTML forms: nothing here reads form
        # arguments, and Twisted's parse of Content-Type (through the email
        # package) cost ~12% of the proxy's CPU. Each request takes this
        # setting from the site in its constructor.
        super().__init__(
            resource, timeout=idle_timeout, parsePOSTFormSubmission=False, reactor=clock
        )
        # Twisted's channel timeout (idle_timeout) closes a connection that
        # sends nothing for that long, between requests or within a slow one;
        # request_timeout bounds the arrival of each request (LLMProxyChannel).
        self.request_timeout = request_timeout
        self.clock = clock
        self.max_request_size = max_request_size
        self.access_log = access_log or AccessLog(None)
        #: Whose forwarding headers L{client_ip} believes (None: everyone's).
        self.trusted_proxies = trusted_proxies
        self._in_flight: set[Request] = set()
        self._channels: set[http.HTTPChannel] = set()
        self._idle_waiters: list[defer.Deferred[None]] = []
        self.draining = False

    def getContentFile(self, length: int | None) -> IO[bytes]:
        """
        Where a request's body goes: memory below L{BODY_IN_MEMORY} bytes,
        else a temporary file (Twisted's own choice). Defined here because
        Twisted's request looks this method up on the site and, without it,
        pays for a caught C{AttributeError} on every request.
        """
        if length is not None and length < BODY_IN_MEMORY:
            return io.BytesIO()
        return tempfile.TemporaryFile()

    @property
    def proxy_resource(self) -> Any:
        """The C{/v1} resource, reached without traversal (see L{LLMProxyRequest.process})."""
        return getattr(self.resource, "proxy", None)

    # -- connection tracking -------------------------------------------------

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if channel is not None:
            self._channels.add(channel)
        return channel

    # -- request tracking ----------------------------------------------------

    def request_started(self, request: Request) -> None:
        self._in_flight.add(request)
        request.notifyFinish().addBoth(self._request_done, request, request.channel)

    def _request_done(self, result: Any, request: Request, channel: Any) -> None:
        self._in_flight.discard(request)
        if result is not None:
            # The connection went away before the answer was complete, so
            # Request.finish() (and with it Site.log) never runs: log it
            # here, as 499 when nothing had been sent yet.
            status = request.code if request.startedWriting else 499
            self.access_log.line(request, status, request.sentLength)
        if self.draining and channel is not None:
            # Do not keep idle keep-alive connections once we are stopping.
            channel.persistent = False
        if not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def when_idle(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if not self._in_flight:
            d.callback(None)
        else:
            self._idle_waiters.append(d)
        return d

    def start_draining(self) -> None:
        """Close idle connections; busy ones close after their response."""
        self.draining = True
        busy = {r.channel for r in self._in_flight}
        for channel in list(self._channels):
            if channel in busy:
                channel.persistent = False
            elif channel.transport is not None:
                channel.transport.loseConnection()

    def abort_all(self) -> int:
        n = len(self._in_flight)
        for channel in list(self._channels):
            if channel.transport is not None:
                channel.transport.abortConnection()  # type: ignore[attr-defined]
        return n

    # -- logging -------------------------------------------------------------

    def log(self, request: Any) -> None:
        self.access_log.line(request, request.code, request.sentLength)
