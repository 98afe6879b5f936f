"""The KV block pool: prefix hashes, sharing, reference counts, least-recently-used eviction."""

from __future__ import annotations

import pytest

from ragllm.engines.inprocess.kv.blocks import BlockPool, extend_block_hashes


def _hashes(tokens: list[int], block_size: int = 4, salt: bytes = b"model") -> list[bytes]:
    hashes: list[bytes] = []
    extend_block_hashes(hashes, tokens, block_size, salt)
    return hashes


def test_hashes_chain_over_every_token_before_a_block_and_the_salt():
    a = _hashes([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(a) == 2  # the ninth token is not a full block
    b = _hashes([0, 2, 3, 4, 5, 6, 7, 8])
    assert a[1] != b[1]  # same second block, different first: not the same keys and values
    assert _hashes([1, 2, 3, 4]) != _hashes([1, 2, 3, 4], salt=b"other model")
    grown = a[:1]
    extend_block_hashes(grown, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4, b"model")
    assert grown == a


def test_a_registered_block_is_found_shared_and_kept_after_release_until_evicted():
    pool = BlockPool(num_blocks=5, block_size=4)
    hashes = _hashes(list(range(8)))
    first = pool.allocate(2)
    for block, block_hash in zip(first, hashes):
        pool.register(block, block_hash)
    assert pool.cached_prefix(hashes) == first
    pool.take(first)  # a second sequence shares them
    pool.release(first)
    pool.release(first)
    assert pool.num_free == 4 and pool.cached_prefix(hashes) == first  # unreferenced, still cached
    taken = pool.allocate(2)  # never-cached blocks go first
    assert not set(taken) & set(first) and pool.cached_prefix(hashes) == first
    evicting = pool.allocate(1)  # then the least recently freed cached block: the last one
    assert evicting == [first[1]] and pool.cached_prefix(hashes) == first[:1]
    with pytest.raises(RuntimeError, match="2 KV blocks asked for, 1 free"):
        pool.allocate(2)


def test_with_prefix_caching_off_nothing_is_found():
    pool = BlockPool(num_blocks=4, block_size=4, prefix_caching=False)
    hashes = _hashes(list(range(4)))
    block = pool.allocate(1)[0]
    pool.register(block, hashes[0])
    assert pool.cached_prefix(hashes) == []


def test_the_same_tokens_computed_twice_keep_the_first_copy():
    pool = BlockPool(num_blocks=3, block_size=4)
    block_hash = _hashes(list(range(4)))[0]
    first, second = pool.allocate(2)
    pool.register(first, block_hash)
    pool.register(second, block_hash)
    pool.release([first, second])
    assert pool.cached_prefix([block_hash]) == [first]
    assert pool.allocate(2)[0] == second  # the duplicate went back uncached: handed out first


def test_cache_scopes_name_tenant_and_salt_without_ambiguity():
    from ragllm.generation import CacheScope

    assert (
        CacheScope().digest() == b""
    )  # unscoped: the model's salt alone, as before scopes existed
    digests = {
        CacheScope(group, salt).digest()
        for group, salt in [
            ("a", None),
            ("a", "b:c"),
            ("a:b", "c"),
            ('a", "b', None),
            ("a", '", "b'),
            (None, "a"),
            ("b", None),
        ]
    }
    assert len(digests) == 7 and all(len(d) == 32 for d in digests)
    assert CacheScope("a", "x").digest() == CacheScope("a", "x").digest()
