"""Fused kernels for the CUDA path, in Triton, each with a plain-PyTorch twin used on the CPU.

Measured need (H100, Qwen2.5-1.5B, one stream): a decode step captured as a graph still took 3.8 ms,
most of it ~40 tiny kernels per layer (RMSNorm alone is eight). These three bring a layer to about ten:
RMSNorm with the residual add folded in, rotary embedding with the KV-cache write folded in, and
SiLU-and-multiply. Each rounds where transformers' own ops round (to the model's dtype after every
elementwise op), so results match the reference to its dtype's precision. Two attention kernels read
the slot cache directly: one query token per sequence (decode) and a prompt chunk continuing a cached
prefix; each states the measurement that called for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of PyTorch; the CPU build has none and uses the twins below.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the PyTorch build
    triton = None


def use_triton(tensor: torch.Tensor) -> bool:
    return triton is not None and tensor.is_cuda


# -- RMSNorm, optionally after adding the residual ------------------------------------------------------
def add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = hidden + residual`` (or ``hidden`` when None), then RMSNorm of it, as transformers'
    Llama/Qwen RMSNorm computes it. Returns (normed, residual); 2-D inputs [tokens, hidden]."""
    if not use_triton(hidden):
        residual = hidden if residual is None else hidden + residual
        normed = residual.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
        return weight * normed.to(residual.dtype), residual
    rows, cols = hidden.shape
    out = torch.empty_like(hidden)
    has_residual = residual is not None
    if residual is None:
        residual = hidden
    _add_rms_norm_kernel[(rows,)](hidden, residual, weight, out, hidden.stride(0), residual.stride(0),
                                  out.stride(0), cols, eps, HAS_RESIDUAL=has_residual,
                                  BLOCK=triton.next_power_of_2(cols))
    return out, residual


