"""Matrix products with AWQ int4 weights and 16-bit activations (W4A16), in Triton, with a
plain-PyTorch twin used on the CPU.

Decode is bound by reading weights: each step reads every weight once, so the int4 weights should be
read once per step, whatever the rows, with enough bytes in flight to keep the memory system busy.
One row is a matrix-vector product without tensor cores. Products wide enough read rows of 32 packed
words a program, a whole input group in one load (so that every load is issued before the first
product), and compute in float16 pairs: seven instructions make eight weights ``1024 + q`` of a word
(``_half_values``), one subtraction and one multiply make two products (``_gemv_group_in_halves``).
Narrower products compute in float32, each weight a float in one logic operation (``_mantissa_values``).
2-64 rows run on tensor cores (``_awq_rows_kernel``): the weights become the exact differences ``q - z``
in the input's 16-bit type, the products go to float32 and the scales apply there, per input group.
The one-row and tensor-core decode kernels (up to ``DECODE_ROWS`` rows) give each program a strip of output
columns and a share of the input groups (split-K); the last program to finish a strip adds the shares
up, in a fixed order, and writes the output, so a step is one launch per projection and the result
does not depend on which program finished first. The per-strip counters it uses reset themselves, so
the kernel can be replayed from a CUDA graph. A one-row step is a chain of short kernels, each waiting
for the one before it: there the products take in the work of their neighbours (``folds_norms``: RMSNorm
in q/k/v and gate/up, the residual add in o and down), and a program holding one input group loads its
weights before that wait.

Prefill is bound by arithmetic; it either runs the tensor-core kernel with large row tiles and no split or
dequantises the weights into a scratch matrix for cuBLAS, whichever ``PREFILL_MODE`` says (chosen by
``bench/w4a16_kernels.py`` on the device).

The packed layout is ``awq_format``'s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ragllm.engines.inprocess.layers.kernels import (
    add_rms_norm,
    dependent_launch,
    silu_and_mul,
    triton,
    use_triton,
)
from ragllm.engines.inprocess.quantized.awq_format import AwqWeights, dequantise

if triton is not None:
    import triton.language as tl

    from ragllm.engines.inprocess.layers.kernels import (
        after_previous_kernel,
        inverse_rms_of,
        rms_normed,
    )

DECODE_ROWS = 64
# The nibble mask, passed to the kernels at run time (see ``_mantissa_values``).
NIBBLE = 15
# Most input groups a single-row program unrolls; a longer share runs as a pipelined loop (code size).
UNROLL_LIMIT = 4
# The last program of a split strip loads up to this many shares at once (unrolled); more, one at a time
# (each a round trip to L2, which dominated the smaller products' time).
UNROLLED_SHARES = 16
# One-row programs reading rows of at least this many words compute in float16 pairs
# (``_gemv_group_in_halves``); narrower ones in float32, where the pairs' layout costs more than they save.
HALF_PAIRS_FROM_WORDS = 16
# In float16 pairs the input is scaled by 2^-7 before it meets the weights, so that a
# thread's eight float16 products of a group stay finite for inputs up to ±69,000 (8 * 15 * 69,000 *
# 2^-7 < 65,504, float16's largest value); the scale is exact and undone with the group's scales.
HALF_INPUT_SCALE = 2.0**-7
# Seven instructions make eight 16-bit values ``magic + q`` of a packed word: each 32-bit AND-OR (lop3)
# takes two nibbles 16 bits apart (AWQ's columns 2j and 2j + 1) into the low mantissa bits of a pair
# whose other bits are ``magic``'s; three shifts bring the other pairs down. The magic numbers are 1024
# in float16 (0x6400) and 128 in bfloat16 (0x4300), where the mantissa's last four bits count ones;
# with the sign bit set they make ``-(magic + q)``.
_VALUES_ASM = (
    "{{ .reg .b32 s4, s8, s12;"
    " shr.u32 s4, $4, 4; shr.u32 s8, $4, 8; shr.u32 s12, $4, 12;"
    " lop3.b32 $0, $4, 0x000F000F, {magic}, 0xEA;"
    " lop3.b32 $1, s4, 0x000F000F, {magic}, 0xEA;"
    " lop3.b32 $2, s8, 0x000F000F, {magic}, 0xEA;"
    " lop3.b32 $3, s12, 0x000F000F, {magic}, 0xEA; }}"
)
_HALF_VALUES_ASM = _VALUES_ASM.format(magic="0x64006400")
_HALF_NEGATIVE_VALUES_ASM = _VALUES_ASM.format(magic="0xE400E400")
_BF16_VALUES_ASM = _VALUES_ASM.format(magic="0x43004300")
_BF16_NEGATIVE_VALUES_ASM = _VALUES_ASM.format(magic="0xC300C300")
# (magic + q) + -(magic + z) = q - z for a pair of columns, exact: one multiply-add by 1 (the 16-bit
# pair additions of sm_90 are not on earlier GPUs).
_HALF_DIFFERENCE_ASM = "{ .reg .b32 one; mov.b32 one, 0x3C003C00; fma.rn.f16x2 $0, $1, one, $2; }"
_BF16_DIFFERENCE_ASM = "{ .reg .b32 one; mov.b32 one, 0x3F803F80; fma.rn.bf16x2 $0, $1, one, $2; }"
# (value - zero) * x for a pair of columns: an exact difference, one rounding.
_HALF_PRODUCT_ASM = "{ .reg .b32 d; sub.rn.f16x2 d, $1, $2; mul.rn.f16x2 $0, d, $3; }"


@dataclass
class W4A16Tuning:
    """Block shapes and pipelining; the defaults are the fastest of ``bench/w4a16_kernels.py``'s sweep
    over Qwen2.5-1.5B's projections (on an H100, 2026-11-27; BENCHMARKS.md)."""

    # One row (a single stream) runs without tensor cores, each program reading ``gemv_words`` packed
    # words (8 outputs each) of every input row: from ``HALF_PAIRS_FROM_WORDS`` words on in float16
    # pairs, below that in float32 over tiles of ``gemv_block_k`` inputs (a divisor of the group size).
    gemv_words: int = 16
    gemv_block_k: int = 16
    gemv_warps: int = 4
    gemv_stages: int = 2
    gemv_programs_per_sm: int = 8
    gemv_unrolled: bool = True  # each program's groups unrolled instead of software-pipelined
    # Products wide enough for ``gemv_min_wide_programs_per_sm`` programs a multiprocessor at one input
    # group each read rows of ``gemv_wide_words`` words (0: never).
    gemv_wide_words: int = 32
    gemv_min_wide_programs_per_sm: int = 2
    # Launched as a dependent (``kernels.dependent_launch``), a one-row program asks for its weights
    # to be brought into the L2 cache while the kernel before it finishes.
    gemv_prefetch: bool = True
    # Launched as a dependent, a one-row program whose share is one input group in float16 pairs loads
    # its weights into registers before waiting for the kernel before it (instead of the L2 request).
    gemv_early_loads: bool = True
    # ...under this many registers a thread (0: the compiler's choice), which fits 8 programs of 4 warps
    # a multiprocessor (the compiler's choice for 32-word rows, 80, fits 6).
    gemv_early_registers: int = 64
    # One-row steps fold RMSNorm into the products that read it (q/k/v, gate/up) and the residual add into
    # those that feed it (o, down): ``folds_norms``.
    gemv_folds_norms: bool = True
    # 2-64 rows run on tensor cores (``_awq_rows_kernel``): each program computes ``rows_block_n`` outputs
    # of every row over a share of the input groups, aiming for ``rows_programs_per_sm`` programs a
    # multiprocessor (the split-K factor follows). ``rows_swapped``: the product is computed transposed
    # (outputs along the tensor cores' long side, rows along the short one).
    rows_block_n: int = 64
    rows_warps: int = 4
    rows_stages: int = 4
    rows_programs_per_sm: int = 2
    rows_swapped: bool = True
    prefill_mode: str = "dequantise"  # or "tiled"
    # Warps of a dequantising program ([group, 128] weights): at 4 a thread held 128 values in 166
    # registers, 3 programs a multiprocessor; at 8, 64 registers.
    dequantise_warps: int = 8
    prefill_block_m: int = 64
    prefill_block_n: int = 128
    prefill_warps: int = 4
    prefill_stages: int = 2


