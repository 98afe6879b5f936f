"""The document index of both cache backends (the Redis one against the machine's real Redis):
invalidating a document evicts exactly the answers that used it, in its cache group; an index stays
within its cap and what leaves it leaves the cache; it outlives its answers; an answer generated while
its document was invalidated is never stored; and under concurrent puts and invalidations no answer
outlives an invalidation of a document it used.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragllm.cache import CachedResponse
from ragllm.cache.index import INVALIDATIONS_KEPT_S, document_index
from ragllm.cache.memory import MemoryCache
from ragllm.cache.redis_impl import RedisCache
from ragllm.config import RedisSettings
from ragllm.redis_link import RedisLink

ANSWER = CachedResponse("Paris [doc1].", "stop", 37, 3)
A, B, C = (document_index("tenant", name) for name in ("doc-a", "doc-b", "doc-c"))


class Backend:
    """One cache backend under test, and a way to read its Redis directly when it has one."""

    def __init__(self, kind: str, redis_url: str, cap: int = 10_000) -> None:
        self.prefix = f"test-{uuid.uuid4().hex}"
        self.link = RedisLink(RedisSettings(url=redis_url, prefix=self.prefix, timeout_s=2.0))
        self.cache = RedisCache(self.link, cap) if kind == "redis" else MemoryCache(1 << 24, cap)
        self.kind = kind

    async def put(self, key: str, documents: tuple[str, ...], ttl_s: int = 60) -> None:
        lookup = await self.cache.lookup(key)
        await self.cache.put(key, ANSWER, ttl_s, documents, lookup.as_of)

    async def present(self, *keys: str) -> set[str]:
        return {key for key in keys if await self.cache.get(key) is not None}

    async def indexed(self, document: str) -> int:
        if self.kind == "memory":
            return self.cache.indexed(document)
        return await self.link.client.zcard(self.link.key("cache", "doc", document))

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.kind == "redis":
            keys = [key async for key in self.link.client.scan_iter(f"{self.prefix}:*")]
            if keys:
                await self.link.client.delete(*keys)
        await self.link.aclose()


BOTH = pytest.mark.parametrize("kind", ["memory", "redis"])


@BOTH
async def test_invalidating_a_document_evicts_exactly_the_answers_that_used_it(
    kind, shared_redis_url
):
    async with Backend(kind, shared_redis_url) as backend:
        await backend.put("ab", (A, B))
        await backend.put("b", (B,))
        await backend.put("c", (C,))
        await backend.put("none", ())
        assert await backend.cache.invalidate([A]) == 1
        assert await backend.present("ab", "b", "c", "none") == {"b", "c", "none"}
        assert await backend.cache.invalidate([B, C]) == 2
        assert await backend.present("ab", "b", "c", "none") == {"none"}
        assert await backend.cache.invalidate([A, B, C]) == 0  # nothing left: nothing counted
        assert [await backend.indexed(d) for d in (A, B, C)] == [0, 0, 0]


@BOTH
async def test_a_document_of_another_cache_group_is_another_index(kind, shared_redis_url):
    async with Backend(kind, shared_redis_url) as backend:
        mine, theirs = document_index("alpha", "doc-1"), document_index("beta", "doc-1")
        assert mine != theirs
        await backend.put("alpha-answer", (mine,))
        await backend.put("beta-answer", (theirs,))
        assert await backend.cache.invalidate([mine]) == 1
        assert await backend.present("alpha-answer", "beta-answer") == {"beta-answer"}


def test_no_id_can_spell_another_groups_index():
    assert document_index("a", "b:c") != document_index("a:b", "c")
    assert document_index(None, "x") != document_index("None", "x")
    assert document_index("", "x") != document_index(None, "x")


@BOTH
async def test_an_answer_generated_while_its_document_was_invalidated_is_not_stored(
    kind, shared_redis_url
):
    async with Backend(kind, shared_redis_url) as backend:
        lookup = await backend.cache.lookup("late")
        await backend.cache.invalidate([A])
        await backend.cache.put("late", ANSWER, 60, (A, B), lookup.as_of)
        assert await backend.present("late") == set()
        await backend.put("late", (A, B))  # a request that began after the invalidation is stored
        assert await backend.present("late") == {"late"}
        await backend.cache.put("other", ANSWER, 60, (C,), lookup.as_of)  # C was not invalidated
        assert await backend.present("other") == {"other"}


@BOTH
async def test_an_answer_whose_request_began_too_long_ago_is_not_stored(kind, shared_redis_url):
    async with Backend(kind, shared_redis_url) as backend:
        lookup = await backend.cache.lookup(None)
        too_old = lookup.as_of - INVALIDATIONS_KEPT_S - 1
        await backend.cache.put("old", ANSWER, 60, (A,), too_old)
        await backend.cache.put("plain", ANSWER, 60, (), too_old)  # no document: nothing to check
        assert await backend.present("old", "plain") == {"plain"}


async def test_past_its_cap_an_index_drops_the_soonest_to_expire_and_evicts_them(
    shared_redis_url,
):
    for kind in ("memory", "redis"):
        backend = Backend(kind, shared_redis_url, cap=5)
        try:
            for index in range(8):
                await backend.put(f"k{index}", (A, B) if index == 0 else (A,))
            assert await backend.indexed(A) == 5
            keys = [f"k{index}" for index in range(8)]
            assert await backend.present(*keys) == {f"k{index}" for index in range(3, 8)}, kind
            assert await backend.cache.invalidate([B]) == 0  # k0 left the cache with its index
            assert await backend.cache.invalidate([A]) == 5
            assert await backend.present(*keys) == set()
        finally:
            await backend.aclose()


async def test_a_redis_index_lives_at_least_as_long_as_its_answers(shared_redis_url):
    backend = Backend("redis", shared_redis_url)
    try:
        client, link = backend.link.client, backend.link
        await backend.put("short", (A,), ttl_s=50)
        await backend.put("long", (A,), ttl_s=500)
        await backend.put("short-again", (A,), ttl_s=50)  # never lowers the index's TTL
        index_ttl = await client.ttl(link.key("cache", "doc", A))
        assert 495 <= index_ttl <= 500
        assert await client.ttl(link.key("cache", "long")) <= index_ttl
        mark_ttl_before = await client.ttl(link.key("cache", "invalidated", A))
        assert mark_ttl_before == -2  # no invalidation yet: no mark
        await backend.cache.invalidate([A])
        mark_ttl = await client.ttl(link.key("cache", "invalidated", A))
        assert INVALIDATIONS_KEPT_S - 5 <= mark_ttl <= INVALIDATIONS_KEPT_S
        assert await client.exists(link.key("cache", "doc", A)) == 0
    finally:
        await backend.aclose()


async def test_expired_answers_leave_the_redis_index_on_the_next_store(shared_redis_url):
    backend = Backend("redis", shared_redis_url)
    try:
        await backend.put("brief", (A,), ttl_s=1)
        await asyncio.sleep(1.1)
        await backend.put("fresh", (A,))
        assert await backend.indexed(A) == 1
        assert await backend.cache.invalidate([A]) == 1
    finally:
        await backend.aclose()


async def test_an_invalidation_with_redis_away_is_a_503_not_a_silent_success():
    from ragllm.errors import CacheUnavailable

    link = RedisLink(RedisSettings(url="redis://127.0.0.1:1/0", timeout_s=0.1))
    cache = RedisCache(link)
    with pytest.raises(CacheUnavailable) as raised:
        await cache.invalidate([A])
    assert raised.value.status_code == 503
    assert (await cache.lookup("k")).as_of is None  # and an answer can then not be listed
    await link.aclose()


async def test_the_memory_index_is_counted_in_the_byte_bound():
    cache = MemoryCache(max_bytes=2400)
    documents = tuple(document_index(None, f"d{i}") for i in range(20))
    await cache.put("many", ANSWER, 60, documents)
    await cache.put("few", ANSWER, 60, documents[:1])
    assert cache.num_bytes <= 2400
    assert len(cache) == 1 and await cache.get("few") is not None  # 20 listings did not fit twice


# -- concurrency --------------------------------------------------------------------------------
DOCUMENTS = [document_index("g", f"d{i}") for i in range(6)]
# The documents each key's answer used (one request, one prompt: the same ones every time).
KEY_DOCUMENTS = [frozenset({i % 6, (i // 2) % 6}) for i in range(12)]
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.integers(0, 11),  # the answer's key
            st.integers(0, 3),  # time between its lookup and its store (generation), 4 ms each
        ),
        st.tuples(st.just("invalidate"), st.sets(st.integers(0, 5), min_size=1, max_size=2)),
    ),
    min_size=1,
    max_size=40,
)


async def _run_concurrently(cache, ops, seed: int) -> tuple[dict, dict]:
    """Each op a task; returns, per key, the order number of its latest lookup, and per document,
    the order number of its latest invalidation (numbers taken so that a lookup numbered below an
    invalidation surely reached the cache before it)."""
    order = iter(range(10**9))
    looked_up: dict[int, int] = {}
    invalidated: dict[int, int] = {}
    rng = random.Random(seed)

    async def put(key: int, turns: int) -> None:
        if rng.random() < 0.5:
            await asyncio.sleep(0)
        lookup = await cache.lookup(f"k{key}")
        looked_up[key] = max(looked_up.get(key, -1), next(order))  # after the lookup's answer
        await asyncio.sleep(turns * 0.004)  # generating: other tasks run meanwhile
        used = tuple(DOCUMENTS[d] for d in KEY_DOCUMENTS[key])
        await cache.put(f"k{key}", ANSWER, 60, used, lookup.as_of)

    async def invalidate(used: set[int]) -> None:
        await asyncio.sleep(rng.random() * 0.012)  # lands among the others' lookups and stores
        number = next(order)  # before the invalidation is sent
        for document in used:
            invalidated[document] = number
        await cache.invalidate([DOCUMENTS[d] for d in used])

    await cache.lookup(None)  # connected before the race starts
    tasks = [put(op[1], op[2]) if op[0] == "put" else invalidate(op[1]) for op in ops]
    await asyncio.gather(*tasks)
    return looked_up, invalidated


async def _assert_no_stale_answer(cache, looked_up, invalidated) -> None:
    """An answer whose documents were invalidated after every lookup of its key must be gone."""
    for key, latest in looked_up.items():
        if await cache.get(f"k{key}") is None:
            continue
        stale = [d for d in KEY_DOCUMENTS[key] if invalidated.get(d, -1) > latest]
        assert not stale, f"k{key} outlived the invalidation of documents {stale}"


@settings(max_examples=150, deadline=None)
@given(ops=operations, cap=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_memory_cache_concurrent_puts_and_invalidations_keep_it_consistent(ops, cap, seed):
    cache = MemoryCache(max_bytes=3000, max_answers_per_document=cap)

    async def scenario() -> None:
        looked_up, invalidated = await _run_concurrently(cache, ops, seed)
        await _assert_no_stale_answer(cache, looked_up, invalidated)
        # The index and the entries agree, both ways, within every bound.
        entries, indexes = cache._entries, cache._indexes  # the invariant is about them
        assert cache.num_bytes == sum(entry.size(key) for key, entry in entries.items())
        assert cache.num_bytes <= cache.max_bytes
        for document, listed in indexes.items():
            assert 0 < len(listed) <= cap
            assert all(document in entries[key].documents for key in listed)
        for key, entry in entries.items():
            assert all(key in indexes[document] for document in entry.documents)

    asyncio.run(scenario())


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=operations, seed=st.integers(0, 2**16))
def test_redis_cache_concurrent_puts_and_invalidations_leave_no_stale_answer(
    shared_redis_url, ops, seed
):
    async def scenario() -> None:
        backend = Backend("redis", shared_redis_url, cap=3)
        try:
            looked_up, invalidated = await _run_concurrently(backend.cache, ops, seed)
            await _assert_no_stale_answer(backend.cache, looked_up, invalidated)
            client = redis.asyncio.Redis.from_url(shared_redis_url)
            for document in DOCUMENTS:
                index = backend.link.key("cache", "doc", document)
                assert await client.zcard(index) <= 3
                for member in await client.zrange(index, 0, -1):
                    ttl = await client.ttl(backend.link.key("cache", member.decode()))
                    assert ttl in (-2,) or ttl <= await client.ttl(index)
            await client.aclose()
        finally:
            await backend.aclose()

    asyncio.run(scenario())
