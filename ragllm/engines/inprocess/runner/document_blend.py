"""A prompt's prefill that reuses its documents' stored KV at their new positions (CacheBlend).

Each document's KV was computed once right after the prompt's context (``kv/document_store``).
Placed elsewhere, its keys are rotated by the position difference (rotary embeddings compose: a key
rotated for position ``p`` and then by ``d`` is the key for ``p + d``), but its KV still ignores the
documents now before it. CacheBlend (EuroSys 2025) recovers that cross-attention cheaply:

1. The first ``CHECK_LAYER + 1`` layers are computed for every token, their KV written fresh.
2. At ``CHECK_LAYER``, each reused token's fresh value is compared with its stored one; per moved
   document, its first tokens and those whose values deviate most (a ``share`` of them) are kept
   for recomputation, with every token that is not a reused document's (the text between
   documents, the question). A document right after the context, where it was computed, is exact.
3. The remaining layers run only those tokens: their KV overwrites the stored KV in place, and they
   attend over everything (stored KV for the rest). The last token's logits start the answer.
   The runner does this (``prefill_selecting``): on CUDA through its fused layers and paged
   attention kernel, on the CPU through the model's modules.

Positions before the prompt's first document (its context) are a plain prefill, as are documents
missing from the store, computed after that context into blocks of their own and stored before they
are placed. Rows are copied one layer at a time: the store's blocks are never written in place.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ragllm.engines.inprocess.kv.document_store import (
    FILL_CONTEXT_RECOMPUTED,
    DocumentBlend,
    DocumentPlacement,
)
from ragllm.engines.inprocess.kv.paged_cache import FP8, FP8_MAX
from ragllm.engines.inprocess.runner.rope import apply_rope

if TYPE_CHECKING:
    from ragllm.engines.inprocess.runner.cpu import ModelRunner

# The layer whose KV deviations choose the tokens recomputed (CacheBlend's and LMCache's default:
# the second; the first layer's KV depends on a token and its position only, so it cannot deviate).
CHECK_LAYER = 1
# Each reused document's first tokens are always recomputed, as EPIC (ICML 2025) recomputes each
# chunk's first tokens: here they are the document's header (its id and title), which the stored KV
# saw right after the template rather than after the document before it. Measured on the packaged
# model (bench/document_kv_reuse.py, 10 prompts at a 0.15 share): the first answer token's KL
# divergence from a full prefill fell from 0.059 to 0.009, identical answers rose from 1 in 10 to 8.
HEAD_TOKENS = 16
# The tokens kept past the check layer are padded to a multiple of this (``_choose``).
KEEP_QUANTUM = 128


class DocumentBlender:
    """Runs blends over one runner's model and cache; ``share`` of each reused document's tokens
    recomputed."""

    def __init__(self, runner: ModelRunner, share: float) -> None:
        self.runner = runner
        self.share = share
        # Padding the kept tokens pays on CUDA only (on the CPU a product's shape costs nothing).
        self.keep_quantum = KEEP_QUANTUM if runner.device.type == "cuda" else 1
        # Rotation by a position difference: the model's tables divided by any attention scaling
        # folded into them (YaRN), so rotating twice does not scale twice.
        rotary = runner.model.model.rotary_emb
        scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
        self._cos, self._sin = runner.cos / scaling, runner.sin / scaling

    @property
    def reuses_anything(self) -> bool:
        return len(self.runner.layers) > CHECK_LAYER + 1

    @torch.inference_mode()
    def blend(
        self, block_table: list[int], target: list[int], start: int, blend: DocumentBlend
    ) -> torch.Tensor:
        """Compute ``target[start:]`` reusing ``blend``'s documents; returns the last position's
        logits and sets each placement's ``recomputed``."""
        runner = self.runner
        context = blend.context  # at or before the first document placed
        if start < context:  # the context first: missing documents are computed after it
            runner.prefill(block_table, target[start:context], start)
            start = context
        self._fill(block_table, target, blend.placements)
        self._place(block_table, blend.placements)
        return self._forward(block_table, target, start, blend.placements)

    def _fill(
        self, block_table: list[int], target: list[int], placements: list[DocumentPlacement]
    ) -> None:
        """Documents missing from the store, each computed after the context into its own blocks.

        A runner that batches whole prompts (CUDA) computes each as a whole prompt, the context
        again before it (its rows before the document's first block go to the scratch block), when
        the context is short: one batched forward instead of one continued prefill per document.
        Otherwise each continues from the prompt's context blocks."""
        from ragllm.engines.inprocess.runner.cpu import PrefillChunk

        runner, block_size = self.runner, self.runner.block_size
        chunks = []
        for placement in placements:
            if not placement.fill:
                continue
            span, stored = placement.span, placement.stored
            document = target[span.start : span.end]
            if runner.batches_whole_prompts and span.context <= FILL_CONTEXT_RECOMPUTED:
                scratch = [0] * (span.context // block_size)
                whole = target[: span.context] + document
                chunks.append(PrefillChunk(scratch + list(stored.blocks), whole, 0))
                continue
            head = block_table[: span.context // block_size]
            if span.context % block_size:  # the context's partial last block, for it to attend to
                runner.copy_block(block_table[span.context // block_size], stored.blocks[0])
            chunks.append(PrefillChunk(head + list(stored.blocks), document, stored.base))
        if chunks:
            runner.prefill_many(chunks)

    def _place(self, block_table: list[int], placements: list[DocumentPlacement]) -> None:
        """Every layer's stored keys and values into the prompt's rows, keys re-rotated: all
        documents in one gather and one scatter per layer (measured on an H100, one document at a
        time took 6.5 ms for 8 documents of ~550 tokens, CPU-bound; all layers at once would hold
        every layer's copy at the peak). The stored blocks are never among the prompt's."""
        cache, block_size, device = self.runner.cache, self.runner.block_size, self.runner.device
        storage = cache.storage  # [layers, 2, blocks, heads, block_size, dim]
        sources, targets, shifts = [], [], []
        for placement in placements:
            stored, span = placement.stored, placement.span
            rows = torch.arange(stored.offset, stored.offset + span.length)
            blocks = torch.tensor(stored.blocks, dtype=torch.long)[rows // block_size]
            sources.append(blocks * block_size + rows % block_size)
            targets.append(cache.rows_of(block_table, span.start, span.end))
            shifts.append(torch.full((span.length,), span.start - stored.base))
        source = torch.cat(sources).to(device)
        target = torch.cat(targets).to(device)
        shift = torch.cat(shifts).to(device)
        source_blocks, source_offsets = source // block_size, source % block_size
        target_blocks, target_offsets = target // block_size, target % block_size
        for layer in storage:  # one layer at a time: what moves is [tokens, 2, heads, head_dim]
            moved = layer[:, source_blocks, :, source_offsets]
            moved[:, 0] = self._rotated(moved[:, 0], shift)
            layer[:, target_blocks, :, target_offsets] = moved

    def _rotated(self, keys: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """Stored keys [tokens, ..., head_dim] (as the cache holds them) each rotated ``shifts``
        [tokens] positions further."""
        cache = self.runner.cache
        values = keys.to(cache.compute_dtype)
        if cache.dtype == FP8:
            values = values * cache.key_scale
        # A document lands at or after where it was computed (the same context precedes both);
        # a negative shift would rotate back: cos is even, sin odd.
        view = (shifts.shape[0],) + (1,) * (keys.dim() - 2) + (-1,)
        cos = self._cos[shifts.abs()].to(values.dtype).view(view)
        sin = (self._sin[shifts.abs()] * shifts.sign()[:, None]).to(values.dtype).view(view)
        values = apply_rope(values, cos, sin)
        if cache.dtype == FP8:
            values = (values.float() / cache.key_scale).clamp(-FP8_MAX, FP8_MAX)
        return values.to(cache.dtype)

    def _forward(
        self,
        block_table: list[int],
        target: list[int],
        start: int,
        placements: list[DocumentPlacement],
    ) -> torch.Tensor:
        runner = self.runner
        reused = torch.zeros(len(target) - start, dtype=torch.bool)
        for placement in placements:
            reused[placement.span.start - start : placement.span.end - start] = True
        reused = reused.to(runner.device)

        def select(
            layer: int, fresh_values: torch.Tensor, rows: torch.Tensor
        ) -> torch.Tensor | None:
            if layer != CHECK_LAYER:
                return None
            return self._choose(layer, fresh_values, rows, reused, placements, start)

        return runner.prefill_selecting(block_table, target[start:], start, select)

    def _choose(
        self,
        layer: int,
        fresh_values: torch.Tensor,
        rows: torch.Tensor,
        reused: torch.Tensor,
        placements: list[DocumentPlacement],
        start: int,
    ) -> torch.Tensor:
        """Indices (into the computed tokens) recomputed from the check layer on: every token not
        reused, each moved document's first ``HEAD_TOKENS``, and per moved document the ``share``
        whose fresh values deviate most from the placed ones (values measured closer to a full
        prefill than keys on the packaged model: KL 0.008 against 0.011 at a 0.15 share).

        A document that did not move (right after the same context it was computed after) holds a
        full prefill's KV, so none of it is recomputed, unless the share is 1 (everything is)."""
        placed = self.runner.cache.values_at(layer, rows)
        deviation = (fresh_values.float() - placed.float()).pow(2).sum(dim=(1, 2))
        chosen = ~reused
        chosen[-1] = True  # the last token's logits start the answer
        for placement in placements:
            if placement.span.start == placement.stored.base and self.share < 1:
                continue  # right after the context, where it was computed: a full prefill's KV
            first, last = placement.span.start - start, placement.span.end - start
            chosen[first : min(last, first + HEAD_TOKENS)] = True
            count = min(last - first, math.ceil(self.share * (last - first)))
            if count:
                chosen[torch.topk(deviation[first:last], count).indices + first] = True
        counts = torch.stack(
            [chosen[p.span.start - start : p.span.end - start].sum() for p in placements]
        )
        for placement, count in zip(placements, counts.tolist()):  # one read-back, not one each
            placement.recomputed = count
        keep = torch.nonzero(chosen).flatten()
        # Padded to a multiple of ``keep_quantum`` with the last token again (its row written twice
        # with the same values): the layers' matrix shapes then repeat from blend to blend, and
        # a new shape cost ~0.2 ms of CPU per product on an H100 (cuBLAS picking its kernel).
        if keep.shape[0] < self.keep_quantum:  # a short prompt's work would multiply
            return keep
        padding = -keep.shape[0] % self.keep_quantum
        return torch.cat([keep, keep[-1:].expand(padding)]) if padding else keep
