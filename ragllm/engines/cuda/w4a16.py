"""Matrix products with AWQ int4 weights and 16-bit activations (W4A16), in Triton, with a
plain-PyTorch twin used on the CPU.

Decode is bound by reading weights: each step reads every weight once, so the int4 weights should be
read once per step, whatever the rows, and by enough programs to keep the memory system busy. One
row is a matrix-vector product without tensor cores, where the arithmetic per weight decides the
speed: each weight becomes a float in one logic operation (``_mantissa_values``). The tiled decode
kernel (up to ``DECODE_ROWS`` rows) gives each program a strip of output columns and a share of
the input groups (split-K); the last program to finish a strip adds the shares up, in a fixed order,
and writes the output, so a step is one launch per projection and the result does not depend on
which program finished first. The per-strip counters it uses reset themselves, so the kernel can be
replayed from a CUDA graph.

Prefill is bound by arithmetic; it either runs the same kernel with large row tiles and no split or
dequantises the weights into a scratch matrix for cuBLAS, whichever ``PREFILL_MODE`` says (chosen by
``bench/w4a16_kernels.py`` on the device).

The packed layout is ``awq_format``'s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ragllm.engines.cuda.kernels import triton, use_triton
from ragllm.engines.quantized.awq_format import AwqWeights, dequantise

if triton is not None:
    import triton.language as tl

DECODE_ROWS = 64
# The nibble mask, passed to the kernels at run time (see ``_mantissa_values``).
NIBBLE = 15
# Most input groups a single-row program unrolls; a longer share runs as a pipelined loop (code size).
UNROLL_LIMIT = 4


@dataclass
class W4A16Tuning:
    """Block shapes and pipelining; the defaults are the fastest of ``bench/w4a16_kernels.py``'s sweep
    on an H200 over Qwen2.5-1.5B's projections (BENCHMARKS.md)."""
    # One row (a single stream) runs without tensor cores: each weight is read as a float by one logic
    # operation, and the products are summed over the inputs once, at the end.
    gemv_words: int = 8  # packed words (8 outputs each) per program
    gemv_block_k: int = 16  # inputs per accumulator tile (a divisor of the group size)
    gemv_warps: int = 4
    gemv_stages: int = 2
    gemv_programs_per_sm: int = 8
    gemv_unrolled: bool = True  # each program's groups unrolled instead of software-pipelined
    # Up to ``small_rows`` rows, a wider output tile; more rows, a narrower one.
    small_rows: int = 16
    decode_small_block_n: int = 64
    decode_small_stages: int = 3
    decode_block_n: int = 32
    decode_warps: int = 4
    decode_stages: int = 3
    # Programs aimed for in a decode product, per multiprocessor (the split-K factor follows).
    decode_programs_per_sm: int = 4
    prefill_mode: str = "dequantise"  # or "tiled"
    prefill_block_m: int = 64
    prefill_block_n: int = 128
    prefill_warps: int = 4
    prefill_stages: int = 2


TUNING = W4A16Tuning()


