"""Which headers cross the proxy in each direction."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llmproxy.proxy.headers import (
    copy_response_headers,
    is_event_stream,
    rfc3339_ns,
    upstream_request_headers,
)


def upstream(
    client: dict[bytes, list[bytes]], uri: bytes = b"/v1/chat/completions", key: str = "sk-real"
) -> Headers:
    pairs = upstream_request_headers(
        Headers(client),
        uri=uri,
        api_key=key,
        project_id="p-1",
        request_id="r-1",
        peer_ip="10.1.2.3",
        started_wall=1.5,
    )
    out = Headers()
    for name, value in pairs:
        out.addRawHeader(name, value)
    return out


class UpstreamHeaderTests(SynchronousTestCase):
    def test_proxy_headers_added_and_client_ones_replaced(self) -> None:
        h = upstream(
            {
                b"authorization": [b"Bearer sk-client"],
                b"x-request-id": [b"mine"],
                b"host": [b"proxy.example"],
                b"content-length": [b"12"],
                b"x-proxy-id": [b"forged"],
            }
        )
        self.assertEqual(h.getRawHeaders(b"authorization"), [b"Bearer sk-real"])
        self.assertEqual(h.getRawHeaders(b"x-request-id"), [b"r-1"])
        self.assertEqual(h.getRawHeaders(b"x-proxy-id"), [b"p-1"])
        self.assertEqual(h.getRawHeaders(b"x-proxy"), [b"llm-proxy"])
        self.assertEqual(h.getRawHeaders(b"x-proxy-version"), [b"0.1.0"])
        self.assertEqual(h.getRawHeaders(b"x-upstream-request-start"), [b"1500000000"])
        self.assertIsNone(h.getRawHeaders(b"host"))  # the Agent sets the upstream's
        self.assertIsNone(h.getRawHeaders(b"content-length"))

    def test_a_key_with_a_line_break_stays_one_header(self) -> None:
        h = upstream({}, key="sk-real\r\nX-Injected: 1")
        self.assertEqual(h.getRawHeaders(b"authorization"), [b"Bearer sk-real X-Injected: 1"])
        self.assertIsNone(h.getRawHeaders(b"x-injected"))

    def test_hop_by_hop_and_client_ip_headers_dropped(self) -> None:
        h = upstream(
            {
                b"connection": [b"keep-alive, X-Private"],
                b"x-private": [b"1"],
                b"keep-alive": [b"timeout=5"],
                b"te": [b"trailers"],
                b"transfer-encoding": [b"chunked"],
                b"upgrade": [b"h2c"],
                b"proxy-authorization": [b"Basic x"],
                b"x-forwarded-for": [b"1.1.1.1"],
                b"x-real-ip": [b"1.1.1.1"],
                b"cf-connecting-ip": [b"1.1.1.1"],
                b"cf-ipcountry": [b"XX"],
                b"x-client-ip": [b"1.1.1.1"],
                b"x-original-forwarded-for": [b"1.1.1.1"],
                b"x-keep": [b"yes"],
            }
        )
        names = {name.lower() for name, _ in h.getAllRawHeaders()}
        for gone in (
            b"connection",
            b"x-private",
            b"keep-alive",
            b"te",
            b"transfer-encoding",
            b"upgrade",
            b"proxy-authorization",
            b"x-real-ip",
            b"cf-connecting-ip",
            b"cf-ipcountry",
            b"x-client-ip",
            b"x-original-forwarded-for",
        ):
            self.assertNotIn(gone, names)
        self.assertEqual(h.getRawHeaders(b"x-forwarded-for"), [b"10.1.2.3"])
        self.assertEqual(h.getRawHeaders(b"x-keep"), [b"yes"])

    def test_only_codings_the_proxy_can_read_are_asked_for(self) -> None:
        """
        Usage accounting reads answers: br or zstd (what Node's fetch and
        httpx with brotli ask for) would hide them; gzip and deflate do not.
        """
        cases = [
            ([b"gzip, deflate"], b"gzip, deflate"),
            ([b"gzip, deflate, br, zstd"], b"gzip, deflate"),
            ([b"br;q=1.0, GZIP;q=0.5, *;q=0.1"], b"GZIP;q=0.5"),
            ([b"br", b"deflate"], b"deflate"),
            ([b"br"], b"identity"),
            ([b"zstd, *"], b"identity"),
        ]
        for sent, asked in cases:
            h = upstream({b"accept-encoding": sent})
            self.assertEqual(h.getRawHeaders(b"accept-encoding"), [asked], sent)
        self.assertIsNone(upstream({}).getRawHeaders(b"accept-encoding"))

    def test_repeated_headers_kept_in_order(self) -> None:
        h = upstream({b"x-multi": [b"a", b"b", b"c"], b"cookie": [b"k=1", b"j=2"]})
        self.assertEqual(h.getRawHeaders(b"x-multi"), [b"a", b"b", b"c"])
        self.assertEqual(h.getRawHeaders(b"cookie"), [b"k=1", b"j=2"])

    def test_accept_added_for_streams_only_when_absent(self) -> None:
        self.assertEqual(
            upstream({}, uri=b"/v1/x?stream=true").getRawHeaders(b"accept"),
            [b"text/event-stream"],
        )
        self.assertIsNone(upstream({}).getRawHeaders(b"accept"))
        self.assertEqual(
            upstream({b"accept": [b"application/json"]}, uri=b"/v1/x?stream=true").getRawHeaders(
                b"accept"
            ),
            [b"application/json"],
        )


class ResponseHeaderTests(SynchronousTestCase):
    def test_hop_by_hop_dropped_rest_kept(self) -> None:
        out = Headers()
        copy_response_headers(
            Headers(
                {
                    b"connection": [b"close, X-Hop"],
                    b"x-hop": [b"1"],
                    b"transfer-encoding": [b"chunked"],
                    b"keep-alive": [b"timeout=5"],
                    b"content-type": [b"text/event-stream"],
                    b"set-cookie": [b"a=1", b"b=2"],
                    b"x-request-id": [b"upstream-id"],
                    b"openai-processing-ms": [b"12"],
                }
            ),
            out,
        )
        names = {name.lower() for name, _ in out.getAllRawHeaders()}
        self.assertEqual(names, {b"content-type", b"set-cookie", b"openai-processing-ms"})
        self.assertEqual(out.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])
        self.assertTrue(is_event_stream(out))

    def test_rfc3339_nanoseconds(self) -> None:
        self.assertEqual(rfc3339_ns(1.25), b"1970-01-01T00:00:01.250000000Z")
