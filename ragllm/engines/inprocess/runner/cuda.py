"""The in-process engine's CUDA path: a paged KV cache sized from the GPU memory share, decode steps
and single-prompt prefills replayed as CUDA graphs, and batched prefill.

It also runs on the CPU without graphs, so the test suite covers everything but the capture.
Same interface as ``ModelRunner`` (the scheduler does not know which one it drives), same numerics:
the model's own weights, norms and rotary tables. Differences, each for speed:

- The KV cache is one tensor allocated at start from what ``gpu_memory_utilization`` leaves after
  the weights and activations, so its addresses never change (graphs need that).
- q/k/v and gate/up projections run as one matmul each (``weights``). RMSNorm (with the residual
  add), rotary embedding (with the KV-cache write) and SiLU-and-multiply are fused kernels
  (``kernels``); attention reads the cache through block tables (``attention``). A one-row step over
  packed int4 layers folds RMSNorm and the residual adds into the int4 products (``w4a16.folds_norms``).
- Decode is captured once per batch bucket and replayed (``decode_graphs``): one launch per step.
- A prompt prefilled alone is replayed from a graph of its length bucket (``prefill_graphs``).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ragllm.engines.inprocess.layers.attention import decode_attention, extend_attention, split_from
from ragllm.engines.inprocess.layers.kernels import add_rms_norm, rope_and_cache, triton
from ragllm.engines.inprocess.layers.w4a16 import folds_norms
from ragllm.engines.inprocess.runner.cpu import (
    KVCacheOptions,
    ModelRunner,
    PrefillChunk,
    Selector,
)
from ragllm.engines.inprocess.runner.decode_graphs import DecodeGraphs
from ragllm.engines.inprocess.runner.memory import kv_cache_budget
from ragllm.engines.inprocess.runner.prefill_graphs import PrefillGraphs, graph_buckets
from ragllm.engines.inprocess.runner.weights import NormWeights, fuse_layers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CudaRunnerOptions:
    max_batch_size: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float = 0.9
    cuda_graphs: bool = True


class CudaGraphRunner(ModelRunner):
    batches_whole_prompts = True

    def __init__(
        self,
        model: Any,
        max_model_len: int,
        options: CudaRunnerOptions,
        kv: KVCacheOptions = KVCacheOptions(),
    ) -> None:
        self.options = options
        super().__init__(model, max_model_len, kv)
        self._fused, self._final_norm = fuse_layers(model)
        self._folds_norms = all(layer.folds_norms for layer in self._fused)
        self._decode_graphs: DecodeGraphs | None = None
        self._prefill_graphs: PrefillGraphs | None = None
        if self._uses_graphs:
            # One stream for every capture: measured on an H100, a second side stream in the process
            # made each decode graph replay 6% slower on the device (1.82 → 1.93 ms per step).
            capture_stream = torch.cuda.Stream(self.device)
            pool = torch.cuda.graph_pool_handle()  # decode and prefill graphs never replay at once
            # CUDA memory freed during a capture invalidates it: collect unreachable objects (an
            # earlier runner, in tests) now rather than let the collector run in the middle of one.
            gc.collect()
            width = self.max_blocks_per_sequence
            self._decode_graphs = DecodeGraphs(
                options.max_batch_size, width, self.block_size, self.device
            )
            self._decode_graphs.capture(self._decode_forward, capture_stream, pool)
            self._prefill_graphs = PrefillGraphs(
                self._prefill_graph_limit, width, self.block_size, self.device
            )
            self._prefill_graphs.capture(self._prefill_forward, capture_stream, pool)

    @property
    def _uses_graphs(self) -> bool:
        return self.options.cuda_graphs and self.device.type == "cuda" and triton is not None

    @property
    def _prefill_graph_limit(self) -> int:
        return min(self.options.max_num_batched_tokens, self.max_model_len)

    # -- memory ---------------------------------------------------------------------------------
    def _default_kv_bytes(self) -> int:
        if self.device.type != "cuda":  # on the CPU (tests) the runner runs without a memory share
            return super()._default_kv_bytes()
        prefill_tokens = self.options.max_num_batched_tokens
        if self._uses_graphs:
            prefill_tokens += max(graph_buckets(self._prefill_graph_limit, whole=True), default=0)
        return kv_cache_budget(
            self.device,
            self.model.config,
            self.dtype,
            self.options.gpu_memory_utilization,
            prefill_tokens,
        )

    # -- the layer stack over flat tokens ---------------------------------------------------------------
    def _forward_tokens(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        attend: Any,
        select: Selector | None = None,
    ) -> torch.Tensor:
        """Tokens [T] at ``positions``, their k/v written to the cache's flat ``rows``, through every
        layer; ``attend(layer_index, qkv, positions)`` returns attention output [T, heads * head_dim].
        ``select`` may narrow the tokens from a layer on (``prefill_selecting``). Returns the
        final-normed hidden states [T, hidden] (of the tokens kept)."""
        hidden, residual = self.model.model.embed_tokens(ids), None
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        # Folded (one row over packed int4 layers, ``w4a16.folds_norms``): o and down add their products to
        # the residual themselves (``hidden`` stays None), and q/k/v and gate/up normalise it themselves.
        fold = self._folds_norms and folds_norms(hidden)
        for layer_index, layer in enumerate(self.layers):
            fused = self._fused[layer_index]
            qkv, residual = _normed_product(fused.qkv, fused.input_norm, hidden, residual)
            if hasattr(layer.self_attn, "q_norm"):  # Qwen3 normalises each head before rope
                self._qk_norm(layer.self_attn, qkv)
            keep = None
            if select is not None:
                keep = select(layer_index, self._values_of(qkv), rows)
            rope_and_cache(
                qkv,
                positions,
                rows,
                self.cos,
                self.sin,
                self.cache.keys[layer_index],
                self.cache.values[layer_index],
                heads,
                kv_heads,
                head_dim,
                *self._kv_scales,
            )
            if keep is not None:  # the layer's KV is written for every token; from here, the kept
                qkv, residual = qkv[keep], residual[keep]
                positions, rows, select = positions[keep], rows[keep], None
            hidden, residual = _added_product(
                fused.o_proj, attend(layer_index, qkv, positions), residual, fold
            )
            gate_up, residual = _normed_product(fused.gate_up, fused.post_norm, hidden, residual)
            hidden, residual = _added_product(fused.down, gate_up, residual, fold)
        if hidden is None:
            hidden, residual = residual, None
        normed, _ = add_rms_norm(hidden, residual, *self._final_norm)
        return normed

    def _values_of(self, qkv: torch.Tensor) -> torch.Tensor:
        """The value part of flat q/k/v [T, ...] as [T, kv_heads, head_dim] (rotation leaves it)."""
        start = (self.num_heads + self.num_kv_heads) * self.head_dim
        return qkv[:, start:].unflatten(1, (self.num_kv_heads, self.head_dim))

    @property
    def _kv_scales(self) -> tuple[float, float]:
        return self.cache.key_scale, self.cache.value_scale

    def _qk_norm(self, attention: Any, qkv: torch.Tensor) -> None:
        tokens, q_width = qkv.shape[0], self.num_heads * self.head_dim
        k_width = self.num_kv_heads * self.head_dim
        query = qkv[:, :q_width].view(tokens, self.num_heads, self.head_dim)
        key = qkv[:, q_width : q_width + k_width].view(tokens, self.num_kv_heads, self.head_dim)
        query.copy_(attention.q_norm(query))
        key.copy_(attention.k_norm(key))

    def _split(
        self, qkv: torch.Tensor, batch: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of q, k, v as [batch, heads, length, head_dim] from flat tokens (batch-major)."""
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        per_head = qkv.view(batch, length, heads + 2 * kv_heads, head_dim)
        query, key, value = per_head.split([heads, kv_heads, kv_heads], dim=2)
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    def _causal_attention(self, qkv: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """Attention within each of ``batch`` whole prompts of ``length`` tokens (flat, batch-major)."""
        query, key, value = self._split(qkv, batch, length)
        with self.attention_backends():
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(batch * length, self.num_heads * self.head_dim)

    def _logits_of(self, normed: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(normed).float()

    # -- prefill ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, block_table: list[int], token_ids: list[int], start: int) -> torch.Tensor:
        length = len(token_ids)
        if start + length > self.max_model_len:
            raise ValueError(
                f"{start + length} positions exceed the context window of {self.max_model_len}"
            )
        if self._prefill_graphs is not None:
            logits = self._prefill_graphs.run(block_table, token_ids, start)
            if logits is not None:
                return logits
        ids = torch.tensor(token_ids, device=self.device)
        positions = torch.arange(start, start + length, device=self.device)
        rows = self.cache.rows_of(block_table, start, start + length)
        last = torch.full((1,), length - 1, device=self.device)
        table = torch.tensor(block_table, dtype=torch.long, device=self.device)
        return self._prefill_forward(ids, positions, rows, last, table, start == 0)[0]

    def _prefill_forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        last: torch.Tensor,
        table: torch.Tensor,
        whole: bool,
    ) -> torch.Tensor:
        """One sequence's prompt chunk; logits [1, vocab] of the token at index ``last``. ``whole``: the
        chunk starts the prompt, so attention stays within it; otherwise it reads the sequence's blocks."""

        def attend(layer_index: int, qkv: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            if whole:
                return self._causal_attention(qkv, 1, ids.shape[0])
            return self._paged_attention(layer_index, qkv, positions, table)

        normed = self._forward_tokens(ids, positions, rows, attend)
        return self._logits_of(normed.index_select(0, last))

    def _paged_attention(
        self, layer_index: int, qkv: torch.Tensor, positions: torch.Tensor, table: torch.Tensor
    ) -> torch.Tensor:
        """Each token's query over its sequence's cached keys up to its position (``table``)."""
        return extend_attention(
            qkv,
            self.cache.keys[layer_index],
            self.cache.values[layer_index],
            positions,
            table,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            *self._kv_scales,
        )

    @torch.inference_mode()
    def prefill_selecting(
        self, block_table: list[int], token_ids: list[int], start: int, select: Selector | None
    ) -> torch.Tensor:
        """``ModelRunner.prefill_selecting`` through the fused layers: the kept tokens attend over
        the block table at their own positions (the paged kernel needs no contiguous chunk)."""
        end = start + len(token_ids)
        ids = torch.tensor(token_ids, device=self.device)
        positions = torch.arange(start, end, device=self.device)
        rows = self.cache.rows_of(block_table, start, end)
        table = torch.tensor(block_table, dtype=torch.long, device=self.device)

        def attend(layer_index: int, qkv: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return self._paged_attention(layer_index, qkv, positions, table)

        normed = self._forward_tokens(ids, positions, rows, attend, select)
        return self._logits_of(normed[-1:])[0]

    # -- decode -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(
        self,
        block_tables: list[list[int]],
        token_ids: list[int] | torch.Tensor,
        positions: list[int],
    ) -> torch.Tensor:
        graphs = self._decode_graphs
        if graphs is not None and len(positions) <= graphs.largest:
            return graphs.run(block_tables, token_ids, positions)
        ids = (
            token_ids.to(self.device)
            if isinstance(token_ids, torch.Tensor)
            else torch.tensor(token_ids, device=self.device)
        )
        rows = [
            self.cache.row_of(table, position) for table, position in zip(block_tables, positions)
        ]
        inputs = torch.cat([ids[None], torch.tensor([positions, rows], device=self.device)])
        tables = self.cache.tables_tensor(block_tables, self.blocks_for(max(positions) + 1))
        split = (
            triton is not None
            and self.device.type == "cuda"
            and max(positions) >= split_from(len(positions))
        )
        return self._decode_forward(inputs, tables, split)

    def _decode_forward(
        self, inputs: torch.Tensor, tables: torch.Tensor, split: bool = False
    ) -> torch.Tensor:
        """One decode step: ``inputs`` [3, rows] holds each row's token, position and cache row to
        write; ``tables`` [rows, width] its block table; ``split``: attention in partitions (long
        contexts). Captured as a graph per batch bucket and split."""
        ids, positions, rows = inputs

        def attend(layer_index: int, qkv: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return decode_attention(
                qkv,
                self.cache.keys[layer_index],
                self.cache.values[layer_index],
                tables,
                positions,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                split,
                *self._kv_scales,
            )

        return self._logits_of(self._forward_tokens(ids, positions, rows, attend))

    # -- batched prefill ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill_many(self, chunks: list[PrefillChunk]) -> list[torch.Tensor]:
        """Whole prompts of similar length run as one padded batch; the rest one by one."""
        whole = [index for index, chunk in enumerate(chunks) if chunk.start == 0]
        results: list[torch.Tensor | None] = [None] * len(chunks)
        for group in _similar_length_groups(whole, [len(chunk.token_ids) for chunk in chunks]):
            if len(group) == 1:
                continue
            logits = self._prefill_padded([chunks[i] for i in group])
            for row, index in enumerate(group):
                results[index] = logits[row]
        for index, chunk in enumerate(chunks):
            if results[index] is None:
                results[index] = self.prefill(*chunk)
        return results  # type: ignore[return-value]

    def _prefill_padded(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        # Right padding: with a causal mask every real token sees only real tokens. The padded
        # positions write into the scratch block.
        batch, longest = len(chunks), max(len(c.token_ids) for c in chunks)
        ids = torch.tensor(
            [c.token_ids + [0] * (longest - len(c.token_ids)) for c in chunks], device=self.device
        ).view(-1)
        positions = torch.arange(longest, device=self.device).repeat(batch)
        rows = torch.cat(
            [
                torch.cat(
                    [
                        self.cache.rows_of(c.block_table, 0, len(c.token_ids)),
                        torch.zeros(
                            longest - len(c.token_ids), dtype=torch.long, device=self.device
                        ),
                    ]
                )
                for c in chunks
            ]
        )
        normed = self._forward_tokens(
            ids,
            positions,
            rows,
            lambda layer_index, qkv, positions: self._causal_attention(qkv, batch, longest),
        )
        last = torch.tensor(
            [row * longest + len(c.token_ids) - 1 for row, c in enumerate(chunks)],
            device=self.device,
        )
        return self._logits_of(normed[last])


def _normed_product(
    projection: Any, norm: NormWeights, hidden: torch.Tensor | None, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``projection(RMSNorm(hidden + residual))`` and the new residual; ``hidden`` None: the residual
    already holds every addition and the (packed) projection normalises it itself."""
    if hidden is None:
        return projection.forward_normed(residual, *norm), residual
    normed, residual = add_rms_norm(hidden, residual, *norm)
    return projection(normed), residual


def _added_product(
    projection: Any, x: torch.Tensor, residual: torch.Tensor, fold: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``projection(x)`` and the residual; folded, the (packed) projection adds its product to the
    residual itself and None stands for it."""
    if fold:
        return None, projection.add_to(residual, x)
    return projection(x), residual


def _similar_length_groups(
    indices: list[int], lengths: list[int], max_padding: float = 0.25
) -> list[list[int]]:
    """Indices grouped so that padding to a group's longest adds at most ``max_padding`` of its tokens."""
    groups: list[list[int]] = []
    for index in sorted(indices, key=lambda i: lengths[i]):
        if groups:
            group = groups[-1]
            real = sum(lengths[i] for i in group) + lengths[index]
            if lengths[index] * (len(group) + 1) <= (1 + max_padding) * real:
                group.append(index)
                continue
        groups.append([index])
    return groups
