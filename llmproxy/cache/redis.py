"""
The Redis backend, shared by every instance. Layout under the key prefix:

- C{<prefix>e:<primary>}: a hash, one field per variant (RFC 9111 Vary),
  value C{"<expires_at> <entry JSON>"}; the key expires with its longest
  variant.
- C{<prefix>i:<sha1(method \\n url)>}: the set of primary keys stored for
  that method and URL (every body digest and scope), for exact purges.
- C{<prefix>urls}: a sorted set of C{"url \\n method"} (all scores 0), so a
  URL prefix purge is one C{ZRANGEBYLEX} away instead of a keyspace scan.

Writes and purges are Lua scripts: atomic and one round trip each (the
scripts touch keys they compute, so this layout needs a non-cluster Redis,
6.2 or later). Each write also checks two random URLs of the sorted set and
drops those whose index has expired, so the set follows the live entries.
Every call has a deadline; after a failure Redis is left alone for
C{retry_interval} seconds (calls fail at once with L{CacheUnavailable}),
then the next call probes it again.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from llmproxy.cache.entry import CachedResponse
from llmproxy.cache.interface import CacheUnavailable, ICacheBackend
from llmproxy.cache.policy import index_method
from llmproxy.redisconn import RedisOutage, call_with_timeout

log = Logger()

#: Variants kept under one primary key; a new one past this resets the key.
MAX_VARIANTS = 32

PUT_SCRIPT = """
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[6])
   and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local ttl = tonumber(ARGV[3])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
redis.call('SADD', KEYS[2], ARGV[4])
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
redis.call('ZADD', KEYS[3], 0, ARGV[5])
-- keep the URL list from growing: drop a couple of URLs whose index expired
for _, m in ipairs(redis.call('ZRANDMEMBER', KEYS[3], 2)) do
  local sep = string.find(m, '\\n', 1, true)
  if sep then
    local url, method = string.sub(m, 1, sep - 1), string.sub(m, sep + 1)
    local index = ARGV[7] .. redis.sha1hex(method .. '\\n' .. url)
    if redis.call('EXISTS', index) == 0 then redis.call('ZREM', KEYS[3], m) end
  end
end
return 1
"""

# Shared by both purges: delete every entry hash listed in an index set and
# count the variants that had not expired yet.
_PURGE_INDEX = """
local function purge_index(index, entry_prefix, now)
  local n = 0
  for _, primary in ipairs(redis.call('SMEMBERS', index)) do
    local k = entry_prefix .. primary
    local fields = redis.call('HVALS', k)
    for _, v in ipairs(fields) do
      local expires = tonumber(string.match(v, '^(%S+)'))
      if expires ~= nil and expires > now then n = n + 1 end
    end
    redis.call('DEL', k)
  end
  redis.call('DEL', index)
  return n
end
"""

PURGE_SCRIPT = (
    _PURGE_INDEX
    + """
local n = purge_index(KEYS[1], ARGV[1], tonumber(ARGV[3]))
redis.call('ZREM', KEYS[2], ARGV[2])
return n
"""
)

PURGE_PREFIX_SCRIPT = (
    _PURGE_INDEX
    + """
local members = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[3], ARGV[4], 'LIMIT', 0, tonumber(ARGV[5]))
local n = 0
for _, m in ipairs(members) do
  local sep = string.find(m, '\\n', 1, true)
  if sep then
    local url = string.sub(m, 1, sep - 1)
    local method = string.sub(m, sep + 1)
    local index = ARGV[2] .. redis.sha1hex(method .. '\\n' .. url)
    n = n + purge_index(index, ARGV[1], tonumber(ARGV[6]))
  end
  redis.call('ZREM', KEYS[1], m)
