"""
The root resource: C{/v1/...} goes straight to the proxy (no Klein on the
hot path); every other path is handed, whole, to the Klein web app.
"""

from __future__ import annotations

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from llmproxy.web.site import CORRELATION_ID, REQUEST_ID, new_request_id


class Root(Resource):
    def __init__(self, web: IResource, proxy: IResource) -> None:
        super().__init__()
        self._web = web
        #: Requests for C{/v1} and below go here (the site reaches it directly).
        self.proxy = proxy

    def getChild(self, path: bytes, request: Request) -> IResource:  # type: ignore[override]
        if path == b"v1":
            return self.proxy
        # Put the segment back so the web app routes on the full path.
        request.postpath.insert(0, request.prepath.pop())  # type: ignore[union-attr]
        stamp_request_ids(request)
        return self._web

    def render(self, request: Request) -> bytes:
        # Only reached for a request with an empty path (no segments at all).
        stamp_request_ids(request)
        return self._web.render(request)  # type: ignore[no-any-return]


def stamp_request_ids(request: Request) -> None:
    """X-Request-ID / X-Correlation-ID: the client's values if sent, else new ones."""
    rid = (request.getHeader(REQUEST_ID) or b"").strip().decode("utf-8", "replace")
    cid = (request.getHeader(CORRELATION_ID) or b"").strip().decode("utf-8", "replace")
    rid = rid or new_request_id()
    cid = cid or new_request_id()
    request.request_id = rid  # type: ignore[attr-defined]
    request.correlation_id = cid  # type: ignore[attr-defined]
    request.setHeader(REQUEST_ID, rid.encode("utf-8", "replace"))
    request.setHeader(CORRELATION_ID, cid.encode("utf-8", "replace"))
