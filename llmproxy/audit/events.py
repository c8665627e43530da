"""
Building audit events. Every event that reaches the writer is made here, so
the rules about secrets live in one place: token ids are generic-obfuscated,
presented tokens are obfuscated, provider keys never enter an event.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from llmproxy.store.records import AuditEvent
from llmproxy.tokens.format import obfuscate_generic, obfuscate_token
from llmproxy.web.site import client_ip

# -- actors ----------------------------------------------------------------------
ACTOR_MANAGEMENT = "management_api"
ACTOR_SYSTEM = "system"

# -- outcomes ----------------------------------------------------------------------
SUCCESS = "success"
FAILURE = "failure"
DENIED = "denied"
ERROR = "error"
OUTCOMES = (SUCCESS, FAILURE, DENIED, ERROR)

# -- actions -----------------------------------------------------------------------
PROJECT_LIST = "project.list"
PROJECT_CREATE = "project.create"
PROJECT_UPDATE = "project.update"
PROJECT_DELETE = "project.delete"
TOKEN_CREATE = "token.create"
TOKEN_LIST = "token.list"
TOKEN_READ = "token.read"
TOKEN_UPDATE = "token.update"
TOKEN_REVOKE = "token.revoke"
TOKEN_REVOKE_BATCH = "token.revoke_batch"
AUDIT_LIST = "audit.list"
AUDIT_SHOW = "audit.show"
CACHE_PURGE = "cache.purge"
PROXY_REQUEST = "proxy_request"

#: Longest string kept from a client-controlled header.
_MAX_HEADER = 512


def utc_now(clock: IReactorTime) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)


def rfc3339(t: datetime.datetime) -> str:
    """UTC RFC 3339 with microseconds and C{Z}, as every JSON time we emit."""
    return t.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def obfuscated_token_id(token_id: str) -> str:
    """Token ids in audit details are generic-obfuscated (C{1234abcd...ef01})."""
    return obfuscate_generic(token_id)


def obfuscated_presented_token(presented: str) -> str:
    """
    A token string a client sent. Well-formed C{sk-} tokens keep their
    prefix-aware form; anything else (which might be some other secret) is
    generic-obfuscated, never echoed.
    """
    presented = presented[:_MAX_HEADER]
    if presented.startswith("sk-") and len(presented) > 11:
        return obfuscate_token(presented)
    return obfuscate_generic(presented)


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    if not value:
        return None
    return value[:_MAX_HEADER].decode("utf-8", "replace")


def request_details(request: Request) -> dict[str, Any]:
    """The request context every management event carries (§7.2 of the contract)."""
    details: dict[str, Any] = {
        "http_method": request.method.decode("latin-1"),
        "endpoint": request.path.decode("utf-8", "replace"),
    }
    agent = _header(request, b"x-forwarded-user-agent") or _header(request, b"user-agent")
    if agent:
        details["user_agent"] = agent
    referer = _header(request, b"x-forwarded-referer")
    if referer:
        details["referer"] = referer
    if request.getHeader(b"x-admin-origin") == b"1":
        details["origin"] = "admin-ui"
    return details


def make_event(
    *,
    action: str,
    actor: str,
    outcome: str,
    timestamp: datetime.datetime,
    details: dict[str, Any],
    project_id: str | None = None,
    request_id: str | None = None,
    correlation_id: str | None = None,
    client_ip: str | None = None,
) -> AuditEvent:
    """
    An event with a fresh id. The flat columns (method, path, user agent,
    reason, token id) are taken from C{details}, as the database has them.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown audit outcome {outcome!r}")
    reason = details.get("error")
    token_id = details.get("token_id")
    return AuditEvent(
        id=str(uuid.uuid4()),
        timestamp=timestamp,
        action=action,
        actor=actor,
        outcome=outcome,
        project_id=project_id or None,
        request_id=request_id or None,
        correlation_id=correlation_id or None,
        client_ip=client_ip or None,
        method=details.get("http_method"),
        path=details.get("endpoint"),
        user_agent=details.get("user_agent"),
        reason=str(reason) if reason is not None else None,
        token_id=str(token_id) if token_id is not None else None,
        details=dict(details),
    )


