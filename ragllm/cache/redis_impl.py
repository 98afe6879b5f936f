"""Response cache in Redis, shared by every replica. A Redis failure reads as a miss (and an
invalidation that cannot reach Redis fails loudly: it cannot promise anything was evicted).

Under the cache's namespace: ``cache:<key>`` an answer; ``cache:doc:<index>`` a sorted set of the
answers that used one document in one cache group, scored by when each expires;
``cache:invalidated:<index>`` when that document was last invalidated (``cache/index.py``). Stores
and invalidations are Lua scripts, each one atomic step on Redis's own clock, so replicas' clocks
never matter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from ragllm.cache import CachedResponse, Lookup
from ragllm.cache.index import INVALIDATIONS_KEPT_S
from ragllm.errors import CacheUnavailable
from ragllm.redis_link import RedisLink, RedisUnavailable

# Invalidation scripts sent at once (each one document's index).
INVALIDATIONS_IN_FLIGHT = 16
# Redis's clock as seconds: TIME's seconds and microseconds (a double holds both exactly).
_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"

# KEYS: the answer, then N document indexes, then their N invalidation marks.
# ARGV: the answer's bytes, TTL s, as_of (Redis time, "" for now), cap per index, the answer's key
# (an index member), kept_s (how long invalidations are remembered), the answers' key prefix.
# Stores nothing if a document was invalidated at or after as_of; whatever leaves an index (expired,
# or past the cap) is evicted with it.
_PUT_LUA = (
    _NOW
    + """
local n = (#KEYS - 1) / 2
local as_of = tonumber(ARGV[3]) or now
if as_of <= now - tonumber(ARGV[6]) then return 0 end
for i = 1, n do
  local mark = redis.call('GET', KEYS[1 + n + i])
  if mark and tonumber(mark) >= as_of then return 0 end
end
local ttl, cap = tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
for i = 1, n do
  local index = KEYS[1 + i]
  redis.call('ZADD', index, now + ttl, ARGV[5])
  local leaving = redis.call('ZRANGEBYSCORE', index, '-inf', now)
  local over = redis.call('ZCARD', index) - #leaving - cap
  if over > 0 then
    for _, member in ipairs(redis.call('ZRANGE', index, #leaving, #leaving + over - 1)) do
      leaving[#leaving + 1] = member
    end
  end
  for _, member in ipairs(leaving) do
    redis.call('DEL', ARGV[7] .. member)
    redis.call('ZREM', index, member)
  end
  if redis.call('TTL', index) < ttl then redis.call('EXPIRE', index, ttl) end
end
return 1
"""
)

# KEYS: one document index, its invalidation mark. ARGV: kept_s, the answers' key prefix.
# Returns how many live answers were evicted.
_INVALIDATE_LUA = (
    _NOW
    + """
redis.call('SET', KEYS[2], string.format('%.6f', now), 'EX', ARGV[1])
local evicted = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  evicted = evicted + redis.call('DEL', ARGV[2] .. member)
end
redis.call('DEL', KEYS[1])
return evicted
"""
)


class RedisCache:
    name = "redis"

    def __init__(self, link: RedisLink, max_answers_per_document: int = 10_000) -> None:
        self._link = link
        self.max_answers_per_document = max_answers_per_document
        self._put_script = link.client.register_script(_PUT_LUA)
        self._invalidate_script = link.client.register_script(_INVALIDATE_LUA)

    async def get(self, key: str) -> CachedResponse | None:
        return (await self.lookup(key)).response

    async def lookup(self, key: str | None) -> Lookup:
        """The entry and Redis's clock, in one round trip."""

        async def read(redis: Any) -> list[Any]:
            pipe = redis.pipeline(transaction=False)
            if key is not None:
                pipe.get(self._link.key("cache", key))
            pipe.time()
            return await pipe.execute()

        try:
            *found, (seconds, microseconds) = await self._link.call("cache_get", read)
        except RedisUnavailable:
            return Lookup(None, None)
        raw = found[0] if found else None
        return Lookup(
            CachedResponse.loads(raw) if raw is not None else None, seconds + microseconds / 1e6
        )

    async def put(
        self,
        key: str,
        value: CachedResponse,
        ttl_s: int,
        documents: Sequence[str] = (),
        as_of: float | None = None,
    ) -> None:
        link, entry = self._link, self._link.key("cache", key)
        documents = tuple(dict.fromkeys(documents))
        if documents:
            keys = [
                entry,
                *(link.key("cache", "doc", d) for d in documents),
                *(link.key("cache", "invalidated", d) for d in documents),
            ]
            args = [
                value.dumps(),
                ttl_s,
                "" if as_of is None else repr(as_of),
                self.max_answers_per_document,
                key,
                INVALIDATIONS_KEPT_S,
                link.key("cache", ""),
            ]
            store = lambda redis: self._put_script(keys=keys, args=args, client=redis)  # noqa: E731
        else:
            store = lambda redis: redis.set(entry, value.dumps(), ex=ttl_s)  # noqa: E731
        try:
            await link.call("cache_put", store)
        except RedisUnavailable:
            pass

    async def invalidate(self, documents: Sequence[str]) -> int:
        """One script per document, so no call holds Redis for long (a few in flight at once);
        raises CacheUnavailable (503) when Redis cannot be reached: an invalidation is retried,
        never assumed done."""
        documents, evicted = list(dict.fromkeys(documents)), 0
        for start in range(0, len(documents), INVALIDATIONS_IN_FLIGHT):
            batch = documents[start : start + INVALIDATIONS_IN_FLIGHT]
            try:
                counts = await asyncio.gather(*(self._invalidate_one(d) for d in batch))
            except RedisUnavailable as exc:
                raise CacheUnavailable(
                    f"the response cache's Redis is unavailable ({exc}); at least {evicted} "
                    "answers were evicted before it failed: retry the whole invalidation"
                ) from exc
            evicted += sum(counts)
        return evicted

    async def _invalidate_one(self, document: str) -> int:
        link = self._link
        keys = [link.key("cache", "doc", document), link.key("cache", "invalidated", document)]
        args = [INVALIDATIONS_KEPT_S, link.key("cache", "")]
        return await link.call(
            "cache_invalidate",
            lambda redis: self._invalidate_script(keys=keys, args=args, client=redis),
        )
