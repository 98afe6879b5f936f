"""Both cache backends: round trip, TTL expiry (the Redis one against a real Redis), byte bound."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from ragllm.cache import CachedResponse
from ragllm.cache.memory import MemoryCache
from ragllm.cache.redis_impl import RedisCache
from ragllm.config import RedisSettings
from ragllm.redis_link import RedisLink

ANSWER = CachedResponse("Paris.", "stop", 37, 3)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_round_trip_and_ttl_expiry(shared_redis_url, backend):
    link = RedisLink(RedisSettings(url=shared_redis_url, prefix=f"test-{uuid.uuid4().hex}"))
    cache = RedisCache(link) if backend == "redis" else MemoryCache(max_bytes=1 << 20)
    assert await cache.get("k") is None
    await cache.put("k", ANSWER, ttl_s=1)
    assert await cache.get("k") == ANSWER
    await asyncio.sleep(1.2)
    assert await cache.get("k") is None
    await link.aclose()


async def test_memory_cache_evicts_least_recently_used_within_its_byte_bound():
    cache = MemoryCache(max_bytes=1000)
    for index in range(20):
        await cache.put(f"k{index}", CachedResponse("x" * 100, "stop", 1, 1), ttl_s=60)
        await cache.get("k0")  # keep k0 hot
    assert cache.num_bytes <= 1000
    assert await cache.get("k0") is not None
    assert await cache.get("k1") is None
    assert await cache.get("k19") is not None


async def test_redis_cache_reads_as_a_miss_when_redis_is_unreachable():
    link = RedisLink(RedisSettings(url="redis://127.0.0.1:1/0", timeout_s=0.1))
    cache = RedisCache(link)
    await cache.put("k", ANSWER, ttl_s=60)
    assert await cache.get("k") is None
    assert link.status() == "degraded"
    await link.aclose()


def test_an_entry_keeps_its_prefix_cache_hit_and_older_entries_still_load():
    entry = CachedResponse("Paris.", "stop", 37, 3, cached_tokens=32)
    assert CachedResponse.loads(entry.dumps()) == entry
    assert CachedResponse.loads(b'["Paris.","stop",37,3]') == CachedResponse(
        "Paris.", "stop", 37, 3
    )
    assert CachedResponse.loads(b'["x","tool_calls",5,2,[{"id":"c"}]]').tool_calls == ({"id": "c"},)


def test_an_entry_keeps_its_closed_early_signal_and_older_entries_load_without_it():
    entry = CachedResponse('{"a": ""}', "length", 20, 40, closed_early=True)
    assert CachedResponse.loads(entry.dumps()) == entry
    assert not CachedResponse.loads(b'["x","length",5,2,[],3]').closed_early
    assert not CachedResponse("x", "length", 5, 2).dumps().endswith(b"true]")
