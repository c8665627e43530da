"""
Token validation on the proxy's hot path, with in-process caches.

Validated tokens and projects are cached (bounded LRU, TTL as a backstop)
and dropped the moment the management API announces a change through the
L{InvalidationHub}, so a revoked token or a deactivated project is refused
on the very next request. Tokens with a quota are counted atomically in
the store on every request; unlimited ones through the L{UsageFlusher}.
"""

from __future__ import annotations

import datetime
from collections import OrderedDict
from typing import Any, Generic, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.invalidation import InvalidationHub
from llmproxy.store.interface import IStore
from llmproxy.store.records import Project, Token, UsageOutcome
from llmproxy.tokens.format import hash_token, is_valid_format
from llmproxy.tokens.usage import UsageFlusher

log = Logger()

#: Fraction of a cache entry's TTL after which its use triggers a background refresh.
REFRESH_AHEAD = 0.5
#: Seconds between the use that triggers a background refresh and its store
#: read: the read runs in the database thread pool, and started at once it
#: would compete for the interpreter with the request that triggered it.
REFRESH_DELAY = 0.1
#: Longest time (seconds, capped by the token cache's TTL) a token the store
#: does not know is answered 401 without asking the store again. Tokens are
#: random secrets made by the store's writer, so none can be presented
#: before it exists: caching their absence never refuses a real token.
NOT_FOUND_TTL = 30.0

K = TypeVar("K")
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """A bounded LRU whose entries also carry the time they were stored."""

    def __init__(self, clock: IReactorTime, max_entries: int) -> None:
        self._clock = clock
        self.max_entries = max_entries
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K, max_age: float) -> V | None:
        entry = self.get_entry(key, max_age)
        return None if entry is None else entry[1]

    def get_entry(self, key: K, max_age: float) -> tuple[float, V] | None:
        """C{(age, value)} of an entry younger than C{max_age}, or None."""
        entry = self._data.get(key)
        if entry is None:
            return None
        stored, value = entry
        age = self._clock.seconds() - stored
        if age >= max_age:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return age, value

    def put(self, key: K, value: V) -> None:
        if self.max_entries <= 0:
            return
        self._data[key] = (self._clock.seconds(), value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def pop(self, key: K) -> None:
        self._data.pop(key, None)

    def remove_where(self, predicate: Any) -> int:
        doomed = [k for k, (_, v) in self._data.items() if predicate(v)]
        for k in doomed:
            del self._data[k]
        return len(doomed)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


@attrs.frozen
class Rejection(Exception):
    """Why a proxied request is refused: the exact JSON error for the client."""

    status: int
    error: str
    code: str
    description: str = ""
    #: Short reason for logs, metrics and the audit trail.
    kind: str = "auth"
    token: Token | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.code}"


def _no_api_key(token: Token) -> Rejection:
    return Rejection(
        503,
        "Upstream authentication error",
        "upstream_auth_error",
        "failed to load upstream API key",
        kind="dependency",
        token=token,
    )


def _invalid(description: str) -> Rejection:
    return Rejection(401, "Invalid token", "invalid_token", description)


# A new exception for every refusal: raising one instance again and again
# would chain every raise's traceback onto it, and with them the frames
# (and the requests) of every refused request.


def _missing_token() -> Rejection:
    return _invalid("missing or invalid authorization header")


def _not_found() -> Rejection:
    return Rejection(401, "Token not found", "token_not_found")


def extract_bearer(authorization: bytes | None) -> str:
    """
    The token from C{Authorization: Bearer <token>}; the scheme is matched
    case-insensitively and the rest trimmed. Raises L{Rejection}.
    """
    if not authorization:
        raise _missing_token()
    scheme, sep, rest = authorization.partition(b" ")
    if not sep or scheme.lower() != b"bearer":
        raise _missing_token()
    return rest.strip().decode("utf-8", "replace")


