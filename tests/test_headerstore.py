"""Headers filled directly hold exactly what Twisted's own methods would store."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llmproxy.web import headerstore
from llmproxy.web.headerstore import add_clean, set_clean


class HeaderStoreTests(SynchronousTestCase):
    def test_this_twisted_takes_the_direct_path(self) -> None:
        self.assertTrue(headerstore.DIRECT)

    def test_same_result_as_the_public_methods(self) -> None:
        direct, public = Headers(), Headers()
        for name, value in [
            (b"etag", b'"x"'),
            (b"X-Request-ID", b"r-1"),
            (b"x-request-id", b"r-2"),
            (b"WWW-AUTHENTICATE", b"Bearer"),
            (b"content-type", b"text/event-stream"),
        ]:
            add_clean(direct, name, value)
            public.addRawHeader(name, value)
        set_clean(direct, b"x-proxy", [b"llm-proxy"])
        public.setRawHeaders(b"x-proxy", [b"llm-proxy"])
        self.assertEqual(list(direct.getAllRawHeaders()), list(public.getAllRawHeaders()))
        self.assertEqual(direct.getRawHeaders(b"X-REQUEST-ID"), [b"r-1", b"r-2"])
        self.assertEqual(direct.getRawHeaders("ETag"), ['"x"'])

    def test_invalid_names_are_refused_as_twisted_refuses_them(self) -> None:
        for name in (b"bad name", b"", b"x\r\ny"):
            with self.assertRaises(ValueError):
                add_clean(Headers(), name, b"1")