TUNING = W4A16Tuning()


def counters_for(out_features: int, device: torch.device) -> torch.Tensor:
    """The split-K arrival counters one projection needs (zeros; the kernel leaves them zero)."""
    return torch.zeros(-(-out_features // 16), dtype=torch.int32, device=device)


def awq_matmul(
    x: torch.Tensor, weights: AwqWeights, counters: torch.Tensor | None = None
) -> torch.Tensor:
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
    return _tiled_product(
        x,
        weights,
        TUNING.prefill_block_m,
        TUNING.prefill_block_n,
        1,
        None,
        TUNING.prefill_warps,
        TUNING.prefill_stages,
        False,
    )


def folds_norms(hidden: torch.Tensor) -> bool:
    """Whether a step over ``hidden`` [rows, hidden] folds RMSNorm and the residual add into its int4
    products (``awq_normed_matmul``, ``awq_add_product``): one row on the GPU, where every kernel of the
    chain costs its launch and its wait more than its work."""
    return (
        use_triton(hidden)
        and hidden.shape[0] == 1
        and bool(TUNING.gemv_words)
        and TUNING.gemv_folds_norms
    )


def awq_normed_matmul(
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weights: AwqWeights,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """``RMSNorm(residual) @ W + bias``, RMSNorm as ``kernels.add_rms_norm`` computes and rounds it. Where
    ``folds_norms``, every program of the product normalises the row itself (one kernel fewer)."""
    if folds_norms(residual) and residual.stride(-1) == 1:
        groups = weights.in_features // weights.group_size
        return _single_row_product(residual, weights, counters, groups, norm=(norm_weight, eps))
    normed, _ = add_rms_norm(residual, None, norm_weight, eps)
    return awq_matmul(normed, weights, counters)


def awq_add_product(
    residual: torch.Tensor,
    x: torch.Tensor,
    weights: AwqWeights,
    counters: torch.Tensor | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """``residual += x @ W + bias`` in place (the product rounded to the residual's dtype, then the sum,
    as torch's ops round); ``gated``: the product of ``SiLU(gate) * up`` of ``x`` (``awq_gated_matmul``).
    Where ``folds_norms``, the product's last program of each strip adds its outputs in (one kernel fewer)."""
    if folds_norms(x) and x.stride(-1) == 1 and residual.is_contiguous():
        groups = weights.in_features // weights.group_size
        _single_row_product(
            x,
            weights,
            counters,
            groups,
            gate_offset=weights.in_features if gated else 0,
            accumulate_into=residual,
        )
        return residual
    product = awq_gated_matmul(x, weights, counters) if gated else awq_matmul(x, weights, counters)
    return residual.add_(product)


def awq_gated_matmul(
    gate_up: torch.Tensor, weights: AwqWeights, counters: torch.Tensor | None = None
) -> torch.Tensor:
    """``SiLU(gate) * up`` of ``gate_up`` [M, 2K] (gate then up, as ``kernels.silu_and_mul``), times W.
    One row on the GPU reads ``gate_up`` inside the product, which saves a kernel a layer; otherwise
    the activation runs first."""
    if (
        use_triton(gate_up)
        and gate_up.shape[0] == 1
        and TUNING.gemv_words
        and gate_up.stride(-1) == 1
    ):
        return _single_row_product(
            gate_up,
            weights,
            counters,
            weights.in_features // weights.group_size,
            gate_offset=weights.in_features,
        )
    return awq_matmul(silu_and_mul(gate_up), weights, counters)


def _split_for(
    blocks: int, groups: int, per_sm: int, counters: torch.Tensor | None, device: torch.device
) -> int:
    """The split-K factor: the largest divisor of ``groups`` that keeps programs within ``per_sm`` per
    multiprocessor (1 without counters to reduce with)."""
    if counters is None or counters.numel() < blocks:
        return 1
    return _largest_split(blocks, groups, per_sm * _multiprocessors(device))


@functools.cache
def _largest_split(blocks: int, groups: int, target: int) -> int:
    """Cached: a step that is not replayed from a graph asks this for every product of every layer."""
    return max(
        d for d in range(1, groups + 1) if groups % d == 0 and (d == 1 or blocks * d <= target)
    )


def _decode_product(
    x: torch.Tensor, weights: AwqWeights, counters: torch.Tensor | None
) -> torch.Tensor:
    rows, n = x.shape[0], weights.out_features
    groups = weights.in_features // weights.group_size
    if rows == 1 and TUNING.gemv_words:
        return _single_row_product(x, weights, counters, groups)
    split = _split_for(
        triton.cdiv(n, TUNING.rows_block_n), groups, TUNING.rows_programs_per_sm, counters, x.device
    )
    block_m = max(16, triton.next_power_of_2(rows))
    return _tiled_product(
        x,
        weights,
        block_m,
        TUNING.rows_block_n,
        split,
        counters,
        TUNING.rows_warps,
        TUNING.rows_stages,
        TUNING.rows_swapped,
    )


def _single_row_product(
    x: torch.Tensor,
    weights: AwqWeights,
    counters: torch.Tensor | None,
    groups: int,
    gate_offset: int = 0,
    norm: tuple[torch.Tensor, float] | None = None,
    accumulate_into: torch.Tensor | None = None,
) -> torch.Tensor:
    """``gate_offset``: ``x`` is a gate/up output whose up half starts that many columns after its gate
    half, and the product's input is SiLU(gate) * up. ``norm`` (weight, epsilon): the input is RMSNorm
    of ``x``. ``accumulate_into``: the outputs are added to it, in place, and it is returned."""
    n = weights.out_features
    words = _row_words(n, groups, x.device)
    # float32 inputs keep float32 arithmetic: float16 pairs would round them to 11 bits.
    halves = words >= HALF_PAIRS_FROM_WORDS and x.dtype != torch.float32
    blocks = triton.cdiv(n // 8, words)
    split = _split_for(blocks, groups, TUNING.gemv_programs_per_sm, counters, x.device)
    out = (
        accumulate_into
        if accumulate_into is not None
        else torch.empty(1, n, dtype=x.dtype, device=x.device)
    )
    partial = torch.empty(split, n, dtype=torch.float32, device=x.device) if split > 1 else out
    bias = weights.bias if weights.bias is not None else out
    norm_weight, eps = norm if norm is not None else (x, 0.0)
    early = TUNING.gemv_early_loads and halves and groups == split
    registers = (
        {"maxnreg": TUNING.gemv_early_registers} if early and TUNING.gemv_early_registers else {}
    )
    _awq_gemv_kernel[(blocks, split)](
        x,
        weights.qweight,
        weights.qzeros,
        weights.scales,
        bias,
        out,
        partial,
        counters if counters is not None else out,
        norm_weight,
        eps,
        n,
        NIBBLE,
        GROUP=weights.group_size,
        BLOCK_K=_tile_rows(words, weights.group_size, halves),
        WORDS=words,
        GROUPS_PER_SPLIT=groups // split,
        SPLIT_K=split,
        HAS_BIAS=weights.bias is not None,
        UNROLLED=TUNING.gemv_unrolled and groups // split <= UNROLL_LIMIT,
        HALVES=halves,
        HALF_SCALE=HALF_INPUT_SCALE,
        GATE_OFFSET=gate_offset,
        NORMED=norm is not None,
        INPUTS_PAD=triton.next_power_of_2(weights.in_features),
        ACCUMULATE=accumulate_into is not None,
        EARLY=early,
        PREFETCH=TUNING.gemv_prefetch,
        PREFETCH_ROWS=triton.next_power_of_2(groups // split * weights.group_size),
        num_warps=TUNING.gemv_warps,
        num_stages=TUNING.gemv_stages,
        **registers,
        **dependent_launch(x),
    )
    return out


def _row_words(out_features: int, groups: int, device: torch.device) -> int:
    """Packed words per program and input row for a one-row product (``W4A16Tuning``): wide rows
    where the product still has enough programs at one input group each."""
    wide = TUNING.gemv_wide_words
    if wide and triton.cdiv(out_features // 8, wide) * groups >= (
        TUNING.gemv_min_wide_programs_per_sm * _multiprocessors(device)
    ):
        return wide
    return TUNING.gemv_words


def _tiled_product(
    x: torch.Tensor,
    weights: AwqWeights,
    block_m: int,
    block_n: int,
    split: int,
    counters: torch.Tensor | None,
    warps: int,
    stages: int,
    swapped: bool,
) -> torch.Tensor:
    if x.dtype == torch.float32:  # tiles twice the size: two stages fit shared memory
        stages = min(stages, 2)
    rows, n = x.shape[0], weights.out_features
    groups = weights.in_features // weights.group_size
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    partial = (
        torch.empty(split, rows, n, dtype=torch.float32, device=x.device) if split > 1 else out
    )
    bias = weights.bias if weights.bias is not None else out
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n), split)
    _awq_rows_kernel[grid](
        x,
        weights.qweight,
        weights.qzeros,
        weights.scales,
        bias,
        out,
        partial,
        counters if counters is not None else out,
        rows,
        x.stride(0),
        out.stride(0),
        N=n,
        GROUP=weights.group_size,
        GROUPS_PER_SPLIT=groups // split,
        SPLIT_K=split,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        INPUT=_INPUT_KINDS[x.dtype],
        SWAPPED=swapped,
        HAS_BIAS=weights.bias is not None,
        num_warps=warps,
        num_stages=stages,
        **dependent_launch(x),
    )
    return out


# How ``_awq_rows_kernel`` makes its weights for each input type: 16-bit inputs meet weights of their own
# type; float32 inputs meet bfloat16 differences (exact) in float32, without TF32's rounding.
_INPUT_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _dequantised_product(x: torch.Tensor, weights: AwqWeights) -> torch.Tensor:
    k, n = weights.in_features, weights.out_features
    matrix = torch.empty(k, n, dtype=x.dtype, device=x.device)
    block_n = 128
    _awq_dequantise_kernel[(k // weights.group_size, triton.cdiv(n, block_n))](
        weights.qweight,
        weights.qzeros,
        weights.scales,
        matrix,
        n,
        NIBBLE,
        GROUP=weights.group_size,
        BLOCK_N=block_n,
        num_warps=TUNING.dequantise_warps,
        **dependent_launch(x),
    )
    if weights.bias is None:
        return x @ matrix
    # The bias added before the product's rounding, as ``F.linear`` adds it on the bf16 path (a separate
    # add rounded twice and was its own 11 µs kernel a layer of a 2,048-token prefill on an H100; the
    # prefill's time did not move beyond noise).
    return torch.addmm(weights.bias, x, matrix)


def _tile_rows(words: int, group_size: int, halves: bool) -> int:
    """Rows of a one-row program's accumulator tile. In float16 pairs, the rows one load instruction of
    the program's warps covers (16-byte loads): the group's rows then fold onto the tile within each
    thread, with no data moved between threads. At least an eighth of the group, so that a thread sums
    at most eight float16 products (``HALF_INPUT_SCALE``)."""
    if halves:
        return min(group_size, max(group_size // 8, 32 * TUNING.gemv_warps * 4 // words))
    return min(TUNING.gemv_block_k, group_size)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


if triton is not None:
    HALF_VALUES_ASM = tl.constexpr(_HALF_VALUES_ASM)
    SHARES_UNROLLED_UP_TO = tl.constexpr(UNROLLED_SHARES)
    HALF_NEGATIVE_VALUES_ASM = tl.constexpr(_HALF_NEGATIVE_VALUES_ASM)
    BF16_VALUES_ASM = tl.constexpr(_BF16_VALUES_ASM)
    BF16_NEGATIVE_VALUES_ASM = tl.constexpr(_BF16_NEGATIVE_VALUES_ASM)
    HALF_DIFFERENCE_ASM = tl.constexpr(_HALF_DIFFERENCE_ASM)
    BF16_DIFFERENCE_ASM = tl.constexpr(_BF16_DIFFERENCE_ASM)
    HALF_PRODUCT_ASM = tl.constexpr(_HALF_PRODUCT_ASM)

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
    def _group_terms(
        qzeros_ptr,
        scales_ptr,
        group,
        N,
        words,
        word_mask,
        cols,
        col_mask,
        NIBBLE,
        BLOCK_N: tl.constexpr,
    ):
        """One input group's zero points in the same ``2^23 + z * 2^f`` form and its scales divided by
        ``2^f``, as [1, BLOCK_N]: ``(value - zero) * scale`` is then exactly ``(q - z) * s``."""
        packed_zeros = tl.load(
            qzeros_ptr + group * (N // 8) + words[None, :], mask=word_mask[None, :], other=0
        )
        zeros, field = _mantissa_values(_spread(packed_zeros), NIBBLE, BLOCK_N)
        scales = tl.load(
            scales_ptr + group * N + cols[None, :], mask=col_mask[None, :], other=0.0
        ).to(tl.float32)
        return zeros, scales * tl.exp2(-field.to(tl.float32))[None, :]

    @triton.jit
    def _gemv_one_group(
        acc,
        x_at,
        norm_at,
        inverse_rms,
        weights_at,
        zeros_at,
        scales_at,
        word_mask,
        col_mask,
        NIBBLE,
        HALVES: tl.constexpr,
        HALF_SCALE: tl.constexpr,
        GATE_OFFSET: tl.constexpr,
        NORMED: tl.constexpr,
        ROW_WORDS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """``acc`` plus one input group's products, [BLOCK_K, BLOCK_N]. ``x_at`` and ``norm_at`` (scalars),
        ``weights_at`` and ``zeros_at`` [1, WORDS] and ``scales_at`` [1, BLOCK_N] point at the group's first
        row; rows add constants to them, which the loads take as immediate offsets."""
        if HALVES:
            packed, packed_zeros, scales = _group_loads(
                weights_at, zeros_at, scales_at, word_mask, col_mask, ROW_WORDS, GROUP
            )
            return _gemv_group_in_halves(
                acc,
                x_at,
                norm_at,
                inverse_rms,
                packed,
                packed_zeros,
                scales,
                HALF_SCALE,
                GATE_OFFSET,
                NORMED,
                GROUP,
                BLOCK_K,
                BLOCK_N,
            )
        return _gemv_group(
            acc,
            x_at,
            norm_at,
            inverse_rms,
            weights_at,
            zeros_at,
            scales_at,
            word_mask,
            col_mask,
            NIBBLE,
            GATE_OFFSET,
            NORMED,
            ROW_WORDS,
            GROUP,
            BLOCK_K,
            BLOCK_N,
        )

    @triton.jit
    def _gemv_group(
        acc,
        x_at,
        norm_at,
        inverse_rms,
        weights_at,
        zeros_at,
        scales_at,
        word_mask,
        col_mask,
        NIBBLE,
        GATE_OFFSET: tl.constexpr,
        NORMED: tl.constexpr,
        ROW_WORDS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One weight an instruction in float32: unscaled over the group's BLOCK_K-row steps, then scaled
        once (``_mantissa_values`` makes the zero points and scales agree with the values' form)."""
        zeros, field = _mantissa_values(
            _spread(tl.load(zeros_at, mask=word_mask, other=0)), NIBBLE, BLOCK_N
        )
        scales = (
            tl.load(scales_at, mask=col_mask, other=0.0).to(tl.float32)
            * tl.exp2(-field.to(tl.float32))[None, :]
        )
        part = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        rows = tl.arange(0, BLOCK_K)
        weight_rows = weights_at + (rows * ROW_WORDS)[:, None]
        for step in tl.static_range(GROUP // BLOCK_K):
            x = _inputs(x_at, norm_at, inverse_rms, rows + step * BLOCK_K, GATE_OFFSET, NORMED)
            packed = tl.load(weight_rows + step * BLOCK_K * ROW_WORDS, mask=word_mask, other=0)
            values, _ = _mantissa_values(_spread(packed), NIBBLE, BLOCK_N)
            part += x[:, None] * (values - zeros)
        return acc + part * scales

    @triton.jit
    def _group_loads(
        weights_at,
        zeros_at,
        scales_at,
        word_mask,
        col_mask,
        ROW_WORDS: tl.constexpr,
        GROUP: tl.constexpr,
    ):
        """A one-row program's packed weights [GROUP, WORDS], packed zero points [1, WORDS] and scales
        [1, BLOCK_N] of the input group at the pointers. The whole group is one load, so every load is
        issued before the first product: read in row steps, the compiler spread the loads between the
        arithmetic and few bytes were in flight."""
        rows = tl.arange(0, GROUP)
        packed = tl.load(weights_at + (rows * ROW_WORDS)[:, None], mask=word_mask, other=0)
        packed_zeros = tl.load(zeros_at, mask=word_mask, other=0)
        scales = tl.load(scales_at, mask=col_mask, other=0.0)
        return packed, packed_zeros, scales

    @triton.jit
    def _gemv_group_in_halves(
        acc,
        x_at,
        norm_at,
        inverse_rms,
        packed,
        packed_zeros,
        scales,
        HALF_SCALE: tl.constexpr,
        GATE_OFFSET: tl.constexpr,
        NORMED: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EARLY: tl.constexpr = False,
    ):
        """Two weights an instruction: ``(1024 + q) - (1024 + z)`` is exact in float16, and its product
        with the scaled input is one rounding. ``_group_loads`` gives the group's weights. Rows r,
        r + BLOCK_K, r + 2 * BLOCK_K, ... lie in one thread: their products (at most eight) are summed in
        float16 there, then taken to float32 and scaled. EARLY: the weights were loaded long before the
        inputs (``_once_arrived``)."""
        rows = tl.arange(0, GROUP)
        x = _inputs(x_at, norm_at, inverse_rms, rows, GATE_OFFSET, NORMED)
        zeros = _half_values(_spread(packed_zeros))
        scales = scales.to(tl.float32) * (1.0 / HALF_SCALE)
        if EARLY:
            packed = _once_arrived(packed, x)
        values = _half_values(_spread(packed))
        products = tl.inline_asm_elementwise(
            HALF_PRODUCT_ASM,
            "=r,r,r,r",
            [
                values,
                tl.broadcast_to(zeros, values.shape),
                tl.broadcast_to(_to_half(x * HALF_SCALE)[:, None], values.shape),
            ],
            dtype=tl.float16,
            is_pure=True,
            pack=2,
        )
        products = tl.reshape(products, (GROUP // BLOCK_K, BLOCK_K, BLOCK_N))
        return acc + tl.sum(products, axis=0).to(tl.float32) * scales

    @triton.jit
    def _once_arrived(packed, x):
        """``packed`` [R, W], unchanged, but only once the row inputs ``x`` [R] are there: OR-ed with
        ``x * 0 + 0`` (zero bits for a finite x), which the compiler cannot fold. Weights loaded before
        waiting for the kernel before this one were otherwise all turned into values while the inputs
        were on their way, every value held in a register (168 a thread, against 69). An infinite or NaN
        input spoils its row's weights, whose products it makes NaN anyway."""
        zero = tl.inline_asm_elementwise(
            "fma.rn.f32 $0, $1, 0f00000000, 0f00000000;",
            "=r,r",
            [x],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
        return packed | zero[:, None]

    @triton.jit
    def _inputs(
        x_at, norm_at, inverse_rms, offsets, GATE_OFFSET: tl.constexpr, NORMED: tl.constexpr
    ):
        """The product's inputs at ``offsets`` from ``x_at``, in float32: x itself; SiLU(gate) * up of a
        gate/up output whose up half starts ``GATE_OFFSET`` after its gate half; or (NORMED) x times
        ``inverse_rms`` times the norm's weights at ``norm_at``. Each is rounded to the input's dtype where
        ``kernels.silu_and_mul`` and ``kernels.add_rms_norm`` round."""
        dtype = x_at.dtype.element_ty
        if GATE_OFFSET:
            gate = tl.load(x_at + offsets).to(tl.float32)
            up = tl.load(x_at + GATE_OFFSET + offsets).to(tl.float32)
            activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            return (activated * up).to(dtype).to(tl.float32)
        x = tl.load(x_at + offsets).to(tl.float32)
        if NORMED:
            x = rms_normed(x, inverse_rms, tl.load(norm_at + offsets).to(tl.float32), dtype).to(
                tl.float32
            )
        return x

    @triton.jit
    def _inverse_rms(x_ptr, eps, INPUTS: tl.constexpr, INPUTS_PAD: tl.constexpr):
        """1 / RMS of the INPUTS values at ``x_ptr`` (``kernels.inverse_rms_of``)."""
        offsets = tl.arange(0, INPUTS_PAD)
        return inverse_rms_of(
            tl.load(x_ptr + offsets, mask=offsets < INPUTS, other=0.0).to(tl.float32), INPUTS, eps
        )

    @triton.jit
    def _to_half(x):
        """float32 → float16, rounded to nearest. Written out so that the compiler cannot move the scaling
        before it into float16, where a large input would overflow first."""
        return tl.inline_asm_elementwise(
            "cvt.rn.f16.f32 $0, $1;", "=h,r", [x], dtype=tl.float16, is_pure=True, pack=1
        )

    @triton.jit
    def _half_values(spread):
        """Spread words [R, C] (``_spread``) → float16 ``1024 + q`` per column."""
        return tl.inline_asm_elementwise(
            HALF_VALUES_ASM,
            "=r,=r,=r,=r,r,r,r,r,r,r,r,r",
            [spread],
            dtype=tl.float16,
            is_pure=True,
            pack=8,
        )

    @triton.jit
    def _prefetch_share(
        qweight_ptr,
        qzeros_ptr,
        scales_ptr,
        first,
        N,
        pid_n,
        GROUP: tl.constexpr,
        GROUPS: tl.constexpr,
        ROWS_PAD: tl.constexpr,
        WORDS: tl.constexpr,
    ):
        """Asks for a one-row program's packed weights, zero points and scales (GROUPS input groups from
        ``first``) to be brought into the L2 cache: one request per input row (the program's part of a
        row is at most one 128-byte line), and no registers held for them."""
        rows = first * GROUP + tl.minimum(tl.arange(0, ROWS_PAD), GROUPS * GROUP - 1)
        _prefetch_l2(qweight_ptr + rows * (N // 8) + pid_n * WORDS)
        groups = first + tl.minimum(tl.arange(0, 16), GROUPS - 1)
        _prefetch_l2(qzeros_ptr + groups * (N // 8) + pid_n * WORDS)
        _prefetch_l2(scales_ptr + groups * N + pid_n * WORDS * 8)

    @triton.jit
    def _prefetch_l2(pointers):
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; // $0 unused",
            "=r,l",
            [pointers.to(tl.int64)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _awq_gemv_kernel(
        x_ptr,
        qweight_ptr,
        qzeros_ptr,
        scales_ptr,
        bias_ptr,
        out_ptr,
        partial_ptr,
        counters_ptr,
        norm_ptr,
        eps,
        N: tl.constexpr,
        NIBBLE,
        GROUP: tl.constexpr,
        BLOCK_K: tl.constexpr,
        WORDS: tl.constexpr,
        GROUPS_PER_SPLIT: tl.constexpr,
        SPLIT_K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        UNROLLED: tl.constexpr,
        HALVES: tl.constexpr,
        HALF_SCALE: tl.constexpr,
        GATE_OFFSET: tl.constexpr,
        NORMED: tl.constexpr,
        INPUTS_PAD: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        EARLY: tl.constexpr,
        PREFETCH: tl.constexpr,
        PREFETCH_ROWS: tl.constexpr,
        DEPENDENT: tl.constexpr,
    ):
        """One row, without tensor cores: program (n, k) computes 8 * WORDS outputs over its share of the
        input groups. Products accumulate elementwise over a [BLOCK_K, 8 * WORDS] tile (each thread its
        own), unscaled within a group and scaled once per group, and are summed over the inputs once at
        the end. HALVES: in float16 pairs (``_gemv_group_in_halves``); else in float32, one logic
        operation, a subtraction and a multiply-add per weight (``_gemv_group``). NORMED: the inputs are
        RMSNorm of x with the weights at ``norm_ptr``; every program reads the whole row for its inverse
        RMS. ACCUMULATE: the outputs are added to what ``out_ptr`` holds."""
        BLOCK_N: tl.constexpr = WORDS * 8
        ROW_WORDS: tl.constexpr = N // 8
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        words = pid_n * WORDS + tl.arange(0, WORDS)
        word_mask = (words < ROW_WORDS)[None, :]
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        first = pid_k * GROUPS_PER_SPLIT
        # Pointers at the share's first group; a group (and a step within it) adds a constant.
        x_at = x_ptr + first * GROUP
        norm_at = norm_ptr + first * GROUP
        weights_at = qweight_ptr + first * GROUP * ROW_WORDS + words[None, :]
        zeros_at = qzeros_ptr + first * ROW_WORDS + words[None, :]
        scales_at = scales_ptr + first * N + cols[None, :]
        # The weights need nothing from the kernel before this one: EARLY, a share of one group is loaded
        # into registers before waiting for it; otherwise asked into the L2 cache.
        if EARLY:
            packed, packed_zeros, scales = _group_loads(
                weights_at, zeros_at, scales_at, word_mask, col_mask[None, :], ROW_WORDS, GROUP
            )
        elif DEPENDENT and PREFETCH:
            _prefetch_share(
                qweight_ptr,
                qzeros_ptr,
                scales_ptr,
                first,
                N,
                pid_n,
                GROUP,
                GROUPS_PER_SPLIT,
                PREFETCH_ROWS,
                WORDS,
            )
        after_previous_kernel(DEPENDENT)
        if NORMED:
            inverse_rms = _inverse_rms(x_ptr, eps, GROUPS_PER_SPLIT * SPLIT_K * GROUP, INPUTS_PAD)
        else:
            inverse_rms = 1.0
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        if EARLY:
            acc = _gemv_group_in_halves(
                acc,
                x_at,
                norm_at,
                inverse_rms,
                packed,
                packed_zeros,
                scales,
                HALF_SCALE,
                GATE_OFFSET,
                NORMED,
                GROUP,
                BLOCK_K,
                BLOCK_N,
                EARLY=True,
            )
        elif UNROLLED:  # every load of the program's share in flight at once
            for index in tl.static_range(GROUPS_PER_SPLIT):
                acc = _gemv_one_group(
                    acc,
                    x_at + index * GROUP,
                    norm_at + index * GROUP,
                    inverse_rms,
                    weights_at + index * GROUP * ROW_WORDS,
                    zeros_at + index * ROW_WORDS,
                    scales_at + index * N,
                    word_mask,
                    col_mask[None, :],
                    NIBBLE,
                    HALVES,
                    HALF_SCALE,
                    GATE_OFFSET,
                    NORMED,
                    ROW_WORDS,
                    GROUP,
                    BLOCK_K,
                    BLOCK_N,
                )
        else:  # software-pipelined over the groups
            for index in range(GROUPS_PER_SPLIT):
                acc = _gemv_one_group(
                    acc,
                    x_at + index * GROUP,
                    norm_at + index * GROUP,
                    inverse_rms,
                    weights_at + index * GROUP * ROW_WORDS,
                    zeros_at + index * ROW_WORDS,
                    scales_at + index * N,
                    word_mask,
                    col_mask[None, :],
                    NIBBLE,
                    HALVES,
                    HALF_SCALE,
                    GATE_OFFSET,
                    NORMED,
                    ROW_WORDS,
                    GROUP,
                    BLOCK_K,
                    BLOCK_N,
                )
        _finish(
            tl.sum(acc, axis=0),
            out_ptr + cols,
            partial_ptr + cols,
            N,
            col_mask,
            bias_ptr + cols,
            col_mask,
            counters_ptr + pid_n,
            pid_k,
            SPLIT_K,
            HAS_BIAS,
            ACCUMULATE,
        )

    @triton.jit
    def _awq_rows_kernel(
        x_ptr,
        qweight_ptr,
        qzeros_ptr,
        scales_ptr,
        bias_ptr,
        out_ptr,
        partial_ptr,
        counters_ptr,
        M,
        stride_xm,
        stride_om,
        N: tl.constexpr,
        GROUP: tl.constexpr,
        GROUPS_PER_SPLIT: tl.constexpr,
        SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        INPUT: tl.constexpr,
        SWAPPED: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DEPENDENT: tl.constexpr,
    ):
        """On tensor cores: program (m, n, k) computes a [BLOCK_M, BLOCK_N] tile of the output over its share
        of the input groups. Per group, the packed weights become the exact differences ``q - z`` in the
        input's 16-bit type, under one and a half instructions a weight (``_differences``); one tensor-core
        product takes them and the inputs to float32, and the group's scales multiply its columns. SWAPPED:
        the tile is computed transposed, the outputs along the tensor cores' long side (at least 64), the
        few rows along the short one."""
        after_previous_kernel(DEPENDENT)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        WORDS: tl.constexpr = BLOCK_N // 8
        ROW_WORDS: tl.constexpr = N // 8
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        words = pid_n * WORDS + tl.arange(0, WORDS)
        word_mask = words < ROW_WORDS
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        inputs = tl.arange(0, GROUP)
        first = pid_k * GROUPS_PER_SPLIT
        # Pointers at the share's first group; each group adds a constant. Transposed, the inputs are
        # still read along their rows (as [GROUP, BLOCK_M] with the inputs contiguous), not transposed
        # after loading, which the compiler would turn into one 2-byte load per input.
        if SWAPPED:
            x_at = x_ptr + rows[None, :] * stride_xm + (first * GROUP + inputs)[:, None]
            x_mask = row_mask[None, :]
        else:
            x_at = x_ptr + rows[:, None] * stride_xm + (first * GROUP + inputs)[None, :]
            x_mask = row_mask[:, None]
        weights_at = qweight_ptr + (first * GROUP + inputs)[:, None] * ROW_WORDS + words[None, :]
        zeros_at = qzeros_ptr + first * ROW_WORDS + words[None, :]
        scales_at = scales_ptr + first * N + cols
        if SWAPPED:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for index in range(GROUPS_PER_SPLIT):
            x = tl.load(x_at + index * GROUP, mask=x_mask, other=0.0)
            packed = tl.load(
                weights_at + index * GROUP * ROW_WORDS, mask=word_mask[None, :], other=0
            )
            zeros = tl.load(zeros_at + index * ROW_WORDS, mask=word_mask[None, :], other=0)
            scales = tl.load(scales_at + index * N, mask=col_mask, other=0.0).to(tl.float32)
            # The exact differences in the input's 16-bit type (bfloat16 for float32 inputs).
            if INPUT == 1:
                differences = _differences(
                    packed, zeros, HALF_VALUES_ASM, HALF_NEGATIVE_VALUES_ASM, HALF_DIFFERENCE_ASM
                ).to(tl.float16, bitcast=True)
            else:
                differences = _differences(
                    packed, zeros, BF16_VALUES_ASM, BF16_NEGATIVE_VALUES_ASM, BF16_DIFFERENCE_ASM
                ).to(tl.bfloat16, bitcast=True)
            if SWAPPED:
                acc += _exact_dot(tl.trans(differences), x, INPUT) * scales[:, None]
            else:
                acc += _exact_dot(x, differences, INPUT) * scales[None, :]
        if SWAPPED:
            acc = tl.trans(acc)
        _finish(
            acc,
            out_ptr + rows[:, None] * stride_om + cols[None, :],
            partial_ptr + rows[:, None] * N + cols[None, :],
            M * N,
            row_mask[:, None] & col_mask[None, :],
            bias_ptr + cols[None, :],
            col_mask[None, :],
            counters_ptr + pid_m * tl.num_programs(1) + pid_n,
            pid_k,
            SPLIT_K,
            HAS_BIAS,
            False,
        )

    @triton.jit
    def _differences(
        packed,
        zeros,
        VALUES_ASM: tl.constexpr,
        NEGATIVE_VALUES_ASM: tl.constexpr,
        DIFFERENCE_ASM: tl.constexpr,
    ):
        """Packed weights [R, W] and their group's packed zero points [1, W] → ``q - z`` [R, 8W], exact, as
        16-bit patterns (int16) of the type whose magic numbers and addition the three strings use (the
        caller reinterprets them: the compiler takes no 16-bit float type for the strings' outputs but a
        literal one)."""
        values = tl.inline_asm_elementwise(
            VALUES_ASM,
            "=r,=r,=r,=r,r,r,r,r,r,r,r,r",
            [_spread(packed)],
            dtype=tl.int16,
            is_pure=True,
            pack=8,
        )
        negative_zeros = tl.inline_asm_elementwise(
            NEGATIVE_VALUES_ASM,
            "=r,=r,=r,=r,r,r,r,r,r,r,r,r",
            [_spread(zeros)],
            dtype=tl.int16,
            is_pure=True,
            pack=8,
        )
        return tl.inline_asm_elementwise(
            DIFFERENCE_ASM,
            "=r,r,r",
            [values, tl.broadcast_to(negative_zeros, values.shape)],
            dtype=tl.int16,
            is_pure=True,
            pack=2,
        )

    @triton.jit
    def _exact_dot(a, b, INPUT: tl.constexpr):
        """a @ b in float32; float32 inputs (INPUT 2) take the weights' bfloat16 differences in float32 and
        are not rounded to TF32."""
        if INPUT == 2:
            product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            product = tl.dot(a, b)
        return product

    @triton.jit
    def _finish(
        total,
        out_ptrs,
        share_ptrs,
        share_stride,
        mask,
        bias_ptrs,
        bias_mask,
        counter_ptr,
        pid_k,
        SPLIT_K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACCUMULATE: tl.constexpr,
    ):
        """Writes a program's float32 ``total`` (plus the bias; ACCUMULATE: plus what ``out_ptrs`` holds, see
        ``_store_biased``) to ``out_ptrs``. Under split-K it is one
        share of the strip: stored at ``share_ptrs + pid_k * share_stride``, and the last of the strip's
        programs to arrive at ``counter_ptr`` adds the shares up in split order (the same bits whichever
        program finishes first), writes the sum and resets the counter for the next product."""
        if SPLIT_K > 1:
            tl.store(share_ptrs + pid_k * share_stride, total, mask=mask)
            tl.debug_barrier()  # every thread's share is written before the arrival is counted
            arrived = tl.atomic_add(counter_ptr, 1)  # acq_rel: shares before it are visible after
            if arrived == SPLIT_K - 1:
                summed = tl.zeros_like(total)
                if SPLIT_K <= SHARES_UNROLLED_UP_TO:  # every share's load in flight at once
                    for split in tl.static_range(SPLIT_K):
                        summed += _share(share_ptrs, split, share_stride, mask)
                else:
                    for split in range(SPLIT_K):
                        summed += _share(share_ptrs, split, share_stride, mask)
                _store_biased(summed, out_ptrs, mask, bias_ptrs, bias_mask, HAS_BIAS, ACCUMULATE)
                tl.atomic_xchg(counter_ptr, 0)  # ready for the next product (graph replays)
        else:
            _store_biased(total, out_ptrs, mask, bias_ptrs, bias_mask, HAS_BIAS, ACCUMULATE)

    @triton.jit
    def _share(share_ptrs, split, share_stride, mask):
        """One program's share of a split strip, read past L1 (another program wrote it)."""
        return tl.load(
            share_ptrs + split * share_stride, mask=mask, other=0.0, cache_modifier=".cg"
        )

    @triton.jit
    def _store_biased(
        total,
        out_ptrs,
        mask,
        bias_ptrs,
        bias_mask,
        HAS_BIAS: tl.constexpr,
        ACCUMULATE: tl.constexpr,
    ):
        """ACCUMULATE: the output (rounded to its dtype) is added to what ``out_ptrs`` holds and the sum
        rounded again, as torch's product followed by its in-place add would round."""
        dtype = out_ptrs.dtype.element_ty
        if HAS_BIAS:
            total += tl.load(bias_ptrs, mask=bias_mask, other=0.0).to(tl.float32)
        if ACCUMULATE:
            total = total.to(dtype).to(tl.float32) + tl.load(out_ptrs, mask=mask, other=0.0).to(
                tl.float32
            )
        tl.store(out_ptrs, total.to(dtype), mask=mask)

    @triton.jit
    def _dequantised_group(
        qweight_ptr,
        qzeros_ptr,
        scales_ptr,
        group,
        N,
        pid_n,
        NIBBLE,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Input group ``group``'s weights of output block ``pid_n``, dequantised: float32 [GROUP, BLOCK_N]."""
        k = group * GROUP + tl.arange(0, GROUP)
        words = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        word_mask = words < N // 8
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        packed = tl.load(
            qweight_ptr + k[:, None] * (N // 8) + words[None, :], mask=word_mask[None, :], other=0
        )
        values, _ = _mantissa_values(_spread(packed), NIBBLE, BLOCK_N)
        zeros, scales = _group_terms(
            qzeros_ptr, scales_ptr, group, N, words, word_mask, cols, cols < N, NIBBLE, BLOCK_N
        )
        return (values - zeros) * scales

    @triton.jit
    def _awq_dequantise_kernel(
        qweight_ptr,
        qzeros_ptr,
        scales_ptr,
        out_ptr,
        N,
        NIBBLE,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DEPENDENT: tl.constexpr,
    ):
        after_previous_kernel(DEPENDENT)
        group = tl.program_id(0)
        pid_n = tl.program_id(1)
        k = group * GROUP + tl.arange(0, GROUP)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        weights = _dequantised_group(
            qweight_ptr, qzeros_ptr, scales_ptr, group, N, pid_n, NIBBLE, GROUP, BLOCK_N
        )
        tl.store(
            out_ptr + k[:, None] * N + cols[None, :],
            weights.to(out_ptr.dtype.element_ty),
            mask=(cols < N)[None, :],
        )
