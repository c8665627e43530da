"""twistd plugin options and service maker for C{twistd llmproxy-fake-upstream}."""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet import endpoints
from twisted.python import usage


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a fake OpenAI-compatible API for testing applications and llmproxy. "
        "Per-request behaviour is set with X-Fake-* headers (see docs/fake-upstream.rst)."
    )
    optParameters = [
        [
            "port",
            "p",
            "tcp:8999:interface=127.0.0.1",
            "Endpoint to listen on (tcp:9999, ssl:9443:privateKey=key.pem:certKey=cert.pem).",
        ],
    ]


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from llmproxy.testing.fake_upstream import FakeUpstream

    fake = FakeUpstream(clock=reactor)  # type: ignore[arg-type]
    endpoint = endpoints.serverFromString(reactor, options["port"])
    return StreamServerEndpointService(endpoint, fake.site())
