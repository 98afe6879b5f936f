"""Runs a Llama-family transformers model over a paged KV cache (``paged_cache``).

The model's own modules (projections, norms, MLP, rotary tables) are reused as they are, so the
numerics are transformers'; only the attention core and the cache are ours. A sequence's positions
live in the blocks its block table names; attention gathers them per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ragllm.engines.inprocess.kv.document_store import DocumentBlend
from ragllm.engines.inprocess.kv.paged_cache import FP8, PagedKVCache
from ragllm.engines.inprocess.runner.document_blend import DocumentBlender
from ragllm.engines.inprocess.runner.rope import apply_rope
from ragllm.errors import ModelLoadError

# Architectures whose decoder layer is: norm → attention (rope, GQA) → residual → norm → MLP.
SUPPORTED_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)
GIB = 1 << 30
# The CPU's default KV budget when none is set (raised to hold one whole context window if need be).
DEFAULT_CPU_KV_BYTES = 1 * GIB
# Decode attention spans are rounded up to this many positions so that shapes repeat from step to
# step (masked positions cost little); kernels that plan per shape then plan once per 64 tokens.
_SPAN_QUANTUM = 64
# On CUDA, cuDNN's attention rebuilds its plan for every new shape (measured: ~1.8 ms of CPU per
# call on an H100); the other fused kernels do not.
_CUDA_ATTENTION_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
# Queries attended at once by ``prefill_selecting``: a 32k-token prompt's mask is then 2,048 x 32k
# booleans, not 32k x 32k.
QUERY_CHUNK = 2048
# (layer index, fresh values [tokens, kv_heads, head_dim], cache rows) → tokens kept, or None
Selector = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class KVCacheOptions:
    block_size: int = 16
    num_blocks: int | None = None  # an exact pool size (tests, benchmarks); else sized from memory
    memory_bytes: int | None = None  # the pool's byte budget; None: the runner's default
    prefix_caching: bool = True
    dtype: torch.dtype | None = (
        None  # what the cache stores; None: the model's dtype; or FP8 (e4m3)
    )
    key_scale: float = 1.0  # fp8 only: stored = value / scale
    value_scale: float = 1.0
    # Document KV reuse: the share of a reused document's tokens recomputed (``document_blend``).
    document_recompute_share: float = 0.15


# vLLM's --kv-cache-dtype names this engine stores (fp8 is e4m3, as in vLLM); None or "auto": the model's.
_KV_STORAGE_DTYPES = {"fp8": FP8, "fp8_e4m3": FP8, "auto": None, None: None}


def kv_storage_dtype(name: str | None) -> torch.dtype | None:
    try:
        return _KV_STORAGE_DTYPES[name]
    except KeyError:
        raise ModelLoadError(
            f"kv_cache_dtype {name!r} is not supported by the in-process engine; use fp8 "
            f"(e4m3) or leave it unset for the model's dtype"
        ) from None


class PrefillChunk(NamedTuple):
    """Prompt tokens at positions ``start..`` of the sequence whose blocks ``block_table`` names."""

    block_table: list[int]
    token_ids: list[int]
    start: int


class ModelRunner:
    """Prefill and decode forward passes of one model over a ``PagedKVCache``."""

    # Whether ``prefill_many`` runs whole prompts as one batch (here: one after another).
    batches_whole_prompts = False

    def __init__(
        self, model: Any, max_model_len: int, kv: KVCacheOptions = KVCacheOptions()
    ) -> None:
        architecture = type(model).__name__
        if architecture not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise ModelLoadError(
                f"architecture {architecture} is not supported (supported: {supported})"
            )
        config = model.config
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.group_size = self.num_heads // self.num_kv_heads
        self.max_model_len = max_model_len
        self.layers = model.model.layers
        # What else shapes a block's keys and values besides its tokens (prefix-cache hashes).
        self.cache_dtype = kv.dtype or self.dtype
        self.kv_salt = f"{architecture}:{getattr(config, '_name_or_path', '')}:{self.dtype}:{self.cache_dtype}".encode()
        self.kv_options = kv
        self.block_size = kv.block_size
        self.max_blocks_per_sequence = -(-max_model_len // kv.block_size)
        self.cache = PagedKVCache(
            len(self.layers),
            self._num_blocks(kv),
            kv.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.device,
            self.cache_dtype,
            self.dtype,
            kv.key_scale,
            kv.value_scale,
        )
        self.cos, self.sin = self._rotary_tables(model, max_model_len)
        self.blender = DocumentBlender(self, kv.document_recompute_share)

    @property
    def bytes_per_block(self) -> int:
        return PagedKVCache.bytes_per_block(
            len(self.layers), self.block_size, self.num_kv_heads, self.head_dim, self.cache_dtype
        )

    def _num_blocks(self, kv: KVCacheOptions) -> int:
        """Blocks in the pool: as asked, or what the byte budget holds; always at least one whole
        context window (and the scratch block), so that a sequence alone can always finish."""
        least = self.max_blocks_per_sequence + 1
        if kv.num_blocks is not None:
            if kv.num_blocks < least:
                raise ModelLoadError(
                    f"{kv.num_blocks} KV blocks cannot hold one sequence of the "
                    f"{self.max_model_len}-token context window ({least} needed)"
                )
            return kv.num_blocks
        budget = kv.memory_bytes if kv.memory_bytes is not None else self._default_kv_bytes()
        blocks = budget // self.bytes_per_block
        if blocks < least:
            if kv.memory_bytes is not None:
                raise ModelLoadError(
                    f"a KV cache of {budget / GIB:.2f} GiB holds {blocks * self.block_size} tokens, less than "
                    f"one {self.max_model_len}-token context window; raise RAGLLM_ENGINE__KV_CACHE_MEMORY_BYTES "
                    f"or lower RAGLLM_ENGINE__MAX_MODEL_LEN"
                )
            blocks = least
        return blocks

    def _default_kv_bytes(self) -> int:
        return DEFAULT_CPU_KV_BYTES

    def copy_block(self, source: int, target: int) -> None:
        self.cache.copy_block(source, target)

    def prefill_many(self, chunks: list[PrefillChunk]) -> list[torch.Tensor]:
        """``prefill`` of each chunk; a runner may batch them."""
        return [self.prefill(*chunk) for chunk in chunks]

    def attention_backends(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return sdpa_kernel(_CUDA_ATTENTION_BACKENDS)
        return contextlib.nullcontext()

    def _rotary_tables(self, model: Any, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The model's own rotary module knows its rope type and scaling; ask it once for every position.
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = model.model.rotary_emb(probe, positions)
        return cos[0], sin[0]  # [length, head_dim]

    @torch.inference_mode()
    def prefill(self, block_table: list[int], token_ids: list[int], start: int) -> torch.Tensor:
        """Run ``token_ids`` at positions ``start..``; returns the last position's logits [vocab]."""
        length = len(token_ids)
        end = start + length
        rows = self.cache.rows_of(block_table, start, end)
        table = self.cache.tables_tensor([block_table], self.blocks_for(end))
        ids = torch.tensor([token_ids], device=self.device)
        positions = torch.arange(start, end, device=self.device)
        cos, sin = self.cos[positions][None, None], self.sin[positions][None, None]
        causal = None
        if start:
            causal = torch.arange(end, device=self.device)[None, :] <= positions[:, None]
        hidden = self.model.model.embed_tokens(ids)
        with self.attention_backends():
            for layer_index, layer in enumerate(self.layers):
                hidden = self._layer(
                    layer,
                    layer_index,
                    hidden,
                    cos,
                    sin,
                    lambda q, k, v, li=layer_index: self._prefill_attention(
                        q, k, v, li, rows, table, causal
                    ),
                )
        return self.logits(hidden[:, -1])[0]

    @property
    def reuses_documents(self) -> bool:
        """Whether blending can reuse anything: with no layer past the check layer, every layer is
        computed for every token, so the engine prefills such a model as without reuse."""
        return self.blender.reuses_anything

    def blend(
        self, block_table: list[int], target: list[int], start: int, blend: DocumentBlend
    ) -> torch.Tensor:
        """``prefill`` of ``target[start:]`` reusing stored documents' KV (``document_blend``)."""
        return self.blender.blend(block_table, target, start, blend)

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    @torch.inference_mode()
    def decode(
        self,
        block_tables: list[list[int]],
        token_ids: list[int] | torch.Tensor,
        positions: list[int],
    ) -> torch.Tensor:
        """One token for each sequence, at ``positions``, its blocks named by ``block_tables``; returns
        logits [batch, vocab]. ``token_ids`` may be a tensor on the device (the previous step's choice,
        not yet read back)."""
        max_end = min(-(-(max(positions) + 1) // _SPAN_QUANTUM) * _SPAN_QUANTUM, self.max_model_len)
        ids = _as_ids(token_ids, self.device)[:, None]
        position_tensor = torch.tensor(positions, device=self.device)
        rows = torch.tensor(
            [
                self.cache.row_of(table, position)
                for table, position in zip(block_tables, positions)
            ],
            device=self.device,
        )
        tables = self.cache.tables_tensor(block_tables, self.blocks_for(max_end))
        cos = self.cos[position_tensor][:, None, None]
        sin = self.sin[position_tensor][:, None, None]
        visible = torch.arange(max_end, device=self.device)[None, :] <= position_tensor[:, None]
        mask = visible[:, None, None, :]  # [batch, 1, 1, keys]
        hidden = self.model.model.embed_tokens(ids)
        with self.attention_backends():
            for layer_index, layer in enumerate(self.layers):
                hidden = self._layer(
                    layer,
                    layer_index,
                    hidden,
                    cos,
                    sin,
                    lambda q, k, v, li=layer_index: self._decode_attention(
                        q, k, v, li, rows, tables, max_end, mask
                    ),
                )
        return self.logits(hidden[:, 0])

    def _layer(
        self,
        layer: Any,
        layer_index: int,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Any,
    ) -> torch.Tensor:
        query, key, value = self._attention_inputs(layer, hidden, cos, sin)
        attended = attend(query, key, value)  # [batch, length, heads * head_dim]
        return self._attention_output(layer, hidden, attended)

    def _attention_inputs(
        self, layer: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query, key and value of ``hidden`` [batch, length, hidden], rotated: [batch, heads, length,
        head_dim] each."""
        attention = layer.self_attn
        batch, length, _ = hidden.shape
        normed = layer.input_layernorm(hidden)
        query = attention.q_proj(normed).view(batch, length, self.num_heads, self.head_dim)
        key = attention.k_proj(normed).view(batch, length, self.num_kv_heads, self.head_dim)
        value = attention.v_proj(normed).view(batch, length, self.num_kv_heads, self.head_dim)
        if hasattr(attention, "q_norm"):  # Qwen3 normalises each head before rope
            query, key = attention.q_norm(query), attention.k_norm(key)
        query = apply_rope(query.transpose(1, 2), cos, sin)
        key = apply_rope(key.transpose(1, 2), cos, sin)
        return query, key, value.transpose(1, 2)

    def _attention_output(
        self, layer: Any, hidden: torch.Tensor, attended: torch.Tensor
    ) -> torch.Tensor:
        hidden = hidden + layer.self_attn.o_proj(attended)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    @torch.inference_mode()
    def prefill_selecting(
        self, block_table: list[int], token_ids: list[int], start: int, select: Selector | None
    ) -> torch.Tensor:
        """``prefill`` whose layers may narrow to some tokens: before a layer writes its keys and
        values, ``select(layer_index, values, rows)`` sees the tokens' fresh values [tokens,
        kv_heads, head_dim] and their cache rows; the first answer other than None (indices, the
        last one included) is the tokens that run on from that layer's attention. The others' KV
        in later layers is what the cache already holds. Returns the last token's logits."""
        end = start + len(token_ids)
        positions = torch.arange(start, end, device=self.device)
        rows = self.cache.rows_of(block_table, start, end)
        table = self.cache.tables_tensor([block_table], self.blocks_for(end))
        hidden = self.model.model.embed_tokens(torch.tensor([token_ids], device=self.device))
        cos, sin = self.cos[positions][None, None], self.sin[positions][None, None]
        with self.attention_backends():
            for layer_index, layer in enumerate(self.layers):
                query, key, value = self._attention_inputs(layer, hidden, cos, sin)
                key, value = key[0].transpose(0, 1), value[0].transpose(0, 1)
                keep = select(layer_index, value, rows) if select is not None else None
                self.cache.write(layer_index, rows, key, value)
                if keep is not None:
                    query, hidden = query[:, :, keep], hidden[:, keep]
                    positions, rows, select = positions[keep], rows[keep], None
                    cos, sin = cos[:, :, keep], sin[:, :, keep]
                keys, values = self.cache.read(layer_index, table, end)
                out = _attend_up_to(query, keys, values, positions)
                attended = out.transpose(1, 2).reshape(1, query.shape[2], -1)
                hidden = self._attention_output(layer, hidden, attended)
        return self.logits(hidden[:, -1])[0]

    def _prefill_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layer_index: int,
        rows: torch.Tensor,
        table: torch.Tensor,
        causal: torch.Tensor | None,
    ) -> torch.Tensor:
        length = key.shape[2]
        self.cache.write(layer_index, rows, key[0].transpose(0, 1), value[0].transpose(0, 1))
        if causal is None:  # the whole prompt in one chunk: no need to read the cache back
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
        else:
            keys, values = self.cache.read(layer_index, table, causal.shape[1])
            out = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=causal, enable_gqa=True
            )
        return out.transpose(1, 2).reshape(1, length, self.num_heads * self.head_dim)

    def _decode_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layer_index: int,
        rows: torch.Tensor,
        tables: torch.Tensor,
        max_end: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        batch = query.shape[0]
        self.cache.write(layer_index, rows, key[:, :, 0], value[:, :, 0])
        keys, values = self.cache.read(layer_index, tables, max_end)
        # One query per sequence: fold each KV head's query group into the query-length axis, so
        # grouped-query attention reads the gathered keys as they are (no repeat per query head).
        grouped = query.reshape(batch, self.num_kv_heads, self.group_size, self.head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
        return out.reshape(batch, 1, self.num_heads * self.head_dim)

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(last_hidden)).float()


def _attend_up_to(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Queries at ``positions`` over every key up to theirs, in runs of ``QUERY_CHUNK`` so that a
    long prompt's mask stays small ([run, keys] booleans)."""
    visible_up_to = torch.arange(keys.shape[2], device=positions.device)[None, :]
    outputs = []
    for first in range(0, query.shape[2], QUERY_CHUNK):
        run = slice(first, first + QUERY_CHUNK)
        mask = visible_up_to <= positions[run, None]
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, run], keys, values, attn_mask=mask, enable_gqa=True
            )
        )
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


def _as_ids(token_ids: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Decode inputs come as a list, or as a tensor already on the device (tokens chosen there)."""
    if isinstance(token_ids, torch.Tensor):
        return token_ids.to(device)
    return torch.tensor(token_ids, device=device)
