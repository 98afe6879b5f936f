"""The KV cache's blocks: a pool of fixed-size blocks, shared by prefix, reference-counted, and
evicted least-recently-used, as vLLM's automatic prefix caching keeps them.

A full block may be registered under a hash chained over every token up to its end (and a salt for
whatever else shapes the KV: model, dtype); a later prompt that starts with the same tokens takes
the same block instead of computing it again. A block no sequence references stays cached until its
memory is needed; blocks never cached are handed out first, then the least recently freed cached one.
Block 0 is never handed out: rows that only pad a batch write their keys and values there.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable

import numpy as np

SCRATCH_BLOCK = 0


def extend_block_hashes(
    hashes: list[bytes], token_ids: list[int], block_size: int, salt: bytes
) -> None:
    """Append the hash of every full block of ``token_ids`` past those ``hashes`` already holds."""
    first, end = len(hashes), len(token_ids) // block_size
    if first >= end:
        return
    # One conversion for all the new blocks (per block it cost more than the hashing).
    data = memoryview(
        np.asarray(token_ids[first * block_size : end * block_size], dtype=np.int64).tobytes()
    )
    width = block_size * 8
    parent = hashes[-1] if hashes else salt
    for offset in range(0, len(data), width):
        parent = hashlib.blake2b(parent + data[offset : offset + width], digest_size=16).digest()
        hashes.append(parent)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("a KV pool needs at least one block besides the scratch block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(
            range(1, num_blocks)
        )  # never cached, or evicted: taken first
        self._evictable: OrderedDict[int, None] = (
            OrderedDict()
        )  # cached and unreferenced, oldest first
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        # Told of each cached block evicted for reuse (the document store drops what it held).
        self.on_evict: Callable[[int], None] | None = None
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of those, tokens found cached

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (never cached, or cached but unreferenced)."""
        return len(self._free) + len(self._evictable)

    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """The blocks of the longest run of ``hashes`` (from the first) held in the cache."""
        found: list[int] = []
        if self.prefix_caching:
            for block_hash in hashes:
                block = self._by_hash.get(block_hash)
                if block is None:
                    break
                found.append(block)
        return found

    def take(self, blocks: list[int]) -> None:
        """Reference blocks already holding what a sequence needs (a cache hit, a shared prompt)."""
        for block in blocks:
            if self._refs[block] == 0:
                self._evictable.pop(block, None)
            self._refs[block] += 1

    def allocate(self, count: int) -> list[int]:
        """``count`` fresh blocks, evicting cached ones as needed; the caller checked ``num_free``."""
        if count > self.num_free:
            raise RuntimeError(f"{count} KV blocks asked for, {self.num_free} free")
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(block)]
                if self.on_evict is not None:
                    self.on_evict(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drop one reference each. A sequence's blocks are released last first, so its prefix (what
        the next request is likeliest to share) is evicted last."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def register(self, block: int, block_hash: bytes) -> None:
        """A full block's content is final: later prompts with the same tokens may share it."""
        if not self.prefix_caching or block in self._hash_of or block_hash in self._by_hash:
            return  # already registered, or the same tokens computed twice: the first copy serves
        self._by_hash[block_hash] = block
        self._hash_of[block] = block_hash

    def keep(self, block: int, block_hash: bytes) -> bool:
        """Register a block under a key of its own (a stored document's, ``document_store``), whether
        or not prefix caching is on: unreferenced, it is cached and evicted like any other. False
        (nothing done) when the block or the key is registered already."""
        if block in self._hash_of or block_hash in self._by_hash:
            return False
        self._by_hash[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def block_of(self, block_hash: bytes) -> int | None:
        return self._by_hash.get(block_hash)

    def num_unreferenced(self, blocks: list[int]) -> int:
        """How many of ``blocks`` count as free now (cached, but no sequence holds them)."""
        return sum(1 for block in blocks if self._refs[block] == 0)