def _request_event(
    request: Request,
    clock: IReactorTime,
    action: str,
    actor: str,
    outcome: str,
    details: dict[str, Any],
    project_id: str | None,
) -> AuditEvent:
    """An event stamped now, carrying the request's ids and client address."""
    return make_event(
        action=action,
        actor=actor,
        outcome=outcome,
        timestamp=utc_now(clock),
        details=details,
        project_id=project_id,
        request_id=getattr(request, "request_id", None),
        correlation_id=getattr(request, "correlation_id", None),
        client_ip=client_ip(request),
    )


def management_event(
    request: Request,
    clock: IReactorTime,
    action: str,
    outcome: str,
    details: dict[str, Any] | None = None,
    project_id: str | None = None,
) -> AuditEvent:
    """An event for a management API call, with the request's ids and context."""
    merged = request_details(request)
    merged.update(details or {})
    return _request_event(request, clock, action, ACTOR_MANAGEMENT, outcome, merged, project_id)


def proxy_denied(
    request: Request,
    clock: IReactorTime,
    *,
    reason: str,
    presented_token: str | None = None,
    token_id: str | None = None,
    project_id: str | None = None,
    status: int | None = None,
    outcome: str = DENIED,
) -> AuditEvent:
    """
    A refused proxy request (bad, unknown, inactive, expired or over-quota
    token, inactive project). C{reason} is the error code sent to the client
    (C{token_not_found}, C{token_inactive}, ...). The presented token is
    obfuscated; C{token_id} is the management id when the token was found.
    Use C{outcome=ERROR} when the refusal comes from a failing dependency.
    """
    details = request_details(request)
    details["reason"] = reason
    if presented_token:
        details["token"] = obfuscated_presented_token(presented_token)
    if token_id:
        details["token_id"] = obfuscated_token_id(token_id)
    if status is not None:
        details["status_code"] = status
    return _request_event(request, clock, PROXY_REQUEST, ACTOR_SYSTEM, outcome, details, project_id)


def event_line(event: AuditEvent) -> dict[str, Any]:
    """
    The JSONL file shape (as the Go llm-proxy writes it, plus C{id}): the
    outcome is called C{result} here; empty fields are left out.
    """
    line: dict[str, Any] = {
        "id": event.id,
        "timestamp": rfc3339(event.timestamp),
        "action": event.action,
        "actor": event.actor,
    }
    for key in ("project_id", "request_id", "correlation_id", "client_ip"):
        value = getattr(event, key)
        if value:
            line[key] = value
    line["result"] = event.outcome
    if event.details:
        line["details"] = event.details
    return line


def event_json(event: AuditEvent) -> dict[str, Any]:
    """
    The API shape (C{GET /manage/audit}): C{outcome}; C{metadata} is the
    details map as a JSON string; empty optional fields are left out.
    """
    row: dict[str, Any] = {
        "id": event.id,
        "timestamp": rfc3339(event.timestamp),
        "action": event.action,
        "actor": event.actor,
        "outcome": event.outcome,
    }
    for key in (
        "project_id",
        "request_id",
        "correlation_id",
        "client_ip",
        "method",
        "path",
        "user_agent",
        "reason",
        "token_id",
    ):
        value = getattr(event, key)
        if value is not None:
            row[key] = value
    if event.details:
        row["metadata"] = json.dumps(event.details, separators=(",", ":"), sort_keys=True)
    return row


def proxy_rejection_hook(
    sink: Any, clock: IReactorTime
) -> Callable[[Request, Any, str | None], None]:
    """
    The proxy's audit hook: C{hook(request, rejection, presented_token)}
    records one C{proxy_request} event on C{sink} (anything with
    C{record(event)}, normally the L{AuditWriterService}). C{rejection} is a
    L{llmproxy.tokens.validator.Rejection}: its C{code} becomes the reason;
    refusals caused by a failing dependency are C{error}, the rest C{denied}.
    """

    def hook(request: Request, rejection: Any, presented: str | None) -> None:
        token = getattr(rejection, "token", None)
        status = getattr(rejection, "status", None)
        failing = getattr(rejection, "kind", "") == "dependency" or (status or 0) >= 500
        sink.record(
            proxy_denied(
                request,
                clock,
                reason=str(getattr(rejection, "code", "") or "rejected"),
                presented_token=presented,
                token_id=getattr(token, "id", None),
                project_id=getattr(token, "project_id", None),
                status=status,
                outcome=ERROR if failing else DENIED,
            )
        )

    return hook
