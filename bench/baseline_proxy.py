"""
The baseline the benchmark compares llmproxy with: Twisted's stock
C{twisted.web.proxy.ReverseProxyResource} forwarding every path to one
upstream, with no authentication, pooling or accounting.

It is what "a reverse proxy written with Twisted" costs before any feature is
added, measured in the same run on the same core, so llmproxy's figures can be
read as ratios that do not depend on the machine. Only the access log is off
(it would be a cost the baseline pays and llmproxy's fast path does not).

    python bench/baseline_proxy.py --port 18092 --upstream 127.0.0.1:9999
"""

from __future__ import annotations

import argparse

from twisted.internet import endpoints, reactor
from twisted.web import proxy, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port of the upstream")
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    root = proxy.ReverseProxyResource(host, int(port), b"")
    site = server.Site(root)
    site.log = lambda request: None  # type: ignore[method-assign]
    site.noisy = False
    proxy.ProxyClientFactory.noisy = False
    endpoint = endpoints.TCP4ServerEndpoint(
        reactor, args.port, backlog=args.backlog, interface="127.0.0.1"
    )
    endpoint.listen(site)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
