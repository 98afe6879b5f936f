"""Response cache in Redis, shared by every replica. A Redis failure reads as a miss."""

from __future__ import annotations

from ragllm.cache import CachedResponse
from ragllm.redis_link import RedisLink, RedisUnavailable


class RedisCache:
    name = "redis"

    def __init__(self, link: RedisLink) -> None:
        self._link = link

    async def get(self, key: str) -> CachedResponse | None:
        try:
            raw = await self._link.call(
                "cache_get", lambda redis: redis.get(self._link.key("cache", key))
            )
        except RedisUnavailable:
            return None
        return CachedResponse.loads(raw) if raw is not None else None

    async def put(self, key: str, value: CachedResponse, ttl_s: int) -> None:
        try:
            await self._link.call(
                "cache_put",
                lambda redis: redis.set(self._link.key("cache", key), value.dumps(), ex=ttl_s),
            )
        except RedisUnavailable:
            pass
