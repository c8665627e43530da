"""
Talking to the provider: cached upstream endpoints, request-body
producers, and the relay that streams an upstream body to the client
chunk by chunk with backpressure.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import IO, Any

from twisted.internet import defer, error, task
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    ResponseDone,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import Interface, implementer

log = Logger()

#: Bodies up to this size are sent from memory in one write; larger ones are
#: streamed from the request's temporary file.
SMALL_BODY = 256 * 1024


# -- endpoints ------------------------------------------------------------------------


class CachedEndpointFactory:
    """
    One endpoint per (scheme, host, port), built once (IDNA encoding and
    TLS options are not redone per connection).
    """

    def __init__(
        self,
        reactor: Any,
        tls_policy: BrowserLikePolicyForHTTPS,
        connect_timeout: float,
    ) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._connect_timeout = connect_timeout
        self._cache: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpoint_for(self, scheme: bytes, host: bytes, port: int) -> IStreamClientEndpoint:
        key = (scheme, host, port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            endpoint = plain_endpoint(self._reactor, host, port, self._connect_timeout)
            if scheme == b"https":
                creator = self._tls_policy.creatorForNetloc(host, port)
                endpoint = wrapClientTLS(creator, endpoint)
            elif scheme != b"http":
                raise SchemeNotSupported(f"unsupported scheme {scheme!r}")
            self._cache[key] = endpoint
        return endpoint


def plain_endpoint(reactor: Any, host: bytes, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    A TCP endpoint for C{host}: an IP address is connected to directly;
    a name goes through L{HostnameEndpoint} (resolution in the reactor's
    thread pool, then both address families tried). Resolving an address
    literal would cost a thread round trip on every new connection.
    """
    text = host.decode("ascii", "replace")
    if isIPAddress(text):
        return TCP4ClientEndpoint(reactor, text, port, timeout=timeout)
    if isIPv6Address(text):
        return TCP6ClientEndpoint(reactor, text, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


# -- request bodies ---------------------------------------------------------------------


def body_length(content: IO[bytes] | None) -> int:
    if content is None:
        return 0
    content.seek(0, io.SEEK_END)
    n = content.tell()
    content.seek(0)
    return n


def request_body(
    content: IO[bytes] | None, length: int, cooperator: Cooperator | None
) -> bytes | IBodyProducer | None:
    """
    What to send upstream for a request body that has fully arrived
    (twisted.web reads it before render) and is C{length} bytes long: the
    bytes themselves when small (written with the request head in one go),
    a producer streaming it from the request's temporary file when large,
    None when empty.
    """
    if content is None or length == 0:
        return None
    if length <= SMALL_BODY:
        data = content.read()
        content.seek(0)
        return data
    return FileBodyProducer(content, cooperator or task, readSize=65536)


def read_prefix(content: IO[bytes] | None, limit: int) -> bytes:
    """The first C{limit} bytes of a request body (for observers), leaving it rewound."""
    if content is None or limit <= 0:
        return b""
    content.seek(0)
    data = content.read(limit)
    content.seek(0)
    return data


# -- response bodies -------------------------------------------------------------------


class IBodyTap(Interface):
    """
    The per-chunk hook: sees every upstream body chunk right after it was
    written to the client (an SSE usage parser, for instance). It must be
    cheap and keep no more of a chunk than it needs.
    """

    def data_received(chunk: bytes) -> None:
        """One chunk of the upstream body, as it arrived."""

    def body_ended(complete: bool) -> None:
        """The body ended; C{complete} is False when it was cut or abandoned.

        Called before the request observers see the record."""


class IBodyFilter(IBodyTap):
    """
    A tap that may change the body the client receives (e.g. removing a
    usage chunk the proxy asked for on the client's behalf). At most one
    per response; the other taps and the capture see its output.
    """

    def feed(chunk: bytes) -> bytes:
        """One upstream chunk in, the bytes to write to the client out."""

    def flush() -> bytes:
        """The body ended cleanly: whatever is still held back."""


def is_body_filter(tap: Any) -> bool:
    return callable(getattr(tap, "feed", None)) and callable(getattr(tap, "flush", None))


#: Makes the taps for one response: C{(record, upstream_response) -> tap or None};
#: a tap provides L{IBodyTap} (declared or not), a filter also L{IBodyFilter}.
TapFactory = Callable[[Any, Any], Any]

#: Why a relay ended: None (complete), or one of these error kinds.
UPSTREAM_CUT = "upstream_cut"
UPSTREAM_IDLE_TIMEOUT = "upstream_idle_timeout"
CLIENT_ABORTED = "client_aborted"


@implementer(IPushProducer)
class BodyRelay(Protocol):
    """
    Receives the upstream body (C{Response.deliverBody}) and writes each
    chunk to the client request as it arrives.

    It is registered as the request's push producer: when the client's
    socket buffer fills, twisted.web pauses us and we pause the upstream
    transport, so a slow client never makes the proxy buffer the stream.
    While paused by the client the idle timer is off (the silence is ours).

    C{done} fires with None when the body ended cleanly, or with an error
    kind (L{UPSTREAM_CUT}, L{UPSTREAM_IDLE_TIMEOUT}, L{CLIENT_ABORTED}).
    After an upstream failure the client connection is aborted, never
    ended cleanly, so a truncated answer cannot pass for a whole one.
    """

    def __init__(
        self,
        request: Any,
        clock: IReactorTime,
        idle_timeout: float,
        *,
        taps: Sequence[IBodyTap] = (),
        body_filter: IBodyFilter | None = None,
        capture_limit: int = 0,
    ) -> None:
        self.request = request
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.taps = list(taps)
        self.body_filter = body_filter
        self.capture_limit = capture_limit
        self.captured: list[bytes] = []
        self._captured_len = 0
        self.bytes_relayed = 0
        self.done: defer.Deferred[str | None] = defer.Deferred()
        self._idle_call: IDelayedCall | None = None
        self._paused = False
        self._client_gone = False
        self._timed_out = False
        self._finished = False

    # -- Protocol (upstream side) ---------------------------------------------------------

    def connectionMade(self) -> None:
        self.request.registerProducer(self, True)
        if getattr(getattr(self.request, "channel", None), "_waitingForTransport", False):
            # The client's buffer is already full: start paused (twisted.web
            # only tells producers about later changes).
            self.pauseProducing()
        self._arm_idle()

    def dataReceived(self, data: bytes) -> None:
        if self._client_gone or self._finished:
            return
        self._arm_idle()
        if self.body_filter is not None:
            try:
                data = self.body_filter.feed(data)
            except Exception:
                log.failure("body filter failed; passing the body through unchanged")
                self.body_filter = None
            if not data:
                return
        self._relay(data)

    def _relay(self, data: bytes) -> None:
        self.bytes_relayed += len(data)
        self.request.write(data)
        if self._captured_len < self.capture_limit:
            piece = data[: self.capture_limit - self._captured_len]
            self.captured.append(piece)
            self._captured_len += len(piece)
        for tap in self.taps:
            try:
                tap.data_received(data)
            except Exception:
                log.failure("body tap failed; it is skipped from now on")
                self.taps = [t for t in self.taps if t is not tap]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if reason is None:
            reason = Failure(ResponseDone())
        self._cancel_idle()
        if self._finished:
            return
        self._finished = True
        if self._client_gone:
            self.done.callback(CLIENT_ABORTED)
            return
        self.request.unregisterProducer()
        if not self._timed_out and reason.check(ResponseDone, PotentialDataLoss):
            if self.body_filter is not None:
                try:
                    tail = self.body_filter.flush()
                except Exception:
                    log.failure("body filter failed at the end of the body")
                    tail = b""
                if tail:
                    self._relay(tail)
            self.request.finish()
            self.done.callback(None)
            return
        kind = UPSTREAM_IDLE_TIMEOUT if self._timed_out else UPSTREAM_CUT
        log.warn(
            "upstream body ended abnormally ({kind}) after {bytes} bytes; "
            "cutting the client connection",
            kind=kind,
            bytes=self.bytes_relayed,
        )
        abort_client(self.request, self.clock)
        self.done.callback(kind)

    # -- IPushProducer (client side) ------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        self._cancel_idle()
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._paused = False
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        if not self._finished:
            self._arm_idle()

    def stopProducing(self) -> None:
        """The client went away: close the upstream connection at once."""
        self.client_gone()

    def client_gone(self) -> None:
        if self._client_gone or self._finished:
            return
        self._client_gone = True
        self._cancel_idle()
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    # -- idle timer -----------------------------------------------------------------------

    def _arm_idle(self) -> None:
        if self.idle_timeout <= 0 or self._paused:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.idle_timeout)
        else:
            self._idle_call = self.clock.callLater(self.idle_timeout, self._idle_expired)

    def _cancel_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _idle_expired(self) -> None:
        self._idle_call = None
        if self._finished or self._client_gone:
            return
        self._timed_out = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    @property
    def captured_body(self) -> bytes:
        return b"".join(self.captured)


