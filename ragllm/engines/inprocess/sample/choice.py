"""Next-token selection for a batch of sequences, each with its own sampling parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ragllm.generation import SamplingParams


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[list[int]],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of ``logits`` [batch, vocab].

    Rows ``sample_on_device`` can choose are chosen there together (one set of kernels, no sync per
    row: what a GPU needs); the rest (seeded or penalised) row by row, each with its own generator.
    """
    on_host = [
        row
        for row, (p, generator) in enumerate(zip(params, generators))
        if not _choosable_on_device(p, generator)
    ]
    tokens = sample_on_device(logits, params, skip=on_host).tolist()
    for row in on_host:
        row_params = params[row]
        row_logits = logits[row].float()
        if row_params.repetition_penalty != 1.0:
            row_logits = apply_repetition_penalty(
                row_logits, histories[row], row_params.repetition_penalty
            )
        if row_params.greedy:
            tokens[row] = int(row_logits.argmax())
            continue
        probs = filtered_probabilities(row_logits, row_params)
        tokens[row] = int(torch.multinomial(probs, 1, generator=generators[row]))
    return tokens


def sample_row_by_row(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[list[int]],
    generators: Sequence[torch.Generator | None],
) -> list[int | Exception]:
    """Each row's token chosen alone (after a batched choice failed), so that a fault ends only the
    row it belongs to: its place holds the exception instead of a token."""
    tokens: list[int | Exception] = []
    for row, (row_params, history, generator) in enumerate(zip(params, histories, generators)):
        try:
            tokens += sample_next_tokens(
                logits[row : row + 1], [row_params], [history], [generator]
            )
        except Exception as exc:
            tokens.append(exc)
    return tokens


def _choosable_on_device(params: SamplingParams, generator: torch.Generator | None) -> bool:
    # A repetition penalty needs the history, a per-request seed the row's own generator.
    return params.repetition_penalty == 1.0 and (params.greedy or generator is None)


def samplable_on_device(
    params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> bool:
    """Every row can be chosen without the host."""
    return all(_choosable_on_device(p, generator) for p, generator in zip(params, generators))


def sample_on_device(
    logits: torch.Tensor, params: Sequence[SamplingParams], skip: Sequence[int] = ()
) -> torch.Tensor:
    """Next tokens [batch] on the logits' device, without a sync: greedy rows by argmax, the others
    drawn together after temperature, top-k, top-p and min-p. Rows in ``skip`` are left to the caller."""
    chosen = logits.argmax(dim=-1)
    skipped = set(skip)
    sampled = [row for row, p in enumerate(params) if not p.greedy and row not in skipped]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        probs = filtered_probabilities_batched(
            logits[rows].float(), [params[row] for row in sampled]
        )
        chosen[rows] = torch.multinomial(probs, 1)[:, 0]
    return chosen


def filtered_probabilities_batched(
    logits: torch.Tensor, params: Sequence[SamplingParams]
) -> torch.Tensor:
    """``filtered_probabilities`` for every row at once, each row with its own parameters."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    logits = logits / temperature[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(top_k) < vocab:
        kth = torch.topk(logits, max(top_k)).values.gather(
            1, torch.tensor(top_k, device=device)[:, None] - 1
        )
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    top_p = [p.top_p for p in params]
    if min(top_p) < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= torch.tensor(
            top_p, device=device
        )[:, None]
        outside[:, 0] = (
            False  # the most likely token always stays (a tiny top_p rounds to 0 in float32)
        )
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs.masked_fill(outside, 0.0))
    min_p = [p.min_p for p in params]
    if max(min_p) > 0.0:
        floor = torch.tensor(min_p, device=device)[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def apply_repetition_penalty(
    logits: torch.Tensor, history: list[int], penalty: float
) -> torch.Tensor:
    """CTRL-style penalty (as in transformers and vLLM): seen tokens' logits move towards zero-probability."""
    if not history:
        return logits
    seen = torch.tensor(sorted(set(history)), device=logits.device)
    scores = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def filtered_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
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
    outside[0] = False  # the most likely token always stays (a tiny top_p rounds to 0 in float32)
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(0, order, sorted_probs)
