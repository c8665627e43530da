"""
The benchmark's upstream: llmproxy's own fake OpenAI upstream
(L{llmproxy.testing.fake_upstream}) behind a fast path for the one request
the throughput steps repeat.

The fake upstream is a twisted.web server: about 3,000 requests/s on one core,
less than the proxies it is meant to measure. So at start this script asks the
fake once for the answer to the benchmark's request (C{--request FILE}, the
exact body bench/run.py sends) and from then on answers byte-identical
requests on a keep-alive connection with that recorded answer, from a plain
Protocol that does nothing else. Any other request (streams, C{X-Fake-*}
knobs, big bodies, other paths) is handed to the fake upstream's own
HTTPChannel on the same connection, so every other behaviour is the fake's;
once that answer is complete the fast path takes the connection back.

C{GET /__bench/stats} answers how many requests took each path.

It also forgets what the fake recorded every second (flat memory over
hundreds of thousands of requests), listens with a deep backlog (a thousand
streams at once are not slowed by SYN retries) and keeps Python's full
garbage collections from pausing it (see L{start}).

    python bench/upstream.py --port 9999 --request body.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import Any

import treq
from twisted.internet import endpoints, reactor, task
from twisted.internet.protocol import Factory, Protocol

from llmproxy.testing.fake_upstream import FakeUpstream

SKIP_HEADERS = {b"date", b"server", b"content-length", b"transfer-encoding", b"connection"}
STATS = {"fast": 0, "handed_over": 0}


class FastPath(Protocol):
    """Answers the recorded request itself; anything else goes to the fake."""

    def __init__(self, factory: FastFactory, addr: Any) -> None:
        self.factory = factory
        self.addr = addr
        self.buf = b""
        self.delegate: Any = None
        self.delegate_busy = False

    def dataReceived(self, data: bytes) -> None:
        if self.delegate_busy:
            self.delegate.dataReceived(data)
            return
        self.buf += data
        f = self.factory
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            if head.startswith(b"get /__bench/stats http/1.1"):
                self.buf = self.buf[end + 4 :]
                body = json.dumps(STATS).encode()
                self.transport.write(  # type: ignore[union-attr]
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                continue
            if not head.startswith(b"post /v1/chat/completions http/1.") or b"x-fake-" in head:
                return self._hand_over()
            start = head.find(b"\r\ncontent-length:")
            if start < 0:
                return self._hand_over()
            stop = head.find(b"\r\n", start + 2)
            length = int(head[start + 17 : stop if stop > 0 else len(head)])
            total = end + 4 + length
            if len(self.buf) < total:
                return
            if self.buf[end + 4 : total] != f.request_body:
                return self._hand_over()
            close = b"\r\nconnection: close" in head or (
                head.startswith(b"post /v1/chat/completions http/1.0\r\n")
                and b"\r\nconnection: keep-alive" not in head
            )
            self.buf = self.buf[total:]
            STATS["fast"] += 1
            self.transport.write(f.close_answer if close else f.answer)  # type: ignore[union-attr]
            if close:
                self.transport.loseConnection()  # type: ignore[union-attr]
                return

    def _hand_over(self) -> None:
        """Let the fake's own HTTPChannel answer this request (then take over again)."""
        STATS["handed_over"] += 1
        if self.delegate is None:
            self.delegate = self.factory.site.buildProtocol(self.addr)
            self.delegate.makeConnection(self.transport)
            channel = getattr(self.delegate, "wrappedProtocol", self.delegate)
            # twisted.web wraps its HTTPChannel in a protocol that could switch to HTTP/2
            channel = getattr(channel, "_channel", channel)
            request_done = channel.requestDone

            def done(request: Any) -> None:
                request_done(request)
                channel.setTimeout(None)  # idle time is ours to judge, not the channel's
                self.delegate_busy = False

            channel.requestDone = done
        self.delegate_busy = True
        data, self.buf = self.buf, b""
        self.delegate.dataReceived(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.delegate is not None:
            self.delegate.connectionLost(reason)


class FastFactory(Factory):
    noisy = False

    def __init__(self, site: Any, request_body: bytes, status: int, headers: Any, body: bytes):
        self.site = site
        self.request_body = request_body
        lines = [b"HTTP/1.1 %d OK" % status]
        for name, values in headers.getAllRawHeaders():
            if name.lower() not in SKIP_HEADERS:
                lines += [name + b": " + v for v in values]
        lines.append(b"Content-Length: %d" % len(body))
        self.answer = b"\r\n".join(lines) + b"\r\n\r\n" + body
        self.close_answer = b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body

    def buildProtocol(self, addr: Any) -> FastPath:
        return FastPath(self, addr)


async def start(port: int, backlog: int, request_body: bytes) -> None:
    fake = FakeUpstream(clock=reactor)
    inner = fake.listen(reactor)  # the fake on a private port, to record its answer
    response = await treq.post(
        inner.url + "/v1/chat/completions",
        data=request_body,
        headers={"content-type": "application/json"},
        persistent=False,
    )
    body = await treq.content(response)
    await inner.stop()
    if response.code != 200:
        raise SystemExit(f"the fake upstream answered {response.code}: {body[:200]!r}")
    factory = FastFactory(fake.site(), request_body, response.code, response.headers, body)
    endpoint = endpoints.TCP4ServerEndpoint(reactor, port, backlog=backlog, interface="127.0.0.1")
    await endpoint.listen(factory)
    task.LoopingCall(fake.reset).start(1.0, now=False)
    task.LoopingCall(_report).start(10.0, now=False)
    # The upstream must not stall the streams it serves: Python's full
    # collections, over every stream this process has answered, paused it
    # for 30-70 ms while a thousand streams were open (the largest first-event
    # time of every target, direct included). Start-up objects are frozen and
    # full passes practically never run; young passes still free short-lived
    # garbage, and a run leaves a few tens of MiB uncollected at most.
    gc.collect()
    gc.freeze()
    gc.set_threshold(2_000, 10, 1_000_000)
    print(f"upstream on 127.0.0.1:{port} (recorded answer: {len(body)} bytes)", flush=True)


def _report() -> None:
    print(f"fast answers {STATS['fast']}, requests handed over {STATS['handed_over']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--request", required=True, help="file with the benchmark's request body")
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args()
    with open(args.request, "rb") as f:
        request_body = f.read()

    def go() -> None:
        from twisted.internet import defer

        d = defer.ensureDeferred(start(args.port, args.backlog, request_body))

        def failed(failure: Any) -> None:
            print(f"upstream failed to start: {failure.getErrorMessage()}", file=sys.stderr)
            reactor.stop()  # type: ignore[attr-defined]

        d.addErrback(failed)

    reactor.callWhenRunning(go)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
