"""Runs a Llama-family transformers model over a slot-based KV cache.

The model's own modules (projections, norms, MLP, rotary tables) are reused as they are, so the
numerics are transformers'; only the attention core and the cache are ours. Each running sequence
owns a slot; decoding sequences sit in slots ``0..n-1`` so a decode micro-batch reads plain views of
the cache, with no gather per step.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ragllm.errors import ModelLoadError

# Architectures whose decoder layer is: norm → attention (rope, GQA) → residual → norm → MLP.
SUPPORTED_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)
_INITIAL_CAPACITY = 256
# Decode attention spans are rounded up to this many positions so that shapes repeat from step to
# step (masked positions cost little); kernels that plan per shape then plan once per 64 tokens.
_SPAN_QUANTUM = 64
# On CUDA, cuDNN's attention rebuilds its plan for every new shape (measured: ~1.8 ms of CPU per
# call on an H100); the other fused kernels do not.
_CUDA_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class SlotKVCache:
    """Per-layer key/value tensors [slots, kv_heads, capacity, head_dim]; capacity grows by doubling."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        self.max_len = max_len
        self._shape = (num_slots, num_kv_heads, head_dim)
        self._device, self._dtype = device, dtype
        self.capacity = 0
        self.keys: list[torch.Tensor] = [torch.empty(0)] * num_layers
        self.values: list[torch.Tensor] = [torch.empty(0)] * num_layers
        self.ensure_capacity(min(_INITIAL_CAPACITY, max_len))

    def ensure_capacity(self, length: int) -> None:
        if length <= self.capacity:
            return
        new_capacity = min(self.max_len, max(length, 2 * self.capacity))
        slots, heads, head_dim = self._shape
        for layer in range(len(self.keys)):
            self.keys[layer] = self._grown(self.keys[layer], (slots, heads, new_capacity, head_dim))
            self.values[layer] = self._grown(self.values[layer], (slots, heads, new_capacity, head_dim))
        self.capacity = new_capacity

    def _grown(self, old: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        # Zeros, not empty: masked-out positions must hold finite numbers (0 * NaN is NaN).
        new = torch.zeros(shape, device=self._device, dtype=self._dtype)
        if old.numel():
            new[:, :, : old.shape[2]] = old
        return new

    @torch.inference_mode()  # the tensors are inference tensors once grown inside a forward pass
    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` positions of one slot into another (slot compaction)."""
        for layer_keys, layer_values in zip(self.keys, self.values):
            layer_keys[target, :, :length] = layer_keys[source, :, :length]
            layer_values[target, :, :length] = layer_values[source, :, :length]


class ModelRunner:
    """Prefill and decode forward passes of one model over a ``SlotKVCache``."""

    def __init__(self, model: Any, num_slots: int, max_model_len: int) -> None:
        architecture = type(model).__name__
        if architecture not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise ModelLoadError(f"architecture {architecture} is not supported (supported: {supported})")
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
        self.cache = self._make_cache(len(self.layers), num_slots)
        self.cos, self.sin = self._rotary_tables(model, max_model_len)

    def _make_cache(self, num_layers: int, num_slots: int) -> SlotKVCache:
        return SlotKVCache(num_layers, num_slots, self.num_kv_heads, self.head_dim, self.max_model_len,
                           self.device, self.dtype)

    def prefill_many(self, items: list[tuple[int, list[int], int]]) -> list[torch.Tensor]:
        """``prefill(slot, token_ids, start)`` for each item; a runner may batch them."""
        return [self.prefill(slot, token_ids, start) for slot, token_ids, start in items]

    def reuse_prefix(self, slot: int, prompt_ids: list[int]) -> int:
        """Fill ``slot`` with a remembered prefix of the prompt; returns its length (here: none kept)."""
        return 0

    def remember_prefix(self, slot: int, prompt_ids: list[int]) -> None:
        """Offer a prefilled prompt for later reuse (here: not kept)."""

    def _attention_backends(self) -> contextlib.AbstractContextManager:
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
    def prefill(self, slot: int, token_ids: list[int], start: int) -> torch.Tensor:
        """Run ``token_ids`` at positions ``start..``; returns the last position's logits [vocab]."""
        length = len(token_ids)
        end = start + length
        self.cache.ensure_capacity(end)
        ids = torch.tensor([token_ids], device=self.device)
        positions = torch.arange(start, end, device=self.device)
        cos, sin = self.cos[positions][None, None], self.sin[positions][None, None]
        causal = None
        if start:
            causal = torch.arange(end, device=self.device)[None, :] <= positions[:, None]
        hidden = self.model.model.embed_tokens(ids)
        with self._attention_backends():
            for layer_index, layer in enumerate(self.layers):
                hidden = self._layer(layer, layer_index, hidden, cos, sin, lambda q, k, v, li=layer_index:
                                     self._prefill_attention(q, k, v, li, slot, start, causal))
        return self._logits(hidden[:, -1])[0]

    @torch.inference_mode()
    def decode(self, first_slot: int, token_ids: "list[int] | torch.Tensor", positions: list[int]) -> torch.Tensor:
        """One token for each of the sequences in slots ``first_slot..``; returns logits [batch, vocab].
        ``token_ids`` may be a tensor on the device (the previous step's choice, not yet read back)."""
        batch = len(token_ids)
        max_end = min(-(-(max(positions) + 1) // _SPAN_QUANTUM) * _SPAN_QUANTUM, self.max_model_len)
        self.cache.ensure_capacity(max_end)
        ids = _as_ids(token_ids, self.device)[:, None]
        position_tensor = torch.tensor(positions, device=self.device)
        slots = torch.arange(first_slot, first_slot + batch, device=self.device)
        cos = self.cos[position_tensor][:, None, None]
        sin = self.sin[position_tensor][:, None, None]
        visible = torch.arange(max_end, device=self.device)[None, :] <= position_tensor[:, None]
        mask = visible[:, None, None, :]  # [batch, 1, 1, keys]
        hidden = self.model.model.embed_tokens(ids)
        with self._attention_backends():
            for layer_index, layer in enumerate(self.layers):
                hidden = self._layer(layer, layer_index, hidden, cos, sin, lambda q, k, v, li=layer_index:
                                     self._decode_attention(q, k, v, li, slots, position_tensor, first_slot,
                                                            max_end, mask))
        return self._logits(hidden[:, 0])

    def _layer(self, layer: Any, layer_index: int, hidden: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, attend: Any) -> torch.Tensor:
        attention = layer.self_attn
        batch, length, _ = hidden.shape
        normed = layer.input_layernorm(hidden)
        query = attention.q_proj(normed).view(batch, length, self.num_heads, self.head_dim)
        key = attention.k_proj(normed).view(batch, length, self.num_kv_heads, self.head_dim)
        value = attention.v_proj(normed).view(batch, length, self.num_kv_heads, self.head_dim)
        if hasattr(attention, "q_norm"):  # Qwen3 normalises each head before rope
            query, key = attention.q_norm(query), attention.k_norm(key)
        query = _apply_rope(query.transpose(1, 2), cos, sin)
        key = _apply_rope(key.transpose(1, 2), cos, sin)
        attended = attend(query, key, value.transpose(1, 2))  # [batch, length, heads * head_dim]
        hidden = hidden + attention.o_proj(attended)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _prefill_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           layer_index: int, slot: int, start: int, causal: torch.Tensor | None) -> torch.Tensor:
        end = start + key.shape[2]
        self.cache.keys[layer_index][slot, :, start:end] = key[0]
        self.cache.values[layer_index][slot, :, start:end] = value[0]
        if causal is None:  # the whole prompt in one chunk: no need to read the cache back
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
        else:
            keys = self.cache.keys[layer_index][slot : slot + 1, :, :end]
            values = self.cache.values[layer_index][slot : slot + 1, :, :end]
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=causal, enable_gqa=True)
        return out.transpose(1, 2).reshape(1, key.shape[2], self.num_heads * self.head_dim)

    def _decode_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          layer_index: int, slots: torch.Tensor, positions: torch.Tensor,
                          first_slot: int, max_end: int, mask: torch.Tensor) -> torch.Tensor:
        batch = query.shape[0]
        layer_keys, layer_values = self.cache.keys[layer_index], self.cache.values[layer_index]
        layer_keys[slots, :, positions] = key[:, :, 0]
        layer_values[slots, :, positions] = value[:, :, 0]
        keys = layer_keys[first_slot : first_slot + batch, :, :max_end]
        values = layer_values[first_slot : first_slot + batch, :, :max_end]
        # One query per sequence: fold each KV head's query group into the query-length axis, so
        # grouped-query attention reads the cache views as they are (no repeat of keys/values).
        grouped = query.reshape(batch, self.num_kv_heads, self.group_size, self.head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
        return out.reshape(batch, 1, self.num_heads * self.head_dim)

    def _logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(last_hidden)).float()


def _as_ids(token_ids: "list[int] | torch.Tensor", device: torch.device) -> torch.Tensor:
    """Decode inputs come as a list, or as a tensor already on the device (tokens chosen there)."""
    if isinstance(token_ids, torch.Tensor):
        return token_ids.to(device)
    return torch.tensor(token_ids, device=device)


def _apply_rope(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos + rotated * sin
