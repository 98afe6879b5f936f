"""Next-token selection for a batch of sequences, each with its own sampling parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ragllm.engines.base import SamplingParams


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence["SamplingParams"],
    histories: Sequence[list[int]],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of ``logits`` [batch, vocab].

    Greedy rows without a repetition penalty take the batched argmax fast path; the rest are
    filtered and sampled row by row (each row may carry its own seeded generator).
    """
    greedy_tokens = logits.argmax(dim=-1).tolist()
    tokens = list(greedy_tokens)
    for row, row_params in enumerate(params):
        if row_params.greedy and row_params.repetition_penalty == 1.0:
            continue
        row_logits = logits[row].float()
        if row_params.repetition_penalty != 1.0:
            row_logits = apply_repetition_penalty(row_logits, histories[row], row_params.repetition_penalty)
        if row_params.greedy:
            tokens[row] = int(row_logits.argmax())
            continue
        probs = filtered_probabilities(row_logits, row_params)
        tokens[row] = int(torch.multinomial(probs, 1, generator=generators[row]))
    return tokens


def apply_repetition_penalty(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as in transformers and vLLM): seen tokens' logits move towards zero-probability."""
    if not history:
        return logits
    seen = torch.tensor(sorted(set(history)), device=logits.device)
    scores = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def filtered_probabilities(logits: torch.Tensor, params: "SamplingParams") -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering; returns a probability vector."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth_value = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_value, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p_filter(probs, params.top_p)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = torch.sort(probs, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the token crossing the line is kept).
    outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(0, order, sorted_probs)
