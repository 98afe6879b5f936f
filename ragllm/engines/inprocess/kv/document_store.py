"""Documents' KV kept in the block pool, reusable at any position of a later prompt.

Prefix caching reuses a block only when everything before it is the same. A RAG prompt's documents
come back in other orders and combinations, so each document's KV is also kept on its own: computed
once right after its prompt's context (the template's text before the first document), in blocks
of its own, and registered in the pool under a key of its tokens, that context, the model and the
request's cache scope: another tenant, another template or a one-character edit is another key.

A later prompt holding the same document copies its stored KV into its own blocks at the document's
new position (keys re-rotated by the position difference) and recomputes a share of it to blend it
with its new neighbours (``runner/document_blend``). Stored blocks are ordinary cached blocks: no
sequence holds them between uses, so the pool evicts them least recently used first when memory is
needed, and an entry with any block evicted is gone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ragllm.engines.inprocess.kv.blocks import BlockPool

# Keys of stored documents live in the pool's hash space beside prefix-chain hashes; the tag keeps
# the two from ever colliding.
_DOCUMENT_TAG = b"document-kv\0"
# A context up to this many tokens may be computed again with each document computed for the store
# (a runner that batches whole prompts does: one batch instead of one continued prefill each).
FILL_CONTEXT_RECOMPUTED = 256


@dataclass(frozen=True, slots=True)
class DocumentSpan:
    """A document in a prompt: its tokens ``[start, end)``, the key its KV is kept under, and
    ``context``, how many tokens precede the prompt's first document (what its KV is computed after)."""

    start: int
    end: int
    key: bytes
    context: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class StoredDocument:
    """A document's KV in pool blocks: its token ``i`` at row ``offset + i`` of ``blocks`` (read as one
    run), its keys rotated for positions ``base + i``."""

    blocks: tuple[int, ...]
    hashes: tuple[bytes, ...]
    offset: int
    base: int
    length: int


@dataclass(slots=True)
class DocumentPlacement:
    """One document of a prompt about to be blended: its stored KV, or (``fill``) blocks reserved to
    compute and store it first."""

    span: DocumentSpan
    stored: StoredDocument
    fill: bool
    recomputed: int = 0  # of its tokens, those the blend computed again (set when it has run)


@dataclass(slots=True)
class DocumentBlend:
    """What a prompt's prefill reuses: its documents in prompt order, and the pool blocks it holds
    until the blend has run (stored documents taken, fill blocks allocated)."""

    placements: list[DocumentPlacement]
    held: list[int] = field(default_factory=list)

    @property
    def first(self) -> int:
        return self.placements[0].span.start

    @property
    def context(self) -> int:
        return self.placements[0].span.context


def document_spans(ids: list[int], spans: list[tuple[int, int]], root: bytes) -> list[DocumentSpan]:
    """Keys of a prompt's documents; ``root`` names the model and the request's cache scope. Pure:
    computed off the engine thread, beside tokenizing."""
    if not spans:
        return []
    context = spans[0][0]
    context_digest = hashlib.blake2b(_token_bytes(ids[:context]), digest_size=16).digest()
    result = []
    for start, end in spans:
        key = hashlib.blake2b(
            _DOCUMENT_TAG + root + context_digest + _token_bytes(ids[start:end]), digest_size=16
        ).digest()
        result.append(DocumentSpan(start, end, key, context))
    return result


def _token_bytes(ids: list[int]) -> bytes:
    return np.asarray(ids, dtype=np.int64).tobytes()


def _block_hashes(key: bytes, count: int) -> tuple[bytes, ...]:
    return tuple(
        hashlib.blake2b(_DOCUMENT_TAG + key + index.to_bytes(4, "little"), digest_size=16).digest()
        for index in range(count)
    )


class DocumentStore:
    """Which documents' KV the pool holds, and what reusing them has done so far."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._entries: dict[bytes, StoredDocument] = {}
        self._key_of_block: dict[int, bytes] = {}  # blocks of stored documents, for eviction
        self._num_blocks = 0
        pool.on_evict = self._evicted
        self.hits = 0  # documents reused from the store
        self.misses = 0  # documents computed and stored
        self.tokens_reused = 0  # reused documents' tokens whose stored KV was kept as it was
        self.tokens_recomputed = 0  # reused documents' tokens the blend computed again
        self._fills = 0

    def find(self, key: bytes) -> StoredDocument | None:
        """The stored KV of ``key``: every block of an entry is in the pool (an eviction drops the
        entry at once, ``_evicted``)."""
        return self._entries.get(key)

    def reserve(self, span: DocumentSpan, blocks: list[int]) -> StoredDocument:
        """Where a document missing from the store is computed: ``blocks`` freshly allocated, its
        first token at the context's offset within the first (the context's partial last block is
        copied there, so the document attends to the whole context)."""
        offset = span.context % self.pool.block_size
        # Numbered per fill: a stale entry's surviving blocks keep their hashes until evicted, and a
        # new copy of the same document must not collide with them.
        self._fills += 1
        hashes = _block_hashes(span.key + self._fills.to_bytes(8, "little"), len(blocks))
        return StoredDocument(tuple(blocks), hashes, offset, span.context, span.length)

    def blocks_to_fill(self, span: DocumentSpan) -> int:
        return -(-(span.context % self.pool.block_size + span.length) // self.pool.block_size)

    def keep(self, span: DocumentSpan, stored: StoredDocument) -> None:
        """A document computed by a blend: register its blocks so later prompts find it. The first
        copy stays when two prompts computed the same document at once."""
        if span.key in self._entries:
            return
        kept = [b for b, h in zip(stored.blocks, stored.hashes) if self.pool.keep(b, h)]
        if len(kept) < len(stored.blocks):
            return  # not all registered (cannot happen for fresh blocks): not stored
        self._entries[span.key] = stored
        self._num_blocks += len(stored.blocks)
        for block in stored.blocks:
            self._key_of_block[block] = span.key

    def _evicted(self, block: int) -> None:
        """The pool reused a cached block: the stored document it belonged to is gone whole."""
        key = self._key_of_block.pop(block, None)
        stored = self._entries.get(key) if key is not None else None
        if stored is None or block not in stored.blocks:
            return
        del self._entries[key]
        self._num_blocks -= len(stored.blocks)
        for other in stored.blocks:
            if self._key_of_block.get(other) == key:
                del self._key_of_block[other]

    def count(self, blend: DocumentBlend) -> None:
        for placement in blend.placements:
            if placement.fill:
                self.misses += 1
                continue
            self.hits += 1
            self.tokens_reused += placement.span.length - placement.recomputed
            self.tokens_recomputed += placement.recomputed

    @property
    def num_blocks(self) -> int:
        """Pool blocks holding stored documents now (a counter: read from any thread)."""
        return self._num_blocks
