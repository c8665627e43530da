"""
The root resource: C{/v1/...} goes straight to the proxy (no Klein on the
hot path); every other path is handed, whole, to the Klein web app.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from llmproxy.web.errors import json_error
from llmproxy.web.site import CORRELATION_ID, REQUEST_ID, new_request_id


class _NotUTF8(Resource):
    """A path the web app cannot route: its percent-decoded bytes are not UTF-8."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return json_error(
            request,
            400,
            "invalid URL",
            code="bad_request",
            description="the path is not UTF-8 once percent-decoded",
        )


def _utf8_path(request: Request) -> bool:
    try:
        unquote_to_bytes(request.path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


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
        # Klein would answer such a path with a plain-text 400 and a traceback in the log.
        return self._web if _utf8_path(request) else _NotUTF8()

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