def abort_client(request: Any, clock: IReactorTime | None = None) -> None:
    """
    End the client connection so that the answer visibly did not complete.

    When the response is framed (chunked, or with a Content-Length not yet
    reached), closing after what was already relayed is enough: the client
    sees a body without its end and keeps every event it was sent. Without
    framing a close would look like a clean end, so the connection is
    aborted (RST) instead. A client that does not read what is left is
    aborted after a grace period.
    """
    channel = getattr(request, "channel", None)
    transport = getattr(channel, "transport", None)
    if transport is None:
        return
    framed = bool(getattr(request, "chunked", False)) or request.responseHeaders.hasHeader(
        b"content-length"
    )
    abort = getattr(transport, "abortConnection", None)
    if framed or abort is None:
        transport.loseConnection()
        if clock is not None and abort is not None:
            call = clock.callLater(ABORT_GRACE, _abort_if_connected, transport)
            request.notifyFinish().addBoth(lambda _: call.cancel() if call.active() else None)
    else:
        abort()


#: Seconds a client gets to read the rest of a cut answer before it is aborted.
ABORT_GRACE = 10.0


def _abort_if_connected(transport: Any) -> None:
    if getattr(transport, "connected", False) and not getattr(transport, "disconnected", False):
        transport.abortConnection()


