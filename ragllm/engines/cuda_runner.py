"""The in-process engine's CUDA path: a preallocated KV cache, decode steps and single-prompt
prefills replayed as CUDA graphs, batched prefill, and reuse of prompt prefixes (the RAG template and
documents) across requests.

It also runs on the CPU without graphs, so the test suite covers everything but the capture.
Same interface as ``ModelRunner`` (the scheduler does not know which one it drives), same numerics:
the model's own weights, norms and rotary tables. Differences, each for speed:

- The KV cache is one tensor ``[layers, 2, slots, kv_heads, max_model_len, head_dim]`` allocated at
  start and sized against the GPU memory share it may use, so its addresses never change (graphs need that)
  and a prefix is copied between slots in one kernel.
- q/k/v and gate/up projections run as one matmul each; the modules' weights become views of the
  fused tensors, so memory is not doubled. RMSNorm (with the residual add), rotary embedding (with
  the KV-cache write) and SiLU-and-multiply are fused kernels (``cuda_kernels``).
- Decode for the first ``b`` slots is captured once per batch bucket and replayed:
  one launch per step instead of ~20 per layer. Rows past the real batch write to a scratch slot.
- A prompt prefilled alone is replayed from a graph of its length bucket (``cuda_prefill``).
"""

from __future__ import annotations

import bisect
import gc
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ragllm.engines.cuda_kernels import (
    add_rms_norm,
    decode_attention,
    extend_attention,
    rope_and_cache,
    silu_and_mul,
    use_triton,
)
from ragllm.engines.cuda_prefill import PrefillGraphs, graph_buckets
from ragllm.engines.model_runner import ModelRunner, SlotKVCache
from ragllm.errors import ModelLoadError

logger = logging.getLogger(__name__)

GIB = 1 << 30
# Attention spans graphs are captured for: decode reads keys up to the bucket above the longest position.
_MIN_SPAN = 256
# Prompts shorter than this are not worth remembering as a reusable prefix.
MIN_PREFIX_TOKENS = 64
# Activations, cuBLAS workspaces and graph pools beyond the weights and the KV cache (measured ~1 GiB
# for a 1.5B model with 2,048-token prefills; the rest scales with the prefill budget below).
_FIXED_RESERVE_BYTES = 1 * GIB


@dataclass(frozen=True)
class CudaRunnerOptions:
    max_batch_size: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float = 0.9
    prefix_cache_slots: int = 4
    cuda_graphs: bool = True


