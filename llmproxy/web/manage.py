"""
The management API (C{/manage/...}): projects, tokens and the audit trail.

Routes are relative to the C{/manage/} mount. Every route checks the
management token before looking at the method, so an unauthenticated
C{PUT} is a 401, not a 405. Every change that alters what the proxy should
accept is announced on the L{InvalidationHub} before the response is sent,
so the proxy's caches drop the entry on the very next request.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Request

from llmproxy.audit import events as ev
from llmproxy.audit.events import event_json, management_event, obfuscated_token_id, rfc3339
from llmproxy.audit.writer import AuditWriterService
from llmproxy.invalidation import InvalidationHub
from llmproxy.store.interface import IStore
from llmproxy.store.records import (
    AUDIT_EQUALITY_FILTERS,
    AuditQuery,
    DuplicateName,
    NotFound,
    Project,
    Token,
)
from llmproxy.tokens.format import generate_token, hash_token, obfuscate_generic, obfuscate_token
from llmproxy.web.auth import check_bearer
from llmproxy.web.errors import json_body, json_error

log = Logger()

#: The longest a token may live (365 days), as in the Go llm-proxy.
MAX_DURATION_MINUTES = 525_600
#: Largest integer accepted in a request (the database columns are 64-bit).
MAX_INT = 2**63 - 1
MAX_NAME_LENGTH = 255
AUDIT_PAGE_SIZE_DEFAULT = 20
AUDIT_PAGE_SIZE_MAX = 100
TOKEN_LIST_LIMIT_MAX = 1000

Handler = Callable[..., Awaitable[bytes]]


class ApiError(Exception):
    """Answer with C{status} and C{{"error": message, ...extra}}."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


class _BadBody(Exception):
    pass


def project_json(project: Project) -> dict[str, Any]:
    """A project as the API shows it: the provider key is always obfuscated."""
    data: dict[str, Any] = {
        "id": project.id,
        "name": project.name,
        "api_key": obfuscate_generic(project.api_key),
        "is_active": project.is_active,
        "created_at": rfc3339(project.created_at),
        "updated_at": rfc3339(project.updated_at),
    }
    if project.deactivated_at is not None:
        data["deactivated_at"] = rfc3339(project.deactivated_at)
    return data


def _time(t: datetime.datetime | None) -> str | None:
    return rfc3339(t) if t is not None else None


def token_json(token: Token) -> dict[str, Any]:
    """A token as the API shows it: never the secret, only its obfuscated form."""
    return {
        "id": token.id,
        "token": token.display,
        "project_id": token.project_id,
        "expires_at": _time(token.expires_at),
        "is_active": token.is_active,
        "request_count": token.request_count,
        "max_requests": token.max_requests,
        "created_at": rfc3339(token.created_at),
        "last_used_at": _time(token.last_used_at),
        "cache_hit_count": token.cache_hit_count,
        "deactivated_at": _time(token.deactivated_at),
    }


def looks_obfuscated(api_key: str) -> bool:
    return "..." in api_key or "****" in api_key


def _error_name(e: BaseException) -> str:
    # Exception texts from database drivers can quote statement parameters
    # (provider keys); only the type name goes into logs and audit events.
    return type(e).__name__


def decode_body(raw: bytes, fields: Mapping[str, type]) -> dict[str, Any]:
    """
    Decode a JSON object leniently, as the Go llm-proxy does: keys match
    case-insensitively, unknown keys are ignored, C{null} means absent, a
    literal C{null} body means "no fields", trailing bytes after the first
    value are ignored. Wrong types, an empty body, nesting too deep to
    decode and text that cannot be stored (an escaped lone surrogate such
    as C{"\\ud800"}, or NUL, which PostgreSQL refuses) raise L{_BadBody}.
    """
    try:
        text = raw.decode("utf-8").lstrip()
        value, _ = json.JSONDecoder().raw_decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _BadBody() from e
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _BadBody()
    wanted = {name.lower(): name for name in fields}
    result: dict[str, Any] = {}
    exact: set[str] = set()
    for key, item in value.items():
        name = wanted.get(key.lower())
        if name is None:
            continue
        if name in exact and key != name:
            continue  # an exact-case key wins over a case-insensitive one
        if key == name:
            exact.add(name)
        if item is None:
            result.pop(name, None)
            continue
        kind = fields[name]
        if kind is bool:
            ok = isinstance(item, bool)
        elif kind is int:
            ok = (
                isinstance(item, int) and not isinstance(item, bool) and -MAX_INT <= item <= MAX_INT
            )
        else:
            ok = isinstance(item, kind)
        if not ok:
            raise _BadBody()
        if isinstance(item, str) and not _storable(item):
            raise _BadBody()
        result[name] = item
    return result


