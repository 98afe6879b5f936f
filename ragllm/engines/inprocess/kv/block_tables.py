"""Each sequence's block table: which KV blocks hold its positions, kept by the scheduler's thread.

A sequence is admitted with blocks for everything it must compute (its prompt; after a preemption
its prompt and answer so far), the cached blocks of its longest cached prefix first (short of a
first document whose KV it will reuse: ``_clear_of_first_document``); decoding adds
one block whenever a position starts a new one. Full blocks are registered for prefix sharing as
soon as their keys and values are written. Choices 1..n-1 of a request share their prompt's full
blocks and start with a copy of its last, partial one.

A chain of block hashes starts from the model's salt and the sequence's ``scope_salt`` (its tenant
and cache_salt): two requests share a block only when they share the scope as well as the tokens.
"""

from __future__ import annotations

from collections.abc import Callable

from ragllm.engines.inprocess.kv.blocks import BlockPool, extend_block_hashes
from ragllm.engines.inprocess.kv.document_store import (
    DocumentBlend,
    DocumentPlacement,
    DocumentSpan,
    DocumentStore,
    StoredDocument,
    document_spans,
)
from ragllm.engines.inprocess.sequence import Sequence

# Blocks kept free at admission (1% of the pool, at least one) so that sequences just admitted do
# not have to be preempted at their first decode steps; vLLM keeps a watermark for the same reason.
WATERMARK_SHARE = 0.01