# -- SiLU(gate) * up ----------------------------------------------------------------------------------------
def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[tokens, 2 * intermediate] (gate then up) → [tokens, intermediate]."""
    if not use_triton(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    rows, double = gate_up.shape
    cols = double // 2
    out = torch.empty(rows, cols, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(cols, block))](gate_up, out, gate_up.stride(0), out.stride(0), cols,
                                                      BLOCK=block)
    return out


# -- rotary embedding of q and k, in place, and the KV-cache write -------------------------------------------
def rope_and_cache(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, num_heads: int,
                   num_kv_heads: int, head_dim: int) -> None:
    """``qkv`` [tokens, (heads + 2 kv_heads) * head_dim]: rotate q and k in place, then store k and v of
    token t at ``cache[slots[t], :, positions[t]]``. ``cos``/``sin`` are [max_len, head_dim] tables."""
    if not use_triton(qkv):
        tokens = qkv.shape[0]
        heads = qkv.view(tokens, num_heads + 2 * num_kv_heads, head_dim)
        rotated = heads[:, : num_heads + num_kv_heads]
        rotated.copy_(_rotate(rotated, cos[positions][:, None], sin[positions][:, None]))
        keys = heads[:, num_heads : num_heads + num_kv_heads]
        values = heads[:, num_heads + num_kv_heads :]
        key_cache[slots, :, positions] = keys
        value_cache[slots, :, positions] = values
        return
    tokens = qkv.shape[0]
    _rope_cache_kernel[(tokens, num_heads + num_kv_heads)](
        qkv, positions, slots, cos, sin, key_cache, value_cache, qkv.stride(0), cos.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=head_dim // 2)


# -- decode attention over the slot cache ---------------------------------------------------------------------
def decode_attention(qkv: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, positions: torch.Tensor,
                     first_slot: int, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """One query token per row: row r (slot ``first_slot + r``) attends to its cached keys at
    positions ``0..positions[r]``. Returns [rows, heads * head_dim]. CUDA only (Triton).

    Measured need: PyTorch's fused attention ran 23 µs per layer for a single query (its kernels are
    built for long queries) plus three mask kernels; this reads each row's keys once, in ~3 µs."""
    rows = qkv.shape[0]
    group = num_heads // num_kv_heads
    out = torch.empty(rows, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    _decode_attention_kernel[(rows, num_kv_heads)](
        qkv, key_cache, value_cache, out, positions, qkv.stride(0), key_cache.stride(0), key_cache.stride(1),
        key_cache.stride(2), out.stride(0), first_slot, head_dim ** -0.5,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_N=64,
        IEEE=qkv.dtype == torch.float32)
    return out


def extend_attention(qkv: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, positions: torch.Tensor,
                     slots: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Queries of a prompt chunk that continues a sequence already in the cache: token t attends to
    the keys of its slot at positions ``0..positions[t]`` (its own chunk's keys are already written).
    All real tokens share one slot; rows that pad a captured chunk write elsewhere and their output is
    not used. Returns [tokens, heads * head_dim].

    Measured need: PyTorch's attention with a mask falls back to a kernel that needs the keys repeated
    per query head (one copy per layer), and its first call with a new mask shape cost tens of ms."""
    tokens = qkv.shape[0]
    group = num_heads // num_kv_heads
    if not use_triton(qkv):
        query = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim).transpose(0, 1)[None]
        slot, end = int(slots[0]), int(positions.max()) + 1
        keys = key_cache[slot : slot + 1, :, :end].repeat_interleave(group, dim=1)
        values = value_cache[slot : slot + 1, :, :end].repeat_interleave(group, dim=1)
        visible = torch.arange(end, device=qkv.device)[None, :] <= positions[:, None]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible)
        return out[0].transpose(0, 1).reshape(tokens, num_heads * head_dim)
    out = torch.empty(tokens, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    block_rows = 64  # (token, query head) pairs per program: a few tokens times the query group
    _extend_attention_kernel[(triton.cdiv(tokens * group, block_rows), num_kv_heads)](
        qkv, key_cache, value_cache, out, positions, slots, tokens, qkv.stride(0), key_cache.stride(0),
        key_cache.stride(1), key_cache.stride(2), out.stride(0), head_dim ** -0.5,
        GROUP=group, BLOCK_M=block_rows, HEAD_DIM=head_dim, BLOCK_N=64, IEEE=qkv.dtype == torch.float32)
    return out


def _rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos + rotated * sin


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_residual, stride_out,
                             n_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
            x = (x + residual).to(dtype).to(tl.float32)  # rounded as torch's add rounds
            tl.store(residual_ptr + row * stride_residual + cols, x.to(dtype), mask=mask)
        variance = tl.sum(x * x, axis=0) / n_cols
        normed = (x * tl.math.rsqrt(variance + eps)).to(dtype).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (normed * weight).to(dtype), mask=mask)

    @triton.jit
    def _silu_mul_kernel(in_ptr, out_ptr, stride_in, stride_out, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype = out_ptr.dtype.element_ty
        gate = tl.load(in_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(in_ptr + row * stride_in + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (activated * up).to(dtype), mask=mask)

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, positions_ptr, slots_ptr, cos_ptr, sin_ptr, key_cache_ptr, value_cache_ptr,
                           stride_token, stride_table, stride_slot, stride_head, stride_position,
                           NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           HALF: tl.constexpr):
        token = tl.program_id(0)
        head = tl.program_id(1)  # q heads, then k heads
        dtype = qkv_ptr.dtype.element_ty
        position = tl.load(positions_ptr + token)
        low = tl.arange(0, HALF)
        base = qkv_ptr + token * stride_token + head * HEAD_DIM
        x1 = tl.load(base + low).to(tl.float32)
        x2 = tl.load(base + HALF + low).to(tl.float32)
        table = position * stride_table
        cos1 = tl.load(cos_ptr + table + low).to(tl.float32)
        cos2 = tl.load(cos_ptr + table + HALF + low).to(tl.float32)
        sin1 = tl.load(sin_ptr + table + low).to(tl.float32)
        sin2 = tl.load(sin_ptr + table + HALF + low).to(tl.float32)
        # x * cos + rotate_half(x) * sin, rounding after each op as the reference does.
        out1 = ((x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)).to(dtype)
        out2 = ((x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)).to(dtype)
        tl.store(base + low, out1)
        tl.store(base + HALF + low, out2)
        if head >= NUM_HEADS:
            kv_head = head - NUM_HEADS
            slot = tl.load(slots_ptr + token)
            target = slot * stride_slot + kv_head * stride_head + position * stride_position
            tl.store(key_cache_ptr + target + low, out1)
            tl.store(key_cache_ptr + target + HALF + low, out2)
            full = tl.arange(0, HEAD_DIM)
            value = tl.load(qkv_ptr + token * stride_token + (NUM_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM + full)
            tl.store(value_cache_ptr + target + full, value)

    @triton.jit
    def _attend_cached(q, key_cache_ptr, value_cache_ptr, base, positions, last, stride_position, scale,
                       ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        """Queries ``q`` [ROWS, HEAD_DIM] against one slot's cached keys at ``base``, positions ``0..last``;
        row r sees positions up to ``positions[r]``. Online softmax; returns [ROWS, HEAD_DIM] in float32."""
        dims = tl.arange(0, HEAD_DIM)
        best = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        total = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
        for start in range(0, last + 1, BLOCK_N):
            keys_at = start + tl.arange(0, BLOCK_N)
            cached = keys_at <= last
            offsets = base + keys_at[:, None] * stride_position + dims[None, :]
            k = tl.load(key_cache_ptr + offsets, mask=cached[:, None], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            visible = keys_at[None, :] <= positions[:, None]
            scores = tl.where(visible, scores * scale, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            weights = tl.exp(scores - new_best[:, None])
            rescale = tl.exp(best - new_best)
            total = total * rescale + tl.sum(weights, 1)
            v = tl.load(value_cache_ptr + offsets, mask=cached[:, None], other=0.0)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
            best = new_best
        return acc / total[:, None]

    @triton.jit
    def _decode_attention_kernel(qkv_ptr, key_cache_ptr, value_cache_ptr, out_ptr, positions_ptr, stride_row,
                                 stride_slot, stride_head, stride_position, stride_out, first_slot, scale,
                                 GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        dtype = out_ptr.dtype.element_ty
        position = tl.load(positions_ptr + row)
        queries = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        query_mask = queries < GROUP
        q = tl.load(qkv_ptr + row * stride_row + (kv_head * GROUP + queries)[:, None] * HEAD_DIM + dims[None, :],
                    mask=query_mask[:, None], other=0.0)
        base = (first_slot + row) * stride_slot + kv_head * stride_head
        positions = tl.zeros([GROUP_PAD], dtype=position.dtype) + position  # the group's queries: one token
        out = _attend_cached(q, key_cache_ptr, value_cache_ptr, base, positions, position, stride_position, scale,
                             ROWS=GROUP_PAD, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, IEEE=IEEE)
        tl.store(out_ptr + row * stride_out + (kv_head * GROUP + queries)[:, None] * HEAD_DIM + dims[None, :],
                 out.to(dtype), mask=query_mask[:, None])

    @triton.jit
    def _extend_attention_kernel(qkv_ptr, key_cache_ptr, value_cache_ptr, out_ptr, positions_ptr, slots_ptr,
                                 num_tokens, stride_row, stride_slot, stride_head, stride_position, stride_out,
                                 scale, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        block = tl.program_id(0)
        kv_head = tl.program_id(1)
        dtype = out_ptr.dtype.element_ty
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # row = token * GROUP + query head in the group
        tokens = rows // GROUP
        heads = kv_head * GROUP + rows % GROUP
        valid = tokens < num_tokens
        dims = tl.arange(0, HEAD_DIM)
        positions = tl.load(positions_ptr + tokens, mask=valid, other=0)
        q = tl.load(qkv_ptr + tokens[:, None] * stride_row + heads[:, None] * HEAD_DIM + dims[None, :],
                    mask=valid[:, None], other=0.0)
        slot = tl.load(slots_ptr + (block * BLOCK_M) // GROUP)  # the block's first token's slot
        base = slot * stride_slot + kv_head * stride_head
        out = _attend_cached(q, key_cache_ptr, value_cache_ptr, base, positions, tl.max(positions, 0),
                             stride_position, scale, ROWS=BLOCK_M, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, IEEE=IEEE)
        tl.store(out_ptr + tokens[:, None] * stride_out + heads[:, None] * HEAD_DIM + dims[None, :], out.to(dtype),
                 mask=valid[:, None])
