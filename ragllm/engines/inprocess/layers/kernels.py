"""Fused kernels for the CUDA path, in Triton, each with a plain-PyTorch twin used on the CPU.

Measured need (H100, Qwen2.5-1.5B, one stream): a decode step captured as a graph still took 3.8 ms,
most of it ~40 tiny kernels per layer (RMSNorm alone is eight). These three bring a layer to about ten:
RMSNorm with the residual add folded in, rotary embedding with the KV-cache write folded in, and
SiLU-and-multiply. Each rounds where transformers' own ops round (to the model's dtype after every
elementwise op), so results match the reference to its dtype's precision. The attention kernels that
read the paged cache are in ``attention``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ragllm.engines.inprocess.kv.paged_cache import FP8, FP8_MAX, PagedKVCache

try:  # Triton ships with CUDA builds of PyTorch; the CPU build has none and uses the twins below.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the PyTorch build
    triton = None


def use_triton(tensor: torch.Tensor) -> bool:
    return triton is not None and tensor.is_cuda


# -- programmatic dependent launch ----------------------------------------------------------------------------
# Off: each kernel launches once the one before it has ended (profilers' per-kernel times then add up to
# the step); read when a kernel is launched, so set it before graphs are captured.
DEPENDENT_LAUNCH = True
# Only kernels over at most this many rows (tokens) launch as dependents: decode steps and short
# continuations. Measured on an H100 (Qwen2.5-1.5B): a 2,048-token prefill took 13.04 ms with every
# kernel dependent against 12.35 without (AWQ 15.32 against 14.23), where a one-row AWQ step took
# 1.213 ms against 1.351.
DEPENDENT_LAUNCH_ROWS = 64


def dependent_launch(tensor: torch.Tensor) -> dict:
    """Launch arguments for a kernel over ``tensor``'s rows that may start while the kernel before it
    finishes (Hopper and later; at most ``DEPENDENT_LAUNCH_ROWS`` rows).

    A decode step is a chain of ~300 short kernels, each waiting for the one before it to end before it
    is even launched. Launched as a dependent, a kernel is placed on the multiprocessors as soon as every
    program of the previous kernel has begun; it does what needs none of that kernel's output (the int4
    products fetch their weights towards the cache), then waits for the previous kernel to end
    (``after_previous_kernel``). Every kernel passed these arguments must call that before it reads or
    writes anything another kernel touches."""
    dependent = (
        DEPENDENT_LAUNCH
        and use_triton(tensor)
        and tensor.shape[0] <= DEPENDENT_LAUNCH_ROWS
        and _compute_capability(tensor.device) >= 9
    )
    return {"DEPENDENT": dependent, "launch_pdl": dependent}


@functools.cache
def _compute_capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


# -- RMSNorm, optionally after adding the residual ------------------------------------------------------
def add_rms_norm(
    hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
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
    _add_rms_norm_kernel[(rows,)](
        hidden,
        residual,
        weight,
        out,
        hidden.stride(0),
        residual.stride(0),
        out.stride(0),
        cols,
        eps,
        HAS_RESIDUAL=has_residual,
        BLOCK=triton.next_power_of_2(cols),
        **dependent_launch(hidden),
    )
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
    _silu_mul_kernel[(rows, triton.cdiv(cols, block))](
        gate_up,
        out,
        gate_up.stride(0),
        out.stride(0),
        cols,
        BLOCK=block,
        **dependent_launch(gate_up),
    )
    return out


# -- rotary embedding of q and k, in place, and the KV-cache write -------------------------------------------
def rope_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    key_scale: float = 1.0,
    value_scale: float = 1.0,
) -> None:
    """``qkv`` [tokens, (heads + 2 kv_heads) * head_dim]: rotate q and k in place, then store k and v of
    token t at flat row ``rows[t]`` of the paged cache (see ``paged_cache``; an fp8 cache stores them
    divided by the scales). ``cos``/``sin`` are [max_len, head_dim] tables."""
    if not use_triton(qkv):
        tokens = qkv.shape[0]
        heads = qkv.view(tokens, num_heads + 2 * num_kv_heads, head_dim)
        rotated = heads[:, : num_heads + num_kv_heads]
        rotated.copy_(_rotate(rotated, cos[positions][:, None], sin[positions][:, None]))
        PagedKVCache.write_rows(
            key_cache, rows, heads[:, num_heads : num_heads + num_kv_heads], key_scale
        )
        PagedKVCache.write_rows(
            value_cache, rows, heads[:, num_heads + num_kv_heads :], value_scale
        )
        return
    tokens = qkv.shape[0]
    _rope_cache_kernel[(tokens, num_heads + num_kv_heads)](
        qkv,
        positions,
        rows,
        cos,
        sin,
        key_cache,
        value_cache,
        qkv.stride(0),
        cos.stride(0),
        *PagedKVCache.strides(key_cache),
        1.0 / key_scale,
        1.0 / value_scale,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HALF=head_dim // 2,
        BLOCK_SIZE=PagedKVCache.block_size_of(key_cache),
        FP8=key_cache.dtype == FP8,
        **dependent_launch(qkv),
    )


def _rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos + rotated * sin


if triton is not None:
    FP8_LIMIT = tl.constexpr(FP8_MAX)

    @triton.jit
    def after_previous_kernel(DEPENDENT: tl.constexpr):
        """For a kernel launched with ``dependent_launch``: waits until the kernel before it has ended and
        its writes are visible, then lets the next kernel be placed."""
        if DEPENDENT:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def inverse_rms_of(x, n_cols, eps):
        """1 / RMS of the float32 values ``x`` (zeros past the first ``n_cols``), as transformers' RMSNorm
        computes it."""
        return tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)

    @triton.jit
    def rms_normed(x, inverse_rms, weight, dtype: tl.constexpr):
        """RMSNorm of the float32 values ``x`` given their row's ``inverse_rms``, times the norm's float32
        ``weight``, in ``dtype``: rounded to it after the scaling and after the weight, as transformers'
        RMSNorm rounds (shared by this module's kernel and the int4 products that fold the norm in)."""
        normed = (x * inverse_rms).to(dtype).to(tl.float32)
        return (normed * weight).to(dtype)

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr,
        residual_ptr,
        weight_ptr,
        out_ptr,
        stride_x,
        stride_residual,
        stride_out,
        n_cols,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
        DEPENDENT: tl.constexpr,
    ):
        after_previous_kernel(DEPENDENT)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            residual = tl.load(
                residual_ptr + row * stride_residual + cols, mask=mask, other=0.0
            ).to(tl.float32)
            x = (x + residual).to(dtype).to(tl.float32)  # rounded as torch's add rounds
            tl.store(residual_ptr + row * stride_residual + cols, x.to(dtype), mask=mask)
        inverse_rms = inverse_rms_of(x, n_cols, eps)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(
            out_ptr + row * stride_out + cols, rms_normed(x, inverse_rms, weight, dtype), mask=mask
        )

    @triton.jit
    def _silu_mul_kernel(
        in_ptr, out_ptr, stride_in, stride_out, n_cols, BLOCK: tl.constexpr, DEPENDENT: tl.constexpr
    ):
        after_previous_kernel(DEPENDENT)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype = out_ptr.dtype.element_ty
        gate = tl.load(in_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(in_ptr + row * stride_in + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (activated * up).to(dtype), mask=mask)

    @triton.jit
    def _rope_cache_kernel(
        qkv_ptr,
        positions_ptr,
        rows_ptr,
        cos_ptr,
        sin_ptr,
        key_cache_ptr,
        value_cache_ptr,
        stride_token,
        stride_table,
        stride_block,
        stride_position,
        stride_head,
        key_inverse_scale,
        value_inverse_scale,
        NUM_HEADS: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        FP8: tl.constexpr,
        DEPENDENT: tl.constexpr,
    ):
        after_previous_kernel(DEPENDENT)
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
        out1 = ((x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)).to(
            dtype
        )
        out2 = ((x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)).to(
            dtype
        )
        tl.store(base + low, out1)
        tl.store(base + HALF + low, out2)
        if head >= NUM_HEADS:
            kv_head = head - NUM_HEADS
            row = tl.load(rows_ptr + token).to(tl.int64)
            target = (
                (row // BLOCK_SIZE) * stride_block
                + (row % BLOCK_SIZE) * stride_position
                + kv_head * stride_head
            )
            full = tl.arange(0, HEAD_DIM)
            value = tl.load(
                qkv_ptr
                + token * stride_token
                + (NUM_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM
                + full
            )
            if FP8:  # scaled, and saturated at e4m3's largest value
                cache_type = key_cache_ptr.dtype.element_ty
                tl.store(key_cache_ptr + target + low, _to_fp8(out1, key_inverse_scale, cache_type))
                tl.store(
                    key_cache_ptr + target + HALF + low,
                    _to_fp8(out2, key_inverse_scale, cache_type),
                )
                tl.store(
                    value_cache_ptr + target + full, _to_fp8(value, value_inverse_scale, cache_type)
                )
            else:
                tl.store(key_cache_ptr + target + low, out1)
                tl.store(key_cache_ptr + target + HALF + low, out2)
                tl.store(value_cache_ptr + target + full, value)

    @triton.jit
    def _to_fp8(x, inverse_scale, cache_type: tl.constexpr):
        scaled = x.to(tl.float32) * inverse_scale
        return tl.minimum(tl.maximum(scaled, -FP8_LIMIT), FP8_LIMIT).to(
            cache_type, fp_downcast_rounding="rtne"
        )