end
return {n, #members}
"""
)


@implementer(ICacheBackend)
class RedisCacheBackend:
    name = "redis"

    def __init__(
        self,
        pool: Any,
        clock: IReactorTime,
        prefix: str = "llmproxy:cache:",
        timeout: float = 0.25,
        scan_count: int = 2048,
        metrics: Any = None,
        retry_interval: float = 1.0,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.prefix = prefix
        self.timeout = timeout
        self.scan_count = scan_count
        self.metrics = metrics
        self.outage = RedisOutage(
            clock,
            retry_interval,
            "cache",
            metrics,
            down_message="cache Redis unavailable ({error}); requests go upstream as misses "
            "({suppressed} similar failures since the last message)",
            logger=log,
            back_message="Redis is back: the response cache is in use again",
        )

    @property
    def available(self) -> bool:
        return self.outage.available

    # -- key names ---------------------------------------------------------------

    def entry_key(self, primary: str) -> str:
        return f"{self.prefix}e:{primary}"

    def index_key(self, method: str, url: str) -> str:
        digest = hashlib.sha1(f"{index_method(method)}\n{url}".encode()).hexdigest()
        return f"{self.prefix}i:{digest}"

    @property
    def urls_key(self) -> str:
        return f"{self.prefix}urls"

    # -- ICacheBackend -------------------------------------------------------------

    @defer.inlineCallbacks
    def get(self, primary: str) -> Any:
        raw = yield self._call(lambda: self.pool.hgetall(self.entry_key(primary)))
        now = self.clock.seconds()
        found = []
        for value in (raw or {}).values():
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            expires, _, body = text.partition(" ")
            try:
                if float(expires) <= now:
                    continue
                found.append(CachedResponse.from_json(body))
            except ValueError:
                log.warn("ignoring a malformed cache entry under {primary}", primary=primary)
        return found

    @defer.inlineCallbacks
    def put(self, entry: CachedResponse, now: float) -> Any:
        ttl_ms = int((entry.expires_at - now) * 1000)
        if ttl_ms <= 0:
            return False
        method = index_method(entry.method)
        keys = [self.entry_key(entry.primary), self.index_key(method, entry.url), self.urls_key]
        args = [
            entry.variant,
            f"{entry.expires_at!r} {entry.to_json()}",
            ttl_ms,
            entry.primary,
            f"{entry.url}\n{method}",
            MAX_VARIANTS,
            self.prefix + "i:",
        ]
        yield self._call(lambda: self.pool.eval(PUT_SCRIPT, keys, args))
        return True

    @defer.inlineCallbacks
    def purge(self, method: str, url: str) -> Any:
        method = index_method(method.upper())
        keys = [self.index_key(method, url), self.urls_key]
        args = [self.prefix + "e:", f"{url}\n{method}", repr(self.clock.seconds())]
        count = yield self._call(lambda: self.pool.eval(PURGE_SCRIPT, keys, args))
        return int(count)

    @defer.inlineCallbacks
    def purge_prefix(self, prefix: str) -> Any:
        total = 0
        low = b"[" + prefix.encode("utf-8")
        high = low + b"\xff"
        while True:
            args = [
                self.prefix + "e:",
                self.prefix + "i:",
                low,
                high,
                self.scan_count,
                repr(self.clock.seconds()),
            ]
            result = yield self._call(
                lambda a=args: self.pool.eval(PURGE_PREFIX_SCRIPT, [self.urls_key], a)
            )
            deleted, seen = int(result[0]), int(result[1])
            total += deleted
            if seen < self.scan_count:
                return total

    def ping(self) -> defer.Deferred[Any]:
        return call_with_timeout(self.pool.ping(), self.timeout * 4, self.clock)  # type: ignore[no-any-return]

    def close(self) -> defer.Deferred[None]:
        return defer.maybeDeferred(self.pool.disconnect)

    # -- outage handling -----------------------------------------------------------

    @defer.inlineCallbacks
    def _call(self, command: Any) -> Any:
        if self.outage.skip():
            raise CacheUnavailable("Redis cache unavailable")
        try:
            result = yield call_with_timeout(command(), self.timeout, self.clock)
        except Exception as e:
            self.outage.failed(e)
            raise CacheUnavailable(f"Redis cache call failed: {type(e).__name__}") from e
        self.outage.succeeded()
        return result