def _storable(text: str) -> bool:
    """Whether every database can store C{text}: valid UTF-8, no NUL."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_LEADING_INT = re.compile(r"\s*([+-]?\d+)")


def lenient_int(value: str | None, default: int) -> int:
    """The leading integer of C{value}, else C{default} (as the Go llm-proxy parses paging)."""
    if not value:
        return default
    m = _LEADING_INT.match(value)
    if not m:
        return default
    return int(m.group(1))


def parse_time(value: str) -> datetime.datetime:
    """RFC 3339 (C{Z} or an offset); a naive time is taken as UTC."""
    t = datetime.datetime.fromisoformat(value.strip().replace("z", "Z").replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return t.astimezone(datetime.UTC)


def _arg(request: Request, *names: str) -> str | None:
    args = request.args or {}
    for name in names:
        values = args.get(name.encode())
        if values:
            return _searchable(values[0].decode("utf-8", "replace"))
    return None


def _searchable(text: str) -> str:
    """
    C{text} as every database can take it in a query: NUL, which nothing
    stored contains and PostgreSQL refuses, becomes U+FFFD, as undecodable
    bytes already do.
    """
    return text.replace("\x00", "\ufffd")


class ManagementAPI:
    """
    The C{/manage} resource. C{audit} receives one event per audited call
    (never waited for); C{invalidation} hears every change the proxy must
    notice at once.
    """

    app = Klein()

    def __init__(
        self,
        store: IStore,
        audit: AuditWriterService,
        invalidation: InvalidationHub,
        management_token: str,
        clock: IReactorTime,
        max_body: int = 1024 * 1024,
    ) -> None:
        if not management_token:
            raise ValueError("a management token is required")
        self.store = store
        self.audit = audit
        self.invalidation = invalidation
        self.management_token = management_token
        self.clock = clock
        self.max_body = max_body

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    # -- plumbing --------------------------------------------------------------------

    def _now(self) -> datetime.datetime:
        return ev.utc_now(self.clock)

    def _audit(
        self,
        request: Request,
        action: str,
        outcome: str,
        details: dict[str, Any] | None = None,
        project_id: str | None = None,
    ) -> None:
        try:
            self.audit.record(
                management_event(request, self.clock, action, outcome, details, project_id)
            )
        except Exception:
            log.failure("could not build audit event {action}", action=action)

    def _fail(
        self,
        request: Request,
        action: str,
        status: int,
        message: str,
        details: dict[str, Any],
        project_id: str | None = None,
        **extra: Any,
    ) -> ApiError:
        """Audit a failure and return the error to raise."""
        self._audit(request, action, ev.FAILURE, details, project_id)
        return ApiError(status, message, **extra)

    def _body(
        self,
        request: Request,
        action: str,
        fields: Mapping[str, type],
        project_id: str | None = None,
    ) -> dict[str, Any]:
        """The decoded JSON body; a body that does not decode is audited as a failed C{action}."""
        content = request.content
        raw = content.read(self.max_body + 1) if content is not None else b""
        if len(raw) > self.max_body:
            raise ApiError(
                413,
                "Request body too large",
                code="request_too_large",
                description=f"management request bodies are limited to {self.max_body} bytes",
            )
        try:
            return decode_body(raw, fields)
        except _BadBody:
            raise self._fail(
                request,
                action,
                400,
                "invalid request body",
                {"validation_error": "invalid request body"},
                project_id,
            ) from None

    async def _dispatch(
        self, request: Request, handlers: Mapping[str, Handler], **kwargs: Any
    ) -> bytes:
        denied = check_bearer(request, self.management_token)
        if denied is not None:
            return denied
        method = request.method.decode("latin-1")
        handler = handlers.get(method)
        if handler is None:
            request.setHeader(b"allow", ", ".join(sorted(handlers)).encode())
            return json_error(request, 405, "method not allowed", code="method_not_allowed")
        try:
            ids = {k: _searchable(v) if isinstance(v, str) else v for k, v in kwargs.items()}
            return await handler(request, **ids)
        except ApiError as e:
            return json_error(request, e.status, e.message, **e.extra)
        except Exception:
            log.failure(
                "management request {method} {path} failed", method=method, path=request.path
            )
            return json_error(request, 500, "internal error")

    def _fixed(self, status: int, message: str) -> Handler:
        async def handler(request: Request, **_: Any) -> bytes:
            return json_error(request, status, message)

        return handler

    # -- routes ---------------------------------------------------------------------

    @app.route("/projects", branch=False)
    def projects(self, request: Request) -> Any:
        return self._dispatch(request, {"GET": self.list_projects, "POST": self.create_project})

    @app.route("/projects/", branch=False)
    def projects_empty_id(self, request: Request) -> Any:
        bad = self._fixed(400, "invalid project id")
        return self._dispatch(request, {"GET": bad, "PATCH": bad})

    @app.route("/projects/<project_id>", branch=False)
    def project(self, request: Request, project_id: str) -> Any:
        return self._dispatch(
            request,
            {"GET": self.get_project, "PATCH": self.update_project, "DELETE": self.delete_project},
            project_id=project_id,
        )

    @app.route("/projects/<project_id>/tokens/revoke", branch=False)
    def project_revoke(self, request: Request, project_id: str) -> Any:
        bad = self._fixed(400, "invalid project id")
        return self._dispatch(
            request,
            {"POST": self.revoke_project_tokens, "GET": bad, "PATCH": bad},
            project_id=project_id,
        )

    @app.route("/projects/<path:rest>", branch=False)
    def project_bad_path(self, request: Request, rest: str) -> Any:
        bad = self._fixed(400, "invalid project id")
        return self._dispatch(request, {"GET": bad, "PATCH": bad})

    @app.route("/tokens", branch=False)
    def tokens(self, request: Request) -> Any:
        return self._dispatch(request, {"GET": self.list_tokens, "POST": self.create_token})

    @app.route("/tokens/", branch=False)
    def tokens_empty_id(self, request: Request) -> Any:
        bad = self._fixed(400, "token ID is required")
        return self._dispatch(request, {"GET": bad, "PATCH": bad, "DELETE": bad})

    @app.route("/tokens/<token_id>", branch=False)
    def token(self, request: Request, token_id: str) -> Any:
        return self._dispatch(
            request,
            {"GET": self.get_token, "PATCH": self.update_token, "DELETE": self.revoke_token},
            token_id=token_id,
        )

    @app.route("/tokens/<path:rest>", branch=False)
    def token_bad_path(self, request: Request, rest: str) -> Any:
        missing = self._fixed(404, "token not found")
        return self._dispatch(request, {"GET": missing, "PATCH": missing, "DELETE": missing})

    @app.route("/audit", branch=False)
    def audit_events(self, request: Request) -> Any:
        return self._dispatch(request, {"GET": self.list_audit})

    @app.route("/audit/", branch=False)
    def audit_empty_id(self, request: Request) -> Any:
        return self._dispatch(request, {"GET": self._fixed(400, "audit event ID is required")})

    @app.route("/audit/<event_id>", branch=False)
    def audit_event(self, request: Request, event_id: str) -> Any:
        return self._dispatch(request, {"GET": self.get_audit}, event_id=event_id)

    @app.route("/audit/<path:rest>", branch=False)
    def audit_bad_path(self, request: Request, rest: str) -> Any:
        return self._dispatch(request, {"GET": self._fixed(404, "audit event not found")})

    @app.route("/", branch=True)
    def unknown(self, request: Request) -> Any:
        # Authenticate first so unknown paths reveal nothing to strangers.
        missing = self._fixed(404, "not found")
        methods = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
        return self._dispatch(request, dict.fromkeys(methods, missing))

    # -- projects -------------------------------------------------------------------

    async def list_projects(self, request: Request) -> bytes:
        try:
            projects = await self.store.list_projects()
        except Exception as e:
            raise self._fail(
                request, ev.PROJECT_LIST, 500, "failed to list projects", {"error": _error_name(e)}
            ) from e
        self._audit(request, ev.PROJECT_LIST, ev.SUCCESS, {"project_count": len(projects)})
        return json_body(request, 200, [project_json(p) for p in projects])

    async def create_project(self, request: Request) -> bytes:
        action = ev.PROJECT_CREATE
        body = self._body(request, action, {"name": str, "api_key": str})
        name = body.get("name", "")
        api_key = body.get("api_key", "")
        if not name or not api_key:
            raise self._fail(
                request,
                action,
                400,
                "name and api_key are required",
                {
                    "validation_error": "missing required fields",
                    "name_provided": bool(name),
                    "api_key_provided": bool(api_key),
                },
            )
        if len(name) > MAX_NAME_LENGTH:
            raise self._fail(
                request,
                action,
                400,
                f"name must be at most {MAX_NAME_LENGTH} characters",
                {"validation_error": "name too long"},
            )
        if looks_obfuscated(api_key):
            raise self._fail(
                request,
                action,
                400,
                "cannot save obfuscated API key - please provide the full API key",
                {"validation_error": "cannot save obfuscated API key"},
            )
        now = self._now()
        project = Project(
            id=str(uuid.uuid4()),
            name=name,
            api_key=api_key,
            is_active=True,
            created_at=now,
            updated_at=now,
        )
        try:
            project = await self.store.create_project(project)
        except DuplicateName:
            raise self._fail(
                request,
                action,
                409,
                "a project with this name already exists",
                {"error_type": "duplicate name", "project_name": name},
                code="duplicate_name",
            ) from None
        except Exception as e:
            raise self._fail(
                request, action, 500, "failed to create project", {"error": _error_name(e)}
            ) from e
        self._audit(request, action, ev.SUCCESS, {"project_name": project.name}, project.id)
        return json_body(request, 201, project_json(project))

    async def _load_project(self, project_id: str) -> Project | None:
        try:
            return await self.store.get_project(project_id)
        except Exception:
            log.failure("loading project failed")
            return None

    async def get_project(self, request: Request, project_id: str) -> bytes:
        project = await self._load_project(project_id)
        if project is None:
            raise ApiError(404, "project not found")
        return json_body(request, 200, project_json(project))

    async def update_project(self, request: Request, project_id: str) -> bytes:
        action = ev.PROJECT_UPDATE
        body = self._body(
            request,
            action,
            {"name": str, "api_key": str, "is_active": bool, "revoke_tokens": bool},
            project_id,
        )
        if "revoke_tokens" in body and body.get("is_active", True) is not False:
            raise self._fail(
                request,
                action,
                400,
                "revoke_tokens requires is_active=false",
                {"validation_error": "revoke_tokens requires is_active=false"},
                project_id,
            )
        project = await self._load_project(project_id)
        if project is None:
            raise self._fail(
                request,
                action,
                404,
                "project not found",
                {"error_type": "project not found"},
                project_id,
            )
        changes: dict[str, Any] = {}
        updated: list[str] = []
        if "name" in body:
            name = body["name"]
            if not name or len(name) > MAX_NAME_LENGTH:
                raise self._fail(
                    request,
                    action,
                    400,
                    f"name must be 1 to {MAX_NAME_LENGTH} characters",
                    {"validation_error": "invalid name"},
                    project_id,
                )
            changes["name"] = name
            updated.append("name")
        api_key = body.get("api_key", "")
        if api_key:
            if looks_obfuscated(api_key):
                raise self._fail(
                    request,
                    action,
                    400,
                    "cannot save obfuscated API key - please provide the full API key",
                    {"validation_error": "cannot save obfuscated API key"},
                    project_id,
                )
            changes["api_key"] = api_key
            updated.append("api_key")
        now = self._now()
        revoke = False
        if "is_active" in body and body["is_active"] != project.is_active:
            changes["is_active"] = body["is_active"]
            changes["deactivated_at"] = None if body["is_active"] else now
            updated += ["is_active", "deactivated_at"]
            revoke = not body["is_active"] and body.get("revoke_tokens") is True
        changes["updated_at"] = now
        new = attrs.evolve(project, **changes)
        try:
            new = await self.store.update_project(new)
        except NotFound:
            raise self._fail(
                request,
                action,
                404,
                "project not found",
                {"error_type": "project not found"},
                project_id,
            ) from None
        except DuplicateName:
            raise self._fail(
                request,
                action,
                409,
                "a project with this name already exists",
                {"error_type": "duplicate name"},
                project_id,
                code="duplicate_name",
            ) from None
        except Exception as e:
            raise self._fail(
                request,
                action,
                500,
                "failed to update project",
                {"error": _error_name(e)},
                project_id,
            ) from e
        details: dict[str, Any] = {"updated_fields": updated, "project_name": new.name}
        if revoke:
            details["tokens_revoked"] = await self._revoke_all(project_id, now)
        self.invalidation.project_changed(project_id)
        self._audit(request, action, ev.SUCCESS, details, project_id)
        return json_body(request, 200, project_json(new))

    async def _revoke_all(self, project_id: str, now: datetime.datetime) -> int:
        """Deactivate every active token of a project and tell the proxy about each."""
        before = await self.store.list_tokens(project_id=project_id, active_only=True)
        count = await self.store.deactivate_project_tokens(project_id, now)
        for token in before:
            self.invalidation.token_changed(token.token_hash)
        return count

    async def delete_project(self, request: Request, project_id: str) -> bytes:
        self._audit(
            request,
            ev.PROJECT_DELETE,
            ev.FAILURE,
            {"error_type": "method not allowed", "reason": "project deletion is not permitted"},
            project_id,
        )
        request.setHeader(b"allow", b"GET, PATCH")
        return json_body(
            request,
            405,
            {"error": "method not allowed", "message": "project deletion is not permitted"},
        )

    async def revoke_project_tokens(self, request: Request, project_id: str) -> bytes:
        action = ev.TOKEN_REVOKE_BATCH
        project = await self._load_project(project_id)
        if project is None:
            raise self._fail(
                request, action, 404, "project not found", {"error_type": "project not found"}
            )
        try:
            tokens = await self.store.list_tokens(project_id=project_id)
            revoked = await self._revoke_all(project_id, self._now())
        except Exception as e:
            raise self._fail(
                request,
                action,
                500,
                "failed to revoke project tokens",
                {"error": _error_name(e)},
                project_id,
            ) from e
        self.invalidation.project_changed(project_id)
        already = sum(1 for t in tokens if not t.is_active)
        result = {
            "revoked_count": revoked,
            "already_revoked_count": already,
            "total_tokens": len(tokens),
        }
        self._audit(request, action, ev.SUCCESS, {**result, "failed_count": 0}, project_id)
        return json_body(request, 200, result)

    # -- tokens ---------------------------------------------------------------------

    async def create_token(self, request: Request) -> bytes:
        action = ev.TOKEN_CREATE
        body = self._body(
            request, action, {"project_id": str, "duration_minutes": int, "max_requests": int}
        )
        project_id = body.get("project_id", "")
        duration = body.get("duration_minutes", 0)
        if duration > MAX_DURATION_MINUTES:
            raise self._fail(
                request,
                action,
                400,
                "duration_minutes exceeds maximum allowed",
                {
                    "validation_error": "duration exceeds maximum",
                    "requested_duration_minutes": duration,
                    "max_duration_minutes": MAX_DURATION_MINUTES,
                },
                project_id,
            )
        if duration <= 0:
            raise self._fail(
                request,
                action,
                400,
                "project_id and duration_minutes are required",
                {"validation_error": "missing duration_minutes"},
                project_id,
            )
        if not project_id:
            raise self._fail(
                request,
                action,
                400,
                "project_id is required",
                {"validation_error": "missing project_id"},
            )
        max_requests: int | None = body.get("max_requests")
        if max_requests is not None and max_requests < 0:
            raise self._fail(
                request,
                action,
                400,
                "max_requests must be >= 0",
                {
                    "validation_error": "max_requests must be >= 0",
                    "requested_max_requests": max_requests,
                },
                project_id,
            )
        if max_requests == 0:
            max_requests = None
        project = await self._load_project(project_id)
        if project is None:
            raise self._fail(
                request,
                action,
                404,
                "project not found",
                {"error_type": "project not found"},
                project_id,
            )
        if not project.is_active:
            raise self._fail(
                request,
                action,
                403,
                "cannot create tokens for inactive projects",
                {"error_type": "project_inactive", "reason": "project is inactive"},
                project_id,
                code="project_inactive",
            )
        now = self._now()
        try:
            secret = generate_token()
        except Exception as e:
            raise self._fail(
                request,
                action,
                500,
                "failed to generate token",
                {"error_type": "token generation failed", "error": _error_name(e)},
                project_id,
            ) from e
        expires_at = now + datetime.timedelta(minutes=duration)
        token = Token(
            id=str(uuid.uuid4()),
            token_hash=hash_token(secret),
            display=obfuscate_token(secret),
            project_id=project_id,
            is_active=True,
            created_at=now,
            expires_at=expires_at,
            max_requests=max_requests,
        )
        try:
            token = await self.store.create_token(token)
        except Exception as e:
            raise self._fail(
                request,
                action,
                500,
                "failed to store token",
                {"error_type": "storage failed", "error": _error_name(e)},
                project_id,
            ) from e
        details: dict[str, Any] = {
            "token_id": obfuscated_token_id(token.id),
            "duration_minutes": duration,
            "expires_at": expires_at.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        }
        result: dict[str, Any] = {
            "id": token.id,
            "token": secret,
            "expires_at": rfc3339(expires_at),
        }
        if max_requests is not None:
            details["max_requests"] = max_requests
            result["max_requests"] = max_requests
        self._audit(request, action, ev.SUCCESS, details, project_id)
        return json_body(request, 201, result)

    async def list_tokens(self, request: Request) -> bytes:
        action = ev.TOKEN_LIST
        project_id = _arg(request, "projectId", "project_id") or None
        active_text = _arg(request, "active_only", "activeOnly")
        active_only = False
        if active_text is not None:
            lowered = active_text.strip().lower()
            if lowered in ("1", "t", "true", "yes"):
                active_only = True
            elif lowered not in ("", "0", "f", "false", "no"):
                raise ApiError(400, "active_only must be true or false")
        limit: int | None = None
        offset = 0
        limit_text = _arg(request, "limit")
        offset_text = _arg(request, "offset")
        try:
            if limit_text is not None and limit_text.strip():
                limit = min(max(int(limit_text), 1), TOKEN_LIST_LIMIT_MAX)
            if offset_text is not None and offset_text.strip():
                offset = max(int(offset_text), 0)
        except ValueError:
            raise ApiError(400, "limit and offset must be integers") from None
        try:
            tokens = await self.store.list_tokens(
                project_id=project_id, active_only=active_only, limit=limit, offset=offset
            )
        except Exception as e:
            raise self._fail(
                request, action, 500, "failed to list tokens", {"error": _error_name(e)}, project_id
            ) from e
        details: dict[str, Any] = {"token_count": len(tokens)}
        if project_id:
            details["filtered_by_project"] = True
        self._audit(request, action, ev.SUCCESS, details, project_id)
        return json_body(request, 200, [token_json(t) for t in tokens])

    async def _load_token(self, request: Request, action: str, token_id: str) -> Token:
        try:
            token = await self.store.get_token(token_id)
        except Exception:
            log.failure("loading token failed")
            token = None
        if token is None:
            raise self._fail(
                request,
                action,
                404,
                "token not found",
                {"error_type": "token not found", "token_id": obfuscated_token_id(token_id)},
            )
        return token

    async def get_token(self, request: Request, token_id: str) -> bytes:
        token = await self._load_token(request, ev.TOKEN_READ, token_id)
        self._audit(
            request,
            ev.TOKEN_READ,
            ev.SUCCESS,
            {"token_id": obfuscated_token_id(token.id)},
            token.project_id,
        )
        return json_body(request, 200, token_json(token))

    async def update_token(self, request: Request, token_id: str) -> bytes:
        action = ev.TOKEN_UPDATE
        body = self._body(request, action, {"is_active": bool, "max_requests": int})
        token = await self._load_token(request, action, token_id)
        details: dict[str, Any] = {"token_id": obfuscated_token_id(token.id)}
        if "max_requests" in body and body["max_requests"] < 0:
            raise self._fail(
                request,
                action,
                400,
                "max_requests must be >= 0",
                {**details, "validation_error": "max_requests must be >= 0"},
                token.project_id,
            )
        if not body:
            raise self._fail(
                request,
                action,
                400,
                "no fields to update",
                {**details, "validation_error": "no fields to update"},
                token.project_id,
            )
        changes: dict[str, Any] = {}
        if "is_active" in body:
            active = body["is_active"]
            changes["is_active"] = active
            details["updated_is_active"] = active
            if active:
                changes["deactivated_at"] = None
            elif token.is_active:
                changes["deactivated_at"] = self._now()
        if "max_requests" in body:
            limit = body["max_requests"] or None
            changes["max_requests"] = limit
            details["updated_max_requests"] = limit if limit is not None else "unlimited"
        new = attrs.evolve(token, **changes)
        try:
            new = await self.store.update_token(new)
        except NotFound:
            raise self._fail(
                request, action, 404, "token not found", details, token.project_id
            ) from None
        except Exception as e:
            raise self._fail(
                request,
                action,
                500,
                "failed to update token",
                {**details, "error": _error_name(e)},
                token.project_id,
            ) from e
        self.invalidation.token_changed(token.token_hash)
        self._audit(request, action, ev.SUCCESS, details, token.project_id)
        return json_body(request, 200, token_json(new))

    async def revoke_token(self, request: Request, token_id: str) -> bytes:
        action = ev.TOKEN_REVOKE
        token = await self._load_token(request, action, token_id)
        details: dict[str, Any] = {"token_id": obfuscated_token_id(token.id)}
        if not token.is_active:
            details["already_revoked"] = True
        else:
            new = attrs.evolve(token, is_active=False, deactivated_at=self._now())
            try:
                await self.store.update_token(new)
            except Exception as e:
                raise self._fail(
                    request,
                    action,
                    500,
                    "failed to revoke token",
                    {**details, "error": _error_name(e)},
                    token.project_id,
                ) from e
        self.invalidation.token_changed(token.token_hash)
        self._audit(request, action, ev.SUCCESS, details, token.project_id)
        request.setResponseCode(204)
        return b""

    # -- audit ----------------------------------------------------------------------

    async def list_audit(self, request: Request) -> bytes:
        page = max(lenient_int(_arg(request, "page"), 1), 1)
        page_size = lenient_int(_arg(request, "page_size"), AUDIT_PAGE_SIZE_DEFAULT)
        page_size = min(max(page_size, 1), AUDIT_PAGE_SIZE_MAX)
        times: dict[str, Any] = {}
        for name in ("start_time", "end_time"):
            text = _arg(request, name)
            times[name] = None
            if text:
                try:
                    times[name] = parse_time(text)
                except ValueError:
                    raise ApiError(
                        400, f"invalid {name}", description="expected an RFC 3339 time"
                    ) from None
        filters: dict[str, Any] = {
            name: (_arg(request, name) or None) for name in (*AUDIT_EQUALITY_FILTERS, "search")
        }
        query = AuditQuery(**filters, **times)
        # Events this instance queued a moment ago must be visible.
        await self.audit.flush()
        try:
            events, total = await self.store.list_audit_events(
                query, page_size, (page - 1) * page_size
            )
        except Exception as e:
            log.failure("listing audit events failed")
            raise ApiError(500, "failed to list audit events") from e
        total_pages = math.ceil(total / page_size) if total else 0
        body = json_body(
            request,
            200,
            {
                "events": [event_json(e) for e in events],
                "pagination": {
                    "page": page,
                    "page_size": page_size,
                    "total_count": total,
                    "total_pages": total_pages,
                    "has_next": page < total_pages,
                    "has_prev": page > 1,
                },
            },
        )
        self._audit(
            request,
            ev.AUDIT_LIST,
            ev.SUCCESS,
            {
                "events_count": len(events),
                "page": page,
                "page_size": page_size,
                "total_count": total,
            },
        )
        return body

    async def get_audit(self, request: Request, event_id: str) -> bytes:
        await self.audit.flush()
        try:
            event = await self.store.get_audit_event(event_id)
        except Exception as e:
            log.failure("loading audit event failed")
            raise ApiError(500, "failed to get audit event") from e
        if event is None:
            raise ApiError(404, "audit event not found")
        self._audit(request, ev.AUDIT_SHOW, ev.SUCCESS, {"audit_event_id": event_id})
        return json_body(request, 200, event_json(event))
