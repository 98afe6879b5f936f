"""Disallowed tokens to -inf, from the packed bitmask, in one pass where the logits live.

On a GPU the unpacking and the fill are one Triton kernel: one launch a step instead of the five or
so that unpacking with tensor operations takes, each of which costs the host its launch while the
host is what a constrained batch waits for. Elsewhere the same result comes from tensor operations.
"""

from __future__ import annotations

import torch

from ragllm.engines.inprocess.layers.kernels import triton, use_triton

if triton is not None:
    import triton.language as tl

BITS = 32
BLOCK = 4096  # tokens per program


def unpacked(bitmask: torch.Tensor) -> torch.Tensor:
    """[rows, words] int32 → [rows, words * 32] bool, bit i of word w is token 32 w + i."""
    shifts = torch.arange(BITS, dtype=torch.int32, device=bitmask.device)
    return ((bitmask[:, :, None] >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)


def masked_logits(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of ``logits`` [rows, vocab] with every token whose bit is clear in ``bitmask``
    [rows, words] (int32, on the logits' device) at -inf."""
    rows, vocab = logits.shape
    if not use_triton(logits):
        return logits.masked_fill(~unpacked(bitmask)[:, :vocab], float("-inf"))
    out = torch.empty_like(logits)
    _masked_logits_kernel[(rows, triton.cdiv(vocab, BLOCK))](
        logits, bitmask, out, vocab, logits.stride(0), bitmask.stride(0), out.stride(0), BLOCK=BLOCK
    )
    return out


if triton is not None:

    @triton.jit
    def _masked_logits_kernel(
        logits_ptr,
        bitmask_ptr,
        out_ptr,
        vocab,
        logits_stride,
        bitmask_stride,
        out_stride,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = tokens < vocab
        words = tl.load(bitmask_ptr + row * bitmask_stride + tokens // 32, mask=inside, other=0)
        allowed = ((words >> (tokens % 32)) & 1) != 0
        logits = tl.load(logits_ptr + row * logits_stride + tokens, mask=inside)
        tl.store(
            out_ptr + row * out_stride + tokens,
            tl.where(allowed, logits, float("-inf")),
            mask=inside,
        )
