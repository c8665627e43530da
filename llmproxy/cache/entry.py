"""
One cached response and how it is written to a backend. An entry belongs to
a primary key (scope, method, URL, body digest); several entries may share
one primary key when the upstream answer carries C{Vary} (RFC 9111 §4.1):
each remembers the request header values it was selected by.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import attrs

#: Rough per-entry bookkeeping cost counted against the byte budget.
ENTRY_OVERHEAD = 256


@attrs.frozen
class CachedResponse:
    """
    @ivar primary: hex SHA-256 of scope, method, normalised URL and body
        digest; what C{X-Proxy-Cache-Key} shows.
    @ivar variant: hex SHA-256 of the C{vary} selection (empty C{vary}
        gives one fixed value): identifies the entry under its primary key.
    @ivar vary: the header names of the response C{Vary} (lower case) with
        the normalised request values they had when stored (None: absent).
    @ivar chunks: the body as it arrived; one element for a plain body,
        one per upstream write for a stream (replayed chunk by chunk).
    @ivar forced: the TTL came from the client's opt-in, not the response.
    """

    primary: str
    variant: str
    method: str
    url: str
    scope: str
    status: int
    headers: tuple[tuple[str, str], ...]
    chunks: tuple[bytes, ...]
    streamed: bool
    vary: tuple[tuple[str, str | None], ...]
    stored_at: float
    expires_at: float
    forced: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def size(self) -> int:
        """Bytes counted against the memory budget."""
        return (
            sum(len(c) for c in self.chunks)
            + sum(len(n) + len(v) + 4 for n, v in self.headers)
            + len(self.url)
            + ENTRY_OVERHEAD
        )

    def header(self, name: str) -> str | None:
        """The stored value of C{name} (repeated values joined by C{", "})."""
        lname = name.lower()
        values = [v for n, v in self.headers if n.lower() == lname]
        return ", ".join(values) if values else None

    def fresh(self, now: float) -> bool:
        return now < self.expires_at

    def age(self, now: float) -> int:
        return max(0, int(now - self.stored_at))

    # -- serialisation (Redis) ---------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": 1,
                "primary": self.primary,
                "variant": self.variant,
                "method": self.method,
                "url": self.url,
                "scope": self.scope,
                "status": self.status,
                "headers": [list(h) for h in self.headers],
                "chunks": [base64.b64encode(c).decode("ascii") for c in self.chunks],
                "streamed": self.streamed,
                "vary": [list(v) for v in self.vary],
                "stored_at": self.stored_at,
                "expires_at": self.expires_at,
                "forced": self.forced,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> CachedResponse:
        """Raises ValueError (or a subclass) for anything that is not an entry."""
        data: Any = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError("not a cache entry")
        try:
            return cls(
                primary=str(data["primary"]),
                variant=str(data["variant"]),
                method=str(data["method"]),
                url=str(data["url"]),
                scope=str(data["scope"]),
                status=int(data["status"]),
                headers=tuple((str(n), str(v)) for n, v in data["headers"]),
                chunks=tuple(base64.b64decode(c) for c in data["chunks"]),
                streamed=bool(data["streamed"]),
                vary=tuple((str(n), None if v is None else str(v)) for n, v in data["vary"]),
                stored_at=float(data["stored_at"]),
                expires_at=float(data["expires_at"]),
                forced=bool(data.get("forced", False)),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed cache entry: {e}") from e
