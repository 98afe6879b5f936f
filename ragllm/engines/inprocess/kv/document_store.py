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
        self.hits = 0  # documents reused from the store
        self.misses = 0  # documents computed and stored
        self.tokens_reused = 0  # reused documents' tokens whose stored KV was kept as it was
        self.tokens_recomputed = 0  # reused documents' tokens the blend computed again
        self._fills = 0

    def find(self, key: bytes) -> StoredDocument | None:
        """The stored KV of ``key``, if every one of its blocks is still in the pool."""
        stored = self._entries.get(key)
        if stored is None:
            return None
        if any(self.pool.block_of(h) != b for h, b in zip(stored.hashes, stored.blocks)):
            del self._entries[key]  # a block was evicted and reused: the entry is gone
            return None
        return stored

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
        if self.find(span.key) is not None:
            return
        for block, block_hash in zip(stored.blocks, stored.hashes):
            self.pool.keep(block, block_hash)
        self._entries[span.key] = stored
        if len(self._entries) > self.pool.num_blocks:
            self._sweep()

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
        """Pool blocks holding stored documents now. Read from any thread: it only reads (a
        snapshot of the entries, each checked against the pool)."""
        return sum(len(stored.blocks) for stored in self._live())

    @property
    def num_documents(self) -> int:
        return len(self._live())

    def _live(self) -> list[StoredDocument]:
        return [
            stored
            for stored in list(self._entries.values())
            if all(self.pool.block_of(h) == b for h, b in zip(stored.hashes, stored.blocks))
        ]

    def _sweep(self) -> None:
        for key in list(self._entries):
            self.find(key)