class TokenValidator:
    """
    Public API: L{validate} (token checks and usage), L{check_project}
    (the project-active guard), L{api_key} (the provider key to send
    upstream), L{invalidate} (subscribed to the hub).
    """

    def __init__(
        self,
        store: IStore,
        clock: IReactorTime,
        *,
        usage: UsageFlusher | None = None,
        hub: InvalidationHub | None = None,
        token_cache_ttl: float = 300.0,
        token_cache_max: int = 10000,
        project_cache_ttl: float = 5.0,
        api_key_cache_ttl: float = 30.0,
        project_cache_max: int = 10000,
    ) -> None:
        self.store = store
        self.clock = clock
        self.usage = usage
        self.token_cache_ttl = token_cache_ttl
        self.project_cache_ttl = project_cache_ttl
        self.api_key_cache_ttl = api_key_cache_ttl
        self._tokens: TTLCache[str, Token] = TTLCache(clock, token_cache_max)
        #: Hashes the store did not know, apart from the tokens so that a
        #: flood of made-up tokens cannot push real ones out of their cache.
        self._unknown: TTLCache[str, bool] = TTLCache(clock, token_cache_max)
        self.not_found_ttl = min(token_cache_ttl, NOT_FOUND_TTL)
        #: Per token hash being read from the store: the requests waiting for it.
        self._token_reads: dict[str, list[defer.Deferred[Token | None]]] = {}
        self._projects: TTLCache[str, Project] = TTLCache(clock, project_cache_max)
        #: Bumped by every invalidation, so a lookup that started before a
        #: change never caches what it read.
        self._generation = 0
        #: Optional L{llmproxy.metrics.Metrics}: token-cache hits and misses.
        self.metrics: Any = None
        #: Keys of the entries being read again in the background.
        self._refreshing: set[tuple[str, str]] = set()
        if hub is not None:
            hub.subscribe(self.invalidate)

    @classmethod
    def from_config(
        cls,
        config: Any,
        store: IStore,
        clock: IReactorTime,
        *,
        usage: UsageFlusher | None,
        hub: InvalidationHub | None,
        metrics: Any = None,
    ) -> TokenValidator:
        key_ttl = config.api_key_cache_ttl if config.api_key_cache_max > 0 else 0.0
        validator = cls(
            store,
            clock,
            usage=usage,
            hub=hub,
            token_cache_ttl=config.token_cache_ttl,
            token_cache_max=config.token_cache_max,
            project_cache_ttl=config.active_cache_ttl,
            api_key_cache_ttl=key_ttl,
            project_cache_max=max(config.active_cache_max, config.api_key_cache_max),
        )
        validator.metrics = metrics
        return validator

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    # -- invalidation ------------------------------------------------------------------

    def invalidate(self, kind: str, key: str) -> None:
        """A token (by hash) or a project (by id) changed: forget what we know of it."""
        self._generation += 1
        if kind == "token":
            self._tokens.pop(key)
            self._unknown.pop(key)
        elif kind == "project":
            self._projects.pop(key)
            self._tokens.remove_where(lambda t: t.project_id == key)
        else:
            self._tokens.clear()
            self._unknown.clear()
            self._projects.clear()

    # -- tokens ------------------------------------------------------------------------

    async def validate(self, presented: str, count: bool = True) -> Token:
        """
        The reference's order: format, lookup, active, expiry, then (with
        C{count}) quota or usage, see L{count}. Raises L{Rejection}.
        """
        if not is_valid_format(presented):
            raise _invalid("invalid token format: invalid token format")
        token_hash = hash_token(presented)
        token = self._cached(self._tokens, "token", token_hash, self.token_cache_ttl)
        if token is not None:
            self.validate_cached(token)
        elif self._unknown.get(token_hash, self.not_found_ttl) is not None:
            if self.metrics is not None:
                self.metrics.token_cache_hit()
            raise _not_found()
        else:
            if self.metrics is not None:
                self.metrics.token_cache_miss()
            try:
                token = await self._read_token(token_hash)
            except defer.CancelledError:
                raise  # the client went away: not a store failure
            except Exception as e:
                log.failure("token lookup failed")
                raise _invalid("failed to retrieve token") from e
            if token is None:
                raise _not_found()
            self._check_usable(token)
        if count:
            await self.count(token)
        return token

    def _read_token(self, token_hash: str) -> defer.Deferred[Token | None]:
        """
        The store's record of a token (None if it has none), read once for
        all the requests that ask for it while the read is under way, and
        cached (an unknown token for at most L{not_found_ttl}) unless an
        invalidation came in meanwhile.
        """
        mine: defer.Deferred[Token | None] = defer.Deferred()
        waiting = self._token_reads.get(token_hash)
        if waiting is not None:
            waiting.append(mine)
            return mine
        self._token_reads[token_hash] = [mine]
        generation = self._generation
        read = defer.maybeDeferred(self.store.get_token_by_hash, token_hash)
        read.addBoth(self._token_read, token_hash, generation)
        return mine

    def _token_read(self, result: Any, token_hash: str, generation: int) -> None:
        waiting = self._token_reads.pop(token_hash, [])
        if not isinstance(result, Failure) and generation == self._generation:
            if result is None:
                self._unknown.put(token_hash, True)
            else:
                self._tokens.put(token_hash, result)
        for d in waiting:
            if d.called:
                continue  # cancelled: the client went away
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def cached_token(self, presented: str) -> Token | None:
        """
        The cached token for a well-formed C{presented} token, without any
        side effect (no metrics, no checks), or None when L{validate} would
        have to ask the store or refuse it. Lets the proxy take a
        synchronous path; it must still run L{validate_cached} on the result.
        """
        if not is_valid_format(presented):
            return None
        return self._cached(self._tokens, "token", hash_token(presented), self.token_cache_ttl)

    def validate_cached(self, token: Token) -> None:
        """L{validate} (without counting) for a token L{cached_token} returned."""
        if self.metrics is not None:
            self.metrics.token_cache_hit()
        self._check_usable(token)

    def counts_synchronously(self, token: Token) -> bool:
        """Whether L{count} needs no store round trip for C{token} (no quota)."""
        return not (token.max_requests is not None and token.max_requests > 0)

    def count_now(self, token: Token) -> None:
        """L{count} for a token L{counts_synchronously} accepted."""
        if self.usage is not None:
            self.usage.add_request(token.token_hash, self.clock.seconds())

    def cached_project(self, project_id: str, max_age: float) -> Project | None:
        """The cached project no older than C{max_age}, or None (no side effect)."""
        if max_age <= 0:
            return None
        return self._cached(self._projects, "project", project_id, max_age)

    # -- refresh ahead -----------------------------------------------------------------

    def _cached(self, cache: TTLCache[str, Any], kind: str, key: str, max_age: float) -> Any:
        """
        A cached entry; once it is past L{REFRESH_AHEAD} of its TTL it is
        still served, and read again from the store in the background
        (L{REFRESH_DELAY} later), so a steadily used token or project never
        makes a request wait for the store (the TTL still bounds how stale an
        answer can be).
        """
        entry = cache.get_entry(key, max_age)
        if entry is None:
            return None
        age, value = entry
        if age >= max_age * REFRESH_AHEAD and (kind, key) not in self._refreshing:
            self._refreshing.add((kind, key))
            # Later, off the path of the request that is using the entry now;
            # before the entry expires whenever its TTL leaves time for that.
            delay = min(REFRESH_DELAY, (max_age - age) / 2)
            self.clock.callLater(delay, self._start_refresh, cache, kind, key)
        return value

    def _start_refresh(self, cache: TTLCache[str, Any], kind: str, key: str) -> None:
        defer.ensureDeferred(self._refresh(cache, kind, key))

    async def _refresh(self, cache: TTLCache[str, Any], kind: str, key: str) -> None:
        generation = self._generation
        try:
            if kind == "token":
                value: Any = await self.store.get_token_by_hash(key)
            else:
                value = await self.store.get_project(key)
        except Exception as e:
            # The entry expires as usual and the next request asks the store.
            log.debug("refreshing a cached {kind} failed: {why}", kind=kind, why=e)
            return
        finally:
            self._refreshing.discard((kind, key))
        if generation != self._generation:
            return  # changed meanwhile: the invalidation already dropped it
        if value is None:
            cache.pop(key)
        else:
            cache.put(key, value)

    def check_cached_project(self, token: Token, project: Project) -> None:
        """L{check_project} for a project L{cached_project} returned."""
        if not project.is_active:
            raise Rejection(403, "Project is inactive", "project_inactive", token=token)

    def api_key_of(self, token: Token, project: Project) -> str:
        """L{api_key} for a project L{cached_project} returned."""
        if not project.api_key:
            raise _no_api_key(token)
        return project.api_key

    async def count(self, token: Token) -> None:
        """
        Count one request that goes upstream (cache hits are not counted):
        atomically in the store for a token with a quota (429 when it is
        used up), in the batched L{UsageFlusher} otherwise.
        """
        if self.counts_synchronously(token):
            self.count_now(token)
        else:
            await self._count_limited(token)

    def _check_usable(self, token: Token) -> None:
        if not token.is_active:
            raise Rejection(401, "Token is inactive", "token_inactive", token=token)
        if token.expires_at is not None and self.clock.seconds() > token.expires_at.timestamp():
            raise Rejection(401, "Token has expired", "token_expired", token=token)

    async def _count_limited(self, token: Token) -> None:
        try:
            outcome = await self.store.count_request(token.token_hash, self.now())
        except Exception as e:
            log.failure("counting a request against a token quota failed")
            raise _invalid("failed to track token usage") from e
        if outcome is UsageOutcome.OK:
            return
        # The store knows better than our cache: forget the cached record.
        self._tokens.pop(token.token_hash)
        if outcome is UsageOutcome.QUOTA_EXCEEDED:
            raise Rejection(
                429, "Rate limit exceeded", "rate_limit_exceeded", kind="quota", token=token
            )
        if outcome is UsageOutcome.INACTIVE:
            raise Rejection(401, "Token is inactive", "token_inactive", token=token)
        if outcome is UsageOutcome.EXPIRED:
            raise Rejection(401, "Token has expired", "token_expired", token=token)
        raise Rejection(401, "Token not found", "token_not_found", token=token)

    # -- projects ----------------------------------------------------------------------

    async def _project(self, project_id: str, max_age: float) -> Project | None:
        project = self.cached_project(project_id, max_age)
        if project is not None:
            return project
        generation = self._generation
        project = await self.store.get_project(project_id)
        if project is not None and generation == self._generation:
            self._projects.put(project_id, project)
        return project

    async def check_project(self, token: Token) -> Project:
        """The project-active guard. Raises L{Rejection} (403 or 503)."""
        try:
            project = await self._project(token.project_id, self.project_cache_ttl)
        except Exception as e:
            log.failure("project status lookup failed")
            raise Rejection(
                503,
                "Service temporarily unavailable",
                "service_unavailable",
                kind="dependency",
                token=token,
            ) from e
        if project is None:
            raise Rejection(403, "Project is inactive", "project_inactive", token=token)
        self.check_cached_project(token, project)
        return project

    async def api_key(self, token: Token) -> str:
        """The project's provider key. Raises L{Rejection} 503 when it cannot be had."""
        try:
            project = await self._project(token.project_id, self.api_key_cache_ttl)
        except Exception:
            log.failure("loading the upstream API key failed")
            project = None
        if project is None:
            raise _no_api_key(token)
        return self.api_key_of(token, project)