class StaticSlotKVCache(SlotKVCache):
    """Every slot at full length from the start; ``keys[layer]`` / ``values[layer]`` are views."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        self.max_len = self.capacity = max_len
        self.storage = torch.zeros(num_layers, 2, num_slots, num_kv_heads, max_len, head_dim,
                                   device=device, dtype=dtype)
        self.keys = [self.storage[layer, 0] for layer in range(num_layers)]
        self.values = [self.storage[layer, 1] for layer in range(num_layers)]

    @staticmethod
    def bytes_needed(num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, max_len: int,
                     dtype: torch.dtype) -> int:
        return num_layers * 2 * num_slots * num_kv_heads * max_len * head_dim * dtype.itemsize

    def ensure_capacity(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(f"{length} positions exceed the context window of {self.max_len}")

    def move(self, source: int, target: int, length: int) -> None:
        self.copy_prefix(source, target, length)

    @torch.inference_mode()
    def copy_prefix(self, source: int, target: int, length: int) -> None:
        self.storage[:, :, target, :, :length] = self.storage[:, :, source, :, :length]


@dataclass
class _Prefix:
    slot: int
    tokens: np.ndarray  # int64
    last_used: int


class CudaGraphRunner(ModelRunner):
    def __init__(self, model: Any, num_slots: int, max_model_len: int, options: CudaRunnerOptions) -> None:
        self.options = options
        self.num_sequence_slots = num_slots
        self.scratch_slot = num_slots  # where padded decode rows write
        self.prefix_slots = list(range(num_slots + 1, num_slots + 1 + options.prefix_cache_slots))
        self._prefixes: list[_Prefix] = []
        self._clock = 0
        self.prefix_hits = 0
        super().__init__(model, num_slots, max_model_len)
        self._fuse_projections()
        self._batch_buckets = _batch_buckets(options.max_batch_size)
        # The Triton decode attention reads each row's keys up to its own position, so one graph per
        # batch bucket serves every length; PyTorch's attention reads a fixed span, bucketed.
        self._triton_attention = self.device.type == "cuda" and use_triton(self.cos)
        self._spans = [max_model_len] if self._triton_attention else _spans(max_model_len)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._prefill_graphs: PrefillGraphs | None = None
        if self._uses_graphs:
            # One stream for every capture: measured on an H100, a second side stream in the process
            # made each decode graph replay 6% slower on the device (1.82 → 1.93 ms per step).
            capture_stream = torch.cuda.Stream(self.device)
            pool = torch.cuda.graph_pool_handle()  # decode and prefill graphs never replay at once
            # CUDA memory freed during a capture invalidates it: collect unreachable objects (an
            # earlier runner, in tests) now rather than let the collector run in the middle of one.
            gc.collect()
            self._capture_graphs(capture_stream, pool)
            self._prefill_graphs = PrefillGraphs(self._prefill_graph_limit, self.scratch_slot, self.device)
            self._prefill_graphs.capture(self._prefill_forward, capture_stream, pool)

    @property
    def _uses_graphs(self) -> bool:
        return self.options.cuda_graphs and self.device.type == "cuda"

    @property
    def _prefill_graph_limit(self) -> int:
        return min(self.options.max_num_batched_tokens, self.max_model_len)

    # -- memory ---------------------------------------------------------------------------------
    def _make_cache(self, num_layers: int, num_slots: int) -> SlotKVCache:
        total_slots = num_slots + 1 + self.options.prefix_cache_slots
        needed = StaticSlotKVCache.bytes_needed(num_layers, total_slots, self.num_kv_heads, self.head_dim,
                                                self.max_model_len, self.dtype)
        self._check_memory(needed, total_slots)
        return StaticSlotKVCache(num_layers, total_slots, self.num_kv_heads, self.head_dim, self.max_model_len,
                                 self.device, self.dtype)

    def _check_memory(self, kv_bytes: int, total_slots: int) -> None:
        if self.device.type != "cuda":  # on the CPU (tests) the runner runs without graphs or a budget
            return
        free, total = torch.cuda.mem_get_info(self.device)
        allowed = self.options.gpu_memory_utilization * total - (total - free)  # the weights are already in
        hidden = self.model.config.hidden_size
        intermediate = self.model.config.intermediate_size
        # Eager prefill's activations, plus the graph pool that keeps the largest captured prefill's
        # (measured for Qwen2.5-1.5B up to 4,096 tokens: 360 MiB against 258 estimated here; the
        # fixed reserve covers the difference).
        prefill_tokens = self.options.max_num_batched_tokens
        if self._uses_graphs:
            prefill_tokens += max(graph_buckets(self._prefill_graph_limit, whole=True), default=0)
        prefill_bytes = prefill_tokens * (4 * hidden + 3 * intermediate) * self.dtype.itemsize
        reserve = _FIXED_RESERVE_BYTES + prefill_bytes
        if kv_bytes + reserve > allowed:
            raise ModelLoadError(
                f"the KV cache does not fit: {total_slots} slots of {self.max_model_len} tokens need "
                f"{kv_bytes / GIB:.1f} GiB (+{reserve / GIB:.1f} GiB for activations), but only "
                f"{max(allowed, 0) / GIB:.1f} GiB remain under gpu_memory_utilization="
                f"{self.options.gpu_memory_utilization} of {total / GIB:.1f} GiB after the weights; lower "
                f"RAGLLM_ENGINE__MAX_NUM_SEQS (VLLM_MAX_NUM_SEQS) or RAGLLM_ENGINE__MAX_MODEL_LEN, or raise "
                f"RAGLLM_ENGINE__GPU_MEMORY_UTILIZATION")
        logger.info("KV cache: %d slots x %d tokens = %.2f GiB", total_slots, self.max_model_len, kv_bytes / GIB)

    # -- the layer stack over flat tokens ---------------------------------------------------------------
    @torch.inference_mode()
    def _fuse_projections(self) -> None:
        self._fused: list[dict[str, Any]] = []
        for layer in self.layers:
            attention, mlp = layer.self_attn, layer.mlp
            self._fused.append({
                "qkv": _fuse_linears([attention.q_proj, attention.k_proj, attention.v_proj]),
                "gate_up": _fuse_linears([mlp.gate_proj, mlp.up_proj]),
                "input_norm": (layer.input_layernorm.weight, _eps(layer.input_layernorm)),
                "post_norm": (layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm)),
            })
        norm = self.model.model.norm
        self._final_norm = (norm.weight, _eps(norm))

    def _forward_tokens(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                        attend: Any) -> torch.Tensor:
        """Tokens [T] at ``positions`` of sequences in ``slots`` through every layer; their k/v go to
        the cache and ``attend(layer_index, qkv)`` returns attention output [T, heads * head_dim].
        Returns the final-normed hidden states [T, hidden]."""
        hidden, residual = self.model.model.embed_tokens(ids), None
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        for layer_index, layer in enumerate(self.layers):
            fused = self._fused[layer_index]
            normed, residual = add_rms_norm(hidden, residual, *fused["input_norm"])
            qkv = F.linear(normed, *fused["qkv"])
            if hasattr(layer.self_attn, "q_norm"):  # Qwen3 normalises each head before rope
                self._qk_norm(layer.self_attn, qkv)
            rope_and_cache(qkv, positions, slots, self.cos, self.sin, self.cache.keys[layer_index],
                           self.cache.values[layer_index], heads, kv_heads, head_dim)
            hidden = layer.self_attn.o_proj(attend(layer_index, qkv))
            normed, residual = add_rms_norm(hidden, residual, *fused["post_norm"])
            hidden = layer.mlp.down_proj(silu_and_mul(F.linear(normed, *fused["gate_up"])))
        normed, _ = add_rms_norm(hidden, residual, *self._final_norm)
        return normed

    def _qk_norm(self, attention: Any, qkv: torch.Tensor) -> None:
        tokens, q_width = qkv.shape[0], self.num_heads * self.head_dim
        k_width = self.num_kv_heads * self.head_dim
        query = qkv[:, :q_width].view(tokens, self.num_heads, self.head_dim)
        key = qkv[:, q_width:q_width + k_width].view(tokens, self.num_kv_heads, self.head_dim)
        query.copy_(attention.q_norm(query))
        key.copy_(attention.k_norm(key))

    def _split(self, qkv: torch.Tensor, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of q, k, v as [batch, heads, length, head_dim] from flat tokens (batch-major)."""
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        per_head = qkv.view(batch, length, heads + 2 * kv_heads, head_dim)
        query, key, value = per_head.split([heads, kv_heads, kv_heads], dim=2)
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    def _causal_attention(self, qkv: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """Attention within each of ``batch`` whole prompts of ``length`` tokens (flat, batch-major)."""
        query, key, value = self._split(qkv, batch, length)
        with self._attention_backends():
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(batch * length, self.num_heads * self.head_dim)

    def _logits_of(self, normed: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(normed).float()

    # -- prefill ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], start: int) -> torch.Tensor:
        length = len(token_ids)
        self.cache.ensure_capacity(start + length)
        if self._prefill_graphs is not None:
            logits = self._prefill_graphs.run(slot, token_ids, start)
            if logits is not None:
                return logits
        ids = torch.tensor(token_ids, device=self.device)
        positions = torch.arange(start, start + length, device=self.device)
        slots = torch.full((length,), slot, device=self.device)
        last = torch.full((1,), length - 1, device=self.device)
        return self._prefill_forward(ids, positions, slots, last, start == 0)[0]

    def _prefill_forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, last: torch.Tensor,
                         whole: bool) -> torch.Tensor:
        """One sequence's prompt chunk; logits [1, vocab] of the token at index ``last``. ``whole``: the
        chunk starts the prompt, so attention stays within it; otherwise it reads the slot's cache."""
        def attend(layer_index: int, qkv: torch.Tensor) -> torch.Tensor:
            if whole:
                return self._causal_attention(qkv, 1, ids.shape[0])
            return extend_attention(qkv, self.cache.keys[layer_index], self.cache.values[layer_index],
                                    positions, slots, self.num_heads, self.num_kv_heads, self.head_dim)

        normed = self._forward_tokens(ids, positions, slots, attend)
        return self._logits_of(normed.index_select(0, last))

    # -- decode through graphs --------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, first_slot: int, token_ids: list[int] | torch.Tensor, positions: list[int]) -> torch.Tensor:
        batch = len(token_ids)
        longest = max(positions) + 1
        span = self._spans[bisect.bisect_left(self._spans, longest)]
        on_device = isinstance(token_ids, torch.Tensor)
        if first_slot != 0 or batch > self._batch_buckets[-1] or not self._graphs:
            places = torch.tensor([positions, list(range(first_slot, first_slot + batch))], device=self.device)
            ids = token_ids.to(self.device) if on_device else torch.tensor(token_ids, device=self.device)
            return self._decode_rows(torch.cat([ids[None], places]), first_slot, batch, span)
        bucket = self._batch_buckets[bisect.bisect_left(self._batch_buckets, batch)]
        # Staged through pinned memory: a copy from pageable memory would wait for the device to
        # drain the work queued before it, and the host could no longer run a step ahead. Two
        # buffers in turn: the one written now was last read by a copy that has completed.
        staging = self._staging[self._num_decodes % 2]
        self._num_decodes += 1
        host = staging.numpy()
        host[1, :batch] = positions
        host[1, batch:bucket] = 0
        host[2, :batch] = self._row_slots[:batch]  # row i decodes the sequence in slot i
        host[2, batch:bucket] = self.scratch_slot
        if on_device:  # the previous step's choice, never read back to the host first
            self._static_inputs[1:, :bucket].copy_(staging[1:, :bucket], non_blocking=True)
            self._static_inputs[0, :batch].copy_(token_ids)
        else:
            host[0, :batch] = token_ids
            self._static_inputs[:, :bucket].copy_(staging[:, :bucket], non_blocking=True)
        graph, logits = self._graphs[(bucket, span)]
        graph.replay()
        return logits[:batch]

    def _decode_rows(self, rows: torch.Tensor, first_slot: int, batch: int, span: int) -> torch.Tensor:
        """One decode step for ``batch`` sequences in slots ``first_slot..``; ``rows`` holds their
        (token, position, write slot). Captured as a graph for ``first_slot == 0``."""
        ids, positions, slots = rows
        kv_heads, group, head_dim = self.num_kv_heads, self.group_size, self.head_dim
        if self._triton_attention:
            def attend(layer_index: int, qkv: torch.Tensor) -> torch.Tensor:
                return decode_attention(qkv, self.cache.keys[layer_index], self.cache.values[layer_index], positions,
                                        first_slot, self.num_heads, kv_heads, head_dim)

            return self._logits_of(self._forward_tokens(ids, positions, slots, attend))

        mask = (torch.arange(span, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]

        def attend(layer_index: int, qkv: torch.Tensor) -> torch.Tensor:
            # One query per sequence: each KV head's query group becomes the query-length axis, so
            # grouped-query attention reads the cache views as they are.
            grouped = qkv[:, : self.num_heads * head_dim].view(batch, kv_heads, group, head_dim)
            keys = self.cache.keys[layer_index][first_slot : first_slot + batch, :, :span]
            values = self.cache.values[layer_index][first_slot : first_slot + batch, :, :span]
            with self._attention_backends():
                out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
            return out.reshape(batch, self.num_heads * head_dim)

        return self._logits_of(self._forward_tokens(ids, positions, slots, attend))

    def _decode_static(self, bucket: int, span: int) -> torch.Tensor:
        return self._decode_rows(self._static_inputs[:, :bucket], 0, bucket, span)

    @torch.inference_mode()
    def _capture_graphs(self, side: torch.cuda.Stream, pool: tuple) -> None:
        largest = self._batch_buckets[-1]
        self._static_inputs = torch.zeros(3, largest, dtype=torch.long, device=self.device)
        self._static_inputs[2] = self.scratch_slot  # warm-up and capture write only to the scratch slot
        self._staging = [torch.zeros(3, largest, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._row_slots = torch.arange(largest).numpy()
        self._num_decodes = 0
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # capture must not run on the default stream
            for span in reversed(self._spans):
                for bucket in reversed(self._batch_buckets):
                    self._decode_static(bucket, span)  # warm-up: lazy workspaces, kernel selection
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=side):
                        logits = self._decode_static(bucket, span)
                    self._graphs[(bucket, span)] = (graph, logits)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode graphs (batch %s x span %s)", len(self._graphs), self._batch_buckets,
                    self._spans)

    # -- batched prefill ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill_many(self, items: list[tuple[int, list[int], int]]) -> list[torch.Tensor]:
        """Whole prompts of similar length run as one padded batch; the rest one by one."""
        whole = [index for index, (_, _, start) in enumerate(items) if start == 0]
        results: list[torch.Tensor | None] = [None] * len(items)
        for group in _similar_length_groups(whole, [len(items[i][1]) for i in range(len(items))]):
            if len(group) == 1:
                continue
            logits = self._prefill_padded([items[i][0] for i in group], [items[i][1] for i in group])
            for row, index in enumerate(group):
                results[index] = logits[row]
        for index, (slot, token_ids, start) in enumerate(items):
            if results[index] is None:
                results[index] = self.prefill(slot, token_ids, start)
        return results  # type: ignore[return-value]

    def _prefill_padded(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        # Right padding: with a causal mask every real token sees only real tokens. The padded
        # positions write garbage KV past each prompt's end, which decode overwrites before reading.
        batch, longest = len(prompts), max(len(p) for p in prompts)
        ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=self.device).view(-1)
        positions = torch.arange(longest, device=self.device).repeat(batch)
        slot_ids = torch.tensor(slots, device=self.device).repeat_interleave(longest)

        normed = self._forward_tokens(ids, positions, slot_ids,
                                      lambda layer_index, qkv: self._causal_attention(qkv, batch, longest))
        last = torch.tensor([row * longest + len(p) - 1 for row, p in enumerate(prompts)], device=self.device)
        return self._logits_of(normed[last])

    # -- prefix reuse -------------------------------------------------------------------------------
    def reuse_prefix(self, slot: int, prompt_ids: list[int]) -> int:
        """Copy the longest remembered prefix of ``prompt_ids`` into ``slot``; returns its length
        (0: nothing reused). At least the prompt's last token is left to compute, for its logits."""
        if not self._prefixes or len(prompt_ids) <= MIN_PREFIX_TOKENS:
            return 0
        prompt = np.asarray(prompt_ids[:-1], dtype=np.int64)
        best, best_length = None, 0
        for entry in self._prefixes:
            length = _common_prefix_length(entry.tokens, prompt)
            if length > best_length:
                best, best_length = entry, length
        if best is None or best_length < MIN_PREFIX_TOKENS:
            return 0
        self._clock += 1
        best.last_used = self._clock
        self.cache.copy_prefix(best.slot, slot, best_length)
        self.prefix_hits += 1
        return best_length

    def remember_prefix(self, slot: int, prompt_ids: list[int]) -> None:
        """Keep a finished prefill's prompt KV in a prefix slot (least recently used one replaced)."""
        if not self.prefix_slots or len(prompt_ids) < MIN_PREFIX_TOKENS:
            return
        tokens = np.asarray(prompt_ids, dtype=np.int64)
        self._clock += 1
        for entry in self._prefixes:
            if len(entry.tokens) >= len(tokens) and _common_prefix_length(entry.tokens, tokens) == len(tokens):
                entry.last_used = self._clock  # already covered by a longer or equal entry
                return
        if len(self._prefixes) < len(self.prefix_slots):
            entry = _Prefix(self.prefix_slots[len(self._prefixes)], tokens, self._clock)
            self._prefixes.append(entry)
        else:
            entry = min(self._prefixes, key=lambda e: e.last_used)
            entry.tokens, entry.last_used = tokens, self._clock
        self.cache.copy_prefix(slot, entry.slot, len(tokens))


def _fuse_linears(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several projections of the same input; the modules keep views."""
    weight = torch.cat([linear.weight for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    offset = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = weight[offset:offset + rows]
        if bias is not None:
            linear.bias.data = bias[offset:offset + rows]
        offset += rows
    return weight, bias


def _eps(norm: Any) -> float:
    return float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6))


def _batch_buckets(max_batch_size: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b < max_batch_size]
    return buckets + [max_batch_size]


def _spans(max_model_len: int) -> list[int]:
    spans, span = [], _MIN_SPAN
    while span < max_model_len:
        spans.append(span)
        span *= 2
    return spans + [max_model_len]


def _similar_length_groups(indices: list[int], lengths: list[int], max_padding: float = 0.25) -> list[list[int]]:
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


def _common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    length = min(len(a), len(b))
    different = np.flatnonzero(a[:length] != b[:length])
    return int(different[0]) if len(different) else length