def counters_for(out_features: int, device: torch.device) -> torch.Tensor:
    """The split-K arrival counters one projection needs (zeros; the kernel leaves them zero)."""
    return torch.zeros(-(-out_features // 16), dtype=torch.int32, device=device)


def awq_matmul(x: torch.Tensor, weights: AwqWeights, counters: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [M, K] → [M, N] in ``x``'s dtype: ``x @ W + bias`` with W the dequantised int4 weights."""
    if not use_triton(x):
        out = x @ dequantise(weights, x.dtype).t()
        return out if weights.bias is None else out + weights.bias
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.shape[0] <= DECODE_ROWS:
        return _decode_product(x, weights, counters)
    if TUNING.prefill_mode == "dequantise":
        return _dequantised_product(x, weights)
    return _tiled_product(x, weights, TUNING.prefill_block_m, TUNING.prefill_block_n, 1, None,
                          TUNING.prefill_warps, TUNING.prefill_stages)


def _split_for(blocks: int, groups: int, per_sm: int, counters: torch.Tensor | None, device: torch.device) -> int:
    """The split-K factor: the largest divisor of ``groups`` that keeps programs within ``per_sm`` per
    multiprocessor (1 without counters to reduce with)."""
    if counters is None or counters.numel() < blocks:
        return 1
    target = per_sm * _multiprocessors(device)
    return max(d for d in range(1, groups + 1) if groups % d == 0 and (d == 1 or blocks * d <= target))


def _decode_product(x: torch.Tensor, weights: AwqWeights, counters: torch.Tensor | None) -> torch.Tensor:
    rows, n = x.shape[0], weights.out_features
    groups = weights.in_features // weights.group_size
    if rows == 1 and TUNING.gemv_words:
        return _single_row_product(x, weights, counters, groups)
    small = rows <= TUNING.small_rows
    block_n = TUNING.decode_small_block_n if small else TUNING.decode_block_n
    stages = TUNING.decode_small_stages if small else TUNING.decode_stages
    split = _split_for(triton.cdiv(n, block_n), groups, TUNING.decode_programs_per_sm, counters, x.device)
    block_m = max(16, triton.next_power_of_2(rows))
    return _tiled_product(x, weights, block_m, block_n, split, counters, TUNING.decode_warps, stages)


def _single_row_product(x: torch.Tensor, weights: AwqWeights, counters: torch.Tensor | None,
                        groups: int) -> torch.Tensor:
    n, words = weights.out_features, TUNING.gemv_words
    blocks = triton.cdiv(n // 8, words)
    split = _split_for(blocks, groups, TUNING.gemv_programs_per_sm, counters, x.device)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    partial = torch.empty(split, n, dtype=torch.float32, device=x.device) if split > 1 else out
    bias = weights.bias if weights.bias is not None else out
    _awq_gemv_kernel[(blocks, split)](
        x, weights.qweight, weights.qzeros, weights.scales, bias, out, partial,
        counters if counters is not None else out, n, NIBBLE, GROUP=weights.group_size,
        BLOCK_K=min(TUNING.gemv_block_k, weights.group_size), WORDS=words, GROUPS_PER_SPLIT=groups // split,
        SPLIT_K=split, HAS_BIAS=weights.bias is not None,
        UNROLLED=TUNING.gemv_unrolled and groups // split <= UNROLL_LIMIT, num_warps=TUNING.gemv_warps,
        num_stages=TUNING.gemv_stages)
    return out


def _tiled_product(x: torch.Tensor, weights: AwqWeights, block_m: int, block_n: int, split: int,
                   counters: torch.Tensor | None, warps: int, stages: int) -> torch.Tensor:
    rows, n = x.shape[0], weights.out_features
    groups = weights.in_features // weights.group_size
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    partial = torch.empty(split, rows, n, dtype=torch.float32, device=x.device) if split > 1 else out
    bias = weights.bias if weights.bias is not None else out
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n), split)
    _awq_gemm_kernel[grid](
        x, weights.qweight, weights.qzeros, weights.scales, bias, out, partial,
        counters if counters is not None else out, rows, n, x.stride(0), out.stride(0), NIBBLE,
        GROUP=weights.group_size, GROUPS_PER_SPLIT=groups // split, SPLIT_K=split, BLOCK_M=block_m,
        BLOCK_N=block_n, HAS_BIAS=weights.bias is not None, num_warps=warps, num_stages=stages)
    return out


def _dequantised_product(x: torch.Tensor, weights: AwqWeights) -> torch.Tensor:
    k, n = weights.in_features, weights.out_features
    matrix = torch.empty(k, n, dtype=x.dtype, device=x.device)
    block_n = 128
    _awq_dequantise_kernel[(k // weights.group_size, triton.cdiv(n, block_n))](
        weights.qweight, weights.qzeros, weights.scales, matrix, n, NIBBLE, GROUP=weights.group_size, BLOCK_N=block_n)
    out = x @ matrix
    return out if weights.bias is None else out + weights.bias


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


if triton is not None:

    @triton.jit
    def _spread(packed):
        """int32 [R, W] → [R, 8W], each word repeated for its eight columns. ``interleave`` keeps a
        word's copies in the thread that loaded it, so no data moves between threads."""
        packed = tl.interleave(packed, packed)
        packed = tl.interleave(packed, packed)
        return tl.interleave(packed, packed)

    @triton.jit
    def _mantissa_values(spread, NIBBLE, BLOCK_N: tl.constexpr):
        """Spread words [R, BLOCK_N] → float32 ``2^23 + q * 2^f`` per column, and ``f`` per column.

        Column c of a word sits at bit ``4 * SHIFTS[c]``. Masking the nibble where it sits and setting
        float32's exponent of 2^23 over it reads it as a float in one logic operation (no shift, no
        conversion): ``2^23 + q * 2^f`` with f its bit offset, exact while the nibble lies within the
        23 mantissa bits. The top three nibbles (offsets 20-28) are shifted down 12 bits first, one
        shift per word. ``NIBBLE`` is 15 passed at run time: as a register, mask and exponent go into
        one three-input logic operation; as a constant, the compiler splits them into two."""
        column = tl.arange(0, BLOCK_N) % 8
        shift = (column // 2 + (column % 2) * 4) * 4
        high = shift >= 20
        field = tl.where(high, shift - 12, shift)
        source = tl.where(high[None, :], spread >> 12, spread)
        values = ((source & (NIBBLE << field)[None, :]) | 0x4B000000).to(tl.float32, bitcast=True)
        return values, field

    @triton.jit
    def _group_terms(qzeros_ptr, scales_ptr, group, N, words, word_mask, cols, col_mask, NIBBLE,
                     BLOCK_N: tl.constexpr):
        """One input group's zero points in the same ``2^23 + z * 2^f`` form and its scales divided by
        ``2^f``, as [1, BLOCK_N]: ``(value - zero) * scale`` is then exactly ``(q - z) * s``."""
        packed_zeros = tl.load(qzeros_ptr + group * (N // 8) + words[None, :], mask=word_mask[None, :], other=0)
        zeros, field = _mantissa_values(_spread(packed_zeros), NIBBLE, BLOCK_N)
        scales = tl.load(scales_ptr + group * N + cols[None, :], mask=col_mask[None, :], other=0.0).to(tl.float32)
        return zeros, scales * tl.exp2(-field.to(tl.float32))[None, :]

    @triton.jit
    def _gemv_group(acc, x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, group, N, words, word_mask, cols, col_mask,
                    NIBBLE, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """``acc`` plus one input group's products, [BLOCK_K, BLOCK_N]: unscaled over the group's
        BLOCK_K-row steps, then scaled once."""
        zeros, scales = _group_terms(qzeros_ptr, scales_ptr, group, N, words, word_mask, cols, col_mask, NIBBLE,
                                     BLOCK_N)
        part = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for step in tl.static_range(GROUP // BLOCK_K):
            k = group * GROUP + step * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + k).to(tl.float32)
            packed = tl.load(qweight_ptr + k[:, None] * (N // 8) + words[None, :], mask=word_mask[None, :], other=0)
            values, _ = _mantissa_values(_spread(packed), NIBBLE, BLOCK_N)
            part += x[:, None] * (values - zeros)
        return acc + part * scales

    @triton.jit
    def _awq_gemv_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, bias_ptr, out_ptr, partial_ptr, counters_ptr,
                         N, NIBBLE, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, WORDS: tl.constexpr,
                         GROUPS_PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                         UNROLLED: tl.constexpr):
        """One row, without tensor cores: program (n, k) computes 8 * WORDS outputs over its share of the
        input groups. Products accumulate elementwise over a [BLOCK_K, 8 * WORDS] tile (each thread its
        own), unscaled within a group and scaled once per group, and are summed over the inputs once at
        the end; per weight that is one logic operation, a subtraction and a multiply-add."""
        BLOCK_N: tl.constexpr = WORDS * 8
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        words = pid_n * WORDS + tl.arange(0, WORDS)
        word_mask = words < N // 8
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        first = pid_k * GROUPS_PER_SPLIT
        if UNROLLED:  # every load of the program's share in flight at once
            for index in tl.static_range(GROUPS_PER_SPLIT):
                acc = _gemv_group(acc, x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, first + index, N, words, word_mask,
                                  cols, col_mask, NIBBLE, GROUP, BLOCK_K, BLOCK_N)
        else:  # software-pipelined over the groups
            for index in range(GROUPS_PER_SPLIT):
                acc = _gemv_group(acc, x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, first + index, N, words, word_mask,
                                  cols, col_mask, NIBBLE, GROUP, BLOCK_K, BLOCK_N)
        _finish(tl.sum(acc, axis=0), out_ptr + cols, partial_ptr + cols, N, col_mask, bias_ptr + cols, col_mask,
                counters_ptr + pid_n, pid_k, SPLIT_K, HAS_BIAS)

    @triton.jit
    def _awq_gemm_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, bias_ptr, out_ptr, partial_ptr, counters_ptr,
                         M, N, stride_xm, stride_om, NIBBLE, GROUP: tl.constexpr, GROUPS_PER_SPLIT: tl.constexpr,
                         SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < M
        col_mask = cols < N
        offsets = tl.arange(0, GROUP)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first = pid_k * GROUPS_PER_SPLIT
        for index in range(GROUPS_PER_SPLIT):
            group = first + index
            k = group * GROUP + offsets
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=row_mask[:, None], other=0.0)
            weights = _dequantised_group(qweight_ptr, qzeros_ptr, scales_ptr, group, N, pid_n, NIBBLE, GROUP, BLOCK_N)
            acc += tl.dot(x, weights.to(x_ptr.dtype.element_ty))
        _finish(acc, out_ptr + rows[:, None] * stride_om + cols[None, :],
                partial_ptr + rows[:, None] * N + cols[None, :], M * N, row_mask[:, None] & col_mask[None, :],
                bias_ptr + cols[None, :], col_mask[None, :], counters_ptr + pid_m * tl.num_programs(1) + pid_n,
                pid_k, SPLIT_K, HAS_BIAS)

    @triton.jit
    def _finish(total, out_ptrs, share_ptrs, share_stride, mask, bias_ptrs, bias_mask, counter_ptr, pid_k,
                SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Writes a program's float32 ``total`` (plus the bias) to ``out_ptrs``. Under split-K it is one
        share of the strip: stored at ``share_ptrs + pid_k * share_stride``, and the last of the strip's
        programs to arrive at ``counter_ptr`` adds the shares up in split order (the same bits whichever
        program finishes first), writes the sum and resets the counter for the next product."""
        if SPLIT_K > 1:
            tl.store(share_ptrs + pid_k * share_stride, total, mask=mask)
            tl.debug_barrier()  # every thread's share is written before the arrival is counted
            arrived = tl.atomic_add(counter_ptr, 1)  # acq_rel: shares before it are visible after
            if arrived == SPLIT_K - 1:
                summed = tl.zeros_like(total)
                for split in range(SPLIT_K):
                    summed += tl.load(share_ptrs + split * share_stride, mask=mask, other=0.0, cache_modifier=".cg")
                _store_biased(summed, out_ptrs, mask, bias_ptrs, bias_mask, HAS_BIAS)
                tl.atomic_xchg(counter_ptr, 0)  # ready for the next product (graph replays)
        else:
            _store_biased(total, out_ptrs, mask, bias_ptrs, bias_mask, HAS_BIAS)

    @triton.jit
    def _store_biased(total, out_ptrs, mask, bias_ptrs, bias_mask, HAS_BIAS: tl.constexpr):
        if HAS_BIAS:
            total += tl.load(bias_ptrs, mask=bias_mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequantised_group(qweight_ptr, qzeros_ptr, scales_ptr, group, N, pid_n, NIBBLE, GROUP: tl.constexpr,
                           BLOCK_N: tl.constexpr):
        """Input group ``group``'s weights of output block ``pid_n``, dequantised: float32 [GROUP, BLOCK_N]."""
        k = group * GROUP + tl.arange(0, GROUP)
        words = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        word_mask = words < N // 8
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        packed = tl.load(qweight_ptr + k[:, None] * (N // 8) + words[None, :], mask=word_mask[None, :], other=0)
        values, _ = _mantissa_values(_spread(packed), NIBBLE, BLOCK_N)
        zeros, scales = _group_terms(qzeros_ptr, scales_ptr, group, N, words, word_mask, cols, cols < N, NIBBLE,
                                     BLOCK_N)
        return (values - zeros) * scales

    @triton.jit
    def _awq_dequantise_kernel(qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, N, NIBBLE, GROUP: tl.constexpr,
                               BLOCK_N: tl.constexpr):
        group = tl.program_id(0)
        pid_n = tl.program_id(1)
        k = group * GROUP + tl.arange(0, GROUP)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        weights = _dequantised_group(qweight_ptr, qzeros_ptr, scales_ptr, group, N, pid_n, NIBBLE, GROUP, BLOCK_N)
        tl.store(out_ptr + k[:, None] * N + cols[None, :], weights.to(out_ptr.dtype.element_ty),
                 mask=(cols < N)[None, :])
