"""
The Klein web app for everything that is not proxied: health, readiness,
management, metrics. Feature modules contribute sub-resources that are
mounted here as branches; the proxy itself is not behind Klein.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from klein import Klein
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from llmproxy import __version__
from llmproxy.web.errors import json_body, json_error

log = Logger()

ReadyCheck = Callable[[], "defer.Deferred[Any] | Awaitable[Any]"]


def rfc3339_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


@attrs.define
class WebApp:
    """
    @ivar ready_checks: C{(name, check)} pairs; C{/ready} is 200 only when
        every check succeeds within C{ready_timeout} seconds.
    @ivar mounts: C{(prefix, resource)} pairs mounted as Klein branches,
        e.g. C{("/manage/", management_resource)}.
    """

    clock: IReactorTime
    ready_checks: list[tuple[str, ReadyCheck]] = attrs.field(factory=list)
    mounts: list[tuple[str, IResource]] = attrs.field(factory=list)
    ready_timeout: float = 2.0
    app: Klein = attrs.field(init=False, factory=Klein)

    def __attrs_post_init__(self) -> None:
        app = self.app
        app.route("/health", branch=False)(self.health)
        app.route("/live", branch=False)(self.live)
        app.route("/ready", branch=False)(self.ready)
        app.handle_errors(NotFound)(self.not_found)  # type: ignore[arg-type]
        app.handle_errors(MethodNotAllowed)(self.method_not_allowed)  # type: ignore[arg-type]

    def mount(self, prefix: str, resource: IResource, exact: str | None = None) -> None:
        """Serve C{resource} for C{prefix} and everything below it."""
        endpoint = "mount:" + prefix

        def branch(request: Request) -> IResource:
            return resource

        self.app.route(prefix, branch=True, endpoint=endpoint)(branch)
        if exact is not None:
            self.app.route(exact, endpoint=endpoint + ":exact")(
                lambda request: resource.render(request)
            )
        self.mounts.append((prefix, resource))

    def add_route(self, path: str, handler: Callable[..., Any], **kwargs: Any) -> None:
        self.app.route(path, **kwargs)(handler)

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    # -- routes ----------------------------------------------------------------

    def health(self, request: Request) -> bytes:
        return json_body(
            request, 200, {"status": "ok", "timestamp": rfc3339_now(), "version": __version__}
        )

    def live(self, request: Request) -> bytes:
        return json_body(request, 200, {"status": "alive"})

    async def ready(self, request: Request) -> bytes:
        # The checks run at once: during an outage each may wait for its own
        # deadline, and the answer should not take the sum of them.
        async def run(check: ReadyCheck) -> str:
            try:
                d = defer.ensureDeferred(_as_coroutine(check))
                d.addTimeout(self.ready_timeout, self.clock)  # type: ignore[arg-type]
                await d
            except Exception as e:  # each dependency reports, none raises
                return "timed out" if isinstance(e, defer.TimeoutError) else _describe(e)
            return "ok"

        outcomes = await defer.gatherResults(
            [defer.ensureDeferred(run(check)) for _, check in self.ready_checks]
        )
        names = [name for name, _ in self.ready_checks]
        results = dict(zip(names, outcomes, strict=True))
        failing = [name for name, outcome in results.items() if outcome != "ok"]
        if failing:
            return json_body(
                request,
                503,
                {
                    "status": "unavailable",
                    "error": "dependency unavailable: " + ", ".join(failing),
                    "checks": results,
                },
            )
        return json_body(request, 200, {"status": "ready", "checks": results})

    def not_found(self, request: Request, failure: Any) -> bytes:
        return json_error(request, 404, "not found", code="not_found")

    def method_not_allowed(self, request: Request, failure: Any) -> bytes:
        return json_error(request, 405, "method not allowed", code="method_not_allowed")


async def _as_coroutine(check: ReadyCheck) -> Any:
    return await check()  # type: ignore[misc]


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:200] if text else type(e).__name__