class BlockTables:
    def __init__(self, pool: BlockPool, salt: bytes) -> None:
        self.pool = pool
        self.documents = DocumentStore(pool)
        self.block_size = pool.block_size
        self._salt = salt
        self._watermark = max(1, int(pool.num_usable * WATERMARK_SHARE))
        self.num_preemptions = 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def prompt_hashes(self, prompt_ids: list[int], scope_salt: bytes = b"") -> list[bytes]:
        """The hashes of a prompt's full blocks, ahead of admission (a sequence's ``block_hashes``):
        pure, so any thread may compute them (the engine does, beside tokenising, off the engine
        thread); none when caching is off."""
        hashes: list[bytes] = []
        if self.pool.prefix_caching:
            extend_block_hashes(hashes, prompt_ids, self.block_size, self._salt + scope_salt)
        return hashes

    def document_spans(
        self, prompt_ids: list[int], spans: list[tuple[int, int]], scope_salt: bytes = b""
    ) -> list[DocumentSpan]:
        """Keys of a prompt's documents for reuse at any position (pure, like ``prompt_hashes``)."""
        return document_spans(prompt_ids, spans, self._salt + scope_salt)

    def admit(self, group: list[Sequence], alone: bool) -> bool:
        """Give a waiting sequence (and its followers, not yet started) the blocks it needs; False,
        touching nothing, when they are not free. ``alone``: nothing runs, so no watermark is kept."""
        leader = group[0]
        tokens = leader.prefill_ids()
        cached: list[int] = []
        if self.pool.prefix_caching:
            extend_block_hashes(leader.block_hashes, tokens, self.block_size, self._root(leader))
            # At least the last token is computed: its logits choose the next one.
            cached = self._clear_of_first_document(
                leader,
                self.pool.cached_prefix(
                    leader.block_hashes[: (len(tokens) - 1) // self.block_size]
                ),
            )
        fresh = self.blocks_for(len(tokens)) - len(cached)
        copies = len(group) - 1 if len(leader.prompt_ids) % self.block_size else 0
        margin = 0 if alone else self._watermark
        room = self.pool.num_free - self.pool.num_unreferenced(cached) - (fresh + copies + margin)
        if room < 0:
            return False
        self.pool.take(cached)
        found, missing = self._documents_to_reuse(leader, len(cached) * self.block_size, room)
        leader.block_table = cached + self.pool.allocate(fresh)
        leader.blend = self._reserve_documents(found, missing)
        leader.exact_until = leader.blend.first if leader.blend is not None else None
        leader.num_registered = len(cached)
        leader.num_computed = len(cached) * self.block_size
        if leader.num_cached_tokens is None:  # what the client is told: the first admission's hit
            leader.num_cached_tokens = min(leader.num_computed, leader.num_prompt_tokens)
            # Only the first admission's reuse is told, as its prefix hit is (a readmission after a
            # preemption recomputes what was already counted).
            leader.documents_counted = leader.blend is None
        self.pool.queries += len(tokens)
        self.pool.hits += leader.num_computed
        for follower in group[1:]:
            follower.block_table = self.pool.allocate(1) if copies else []
        return True

    def _clear_of_first_document(self, leader: Sequence, cached: list[int]) -> list[int]:
        """A cached prefix that ends inside the first document, holding only its head, stops before
        the block where that document starts. Documents may share a head (a header such as
        ``[doc-``), which completes the context's last blocks the same way whichever document comes
        first, so those blocks are cached for any of them; taken, they would leave the document
        inside the prefix, computed in place and never stored. A prefix holding most of the document
        (the same document came first before) is kept: it is exact, and computing the rest costs
        less than placing and blending it."""
        if not leader.documents:
            return cached
        first, cached_end = leader.documents[0], len(cached) * self.block_size
        if not first.start < cached_end < first.end or cached_end - first.start > first.length // 2:
            return cached
        return cached[: first.start // self.block_size]

    def _documents_to_reuse(
        self, leader: Sequence, start: int, room: int
    ) -> tuple[list[tuple[DocumentSpan, StoredDocument]], list[DocumentSpan]]:
        """The leader's documents past its cached prefix: those stored (their blocks taken now, so
        that nothing evicts them before the blend) and those to compute and store, as many as ``room``
        blocks allow (the rest are computed with the prompt, as without reuse)."""
        found: list[tuple[DocumentSpan, StoredDocument]] = []
        missing: list[DocumentSpan] = []
        for span in leader.documents:
            if span.start < start:
                continue  # in the cached prefix: exact already
            stored = self.documents.find(span.key)
            if stored is None:
                cost = self.documents.blocks_to_fill(span)
                if cost <= room:
                    room -= cost
                    missing.append(span)
                continue
            cost = self.pool.num_unreferenced(list(stored.blocks))
            if cost <= room:
                room -= cost
                self.pool.take(list(stored.blocks))
                found.append((span, stored))
        return found, missing

    def _reserve_documents(
        self, found: list[tuple[DocumentSpan, StoredDocument]], missing: list[DocumentSpan]
    ) -> DocumentBlend | None:
        placements = [DocumentPlacement(span, stored, fill=False) for span, stored in found]
        held = [block for _, stored in found for block in stored.blocks]
        for span in missing:
            blocks = self.pool.allocate(self.documents.blocks_to_fill(span))
            held += blocks
            placements.append(DocumentPlacement(span, self.documents.reserve(span, blocks), True))
        if not placements:
            return None
        placements.sort(key=lambda placement: placement.span.start)
        return DocumentBlend(placements, held)

    def drop_blend(self, sequence: Sequence) -> None:
        """Prefill the sequence without reuse after all: what its blend held goes back."""
        if sequence.blend is not None:
            self.pool.release(sequence.blend.held)
            sequence.blend = None
            sequence.exact_until = None

    def blended(self, sequence: Sequence) -> None:
        """The sequence's blend has run: documents it computed are stored, the blocks it held go
        back (stored ones stay cached), and its first blend's reused tokens count as cached."""
        blend = sequence.blend
        if blend is None:
            return
        for placement in blend.placements:
            if placement.fill:
                self.documents.keep(placement.span, placement.stored)
        self.documents.count(blend)
        self.pool.release(blend.held)
        sequence.blend = None
        if not sequence.documents_counted:
            sequence.documents_counted = True
            reused = sum(p.span.length - p.recomputed for p in blend.placements if not p.fill)
            cached = (sequence.num_cached_tokens or 0) + reused
            sequence.num_cached_tokens = min(cached, sequence.num_prompt_tokens)

    def grow(self, sequence: Sequence, position: int) -> bool:
        """Make sure a block holds ``position``; False when none is free."""
        if position // self.block_size < len(sequence.block_table):
            return True
        if not self.pool.num_free:
            return False
        sequence.block_table.append(self.pool.allocate(1)[0])
        return True

    def register_full(self, sequence: Sequence, num_positions: int) -> None:
        """The first ``num_positions`` positions hold their final keys and values: register the full
        blocks among them for sharing."""
        if sequence.exact_until is not None:
            num_positions = min(num_positions, sequence.exact_until)
        full = num_positions // self.block_size
        if full <= sequence.num_registered or not self.pool.prefix_caching:
            return
        if len(sequence.block_hashes) < full:
            extend_block_hashes(
                sequence.block_hashes, sequence.history(), self.block_size, self._root(sequence)
            )
        for block in range(sequence.num_registered, full):
            self.pool.register(sequence.block_table[block], sequence.block_hashes[block])
        sequence.num_registered = full

    def _root(self, sequence: Sequence) -> bytes:
        """Where the sequence's hash chain starts: the model's salt (fixed for the process, so the
        concatenation is unambiguous) and the sequence's scope."""
        return self._salt + sequence.scope_salt

    def fork(
        self, leader: Sequence, follower: Sequence, copy_block: Callable[[int, int], None]
    ) -> None:
        """A follower takes its leader's prompt: the full blocks shared, the partial one copied into
        the block reserved for it at admission."""
        full = leader.num_prompt_tokens // self.block_size
        shared = leader.block_table[:full]
        self.pool.take(shared)
        if leader.num_prompt_tokens % self.block_size:
            copy_block(leader.block_table[full], follower.block_table[0])
        follower.block_table = shared + follower.block_table
        follower.block_hashes = list(leader.block_hashes[:full])
        follower.num_registered = full
        follower.num_cached_tokens = leader.num_cached_tokens
        # Its copied block and its answer's are computed over the leader's blended prompt.
        follower.exact_until = leader.exact_until

    def free(self, sequence: Sequence) -> None:
        self.drop_blend(sequence)  # admitted, its blend not run: what it held goes back
        self.pool.release(sequence.block_table)
        sequence.block_table = []
        sequence.num_registered = 0

    def preempt(self, sequence: Sequence) -> None:
        """Free a running sequence's blocks; it is computed again (from any cached prefix) when readmitted."""
        self.free(sequence)
        sequence.num_computed = 0
        self.num_preemptions += 1