def response_length(length: Any) -> int | None:
    return None if length is UNKNOWN_LENGTH else int(length)


# -- classifying failures -----------------------------------------------------------------


def describe_failure(failure: Failure, timed_out: bool = False) -> tuple[int, str, str, str]:
    """
    Map a failed upstream request (L{llmproxy.proxy.client.UpstreamPool.request})
    to (status, error, code, description).
    The description names the kind of problem, never a secret or a body.
    C{timed_out}: the proxy cancelled the request because no response
    headers came in time.
    """
    if timed_out or failure.check(defer.TimeoutError):
        return 504, "Request timeout", "timeout", "no response headers from upstream in time"
    inner = _inner_reasons(failure)
    for f in inner:
        if f.check(error.DNSLookupError):
            return 502, "Proxy error", "upstream_unreachable", "upstream host name did not resolve"
        if f.check(error.ConnectionRefusedError):
            return 502, "Proxy error", "upstream_unreachable", "upstream refused the connection"
        if f.check(error.TimeoutError, error.TCPTimedOutError):
            return 502, "Proxy error", "upstream_unreachable", "connecting to upstream timed out"
        if _is_tls_failure(f):
            return (
                502,
                "Proxy error",
                "upstream_tls_error",
                "TLS handshake with upstream failed or its certificate did not verify",
            )
        if f.check(error.ConnectError):
            return 502, "Proxy error", "upstream_unreachable", "could not connect to upstream"
    return 502, "Proxy error", "upstream_error", "upstream closed the connection without a response"


def _inner_reasons(failure: Failure) -> list[Failure]:
    out = [failure]
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        for r in reasons:
            if isinstance(r, Failure):
                out.extend(_inner_reasons(r))
    return out


def _is_tls_failure(f: Failure) -> bool:
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - twisted[tls] is a dependency
        return False
    if f.check(SSL.Error):
        return True
    try:
        from service_identity.exceptions import VerificationError
    except ImportError:  # pragma: no cover
        return False
    return bool(f.check(VerificationError))


__all__ = [
    "BodyRelay",
    "CachedEndpointFactory",
    "IBodyFilter",
    "IBodyTap",
    "is_body_filter",
    "TapFactory",
    "abort_client",
    "request_body",
    "describe_failure",
    "read_prefix",
]
