"""Log probabilities of the chosen tokens (and their top alternatives) for the rows that ask.

Computed for all such rows of a step at once on the logits' device, from the model's own
distribution (before temperature and filtering, as vLLM reports them by default), and read back in
one transfer with the step's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ragllm.engines.inprocess.sequence import Sequence, TokenScores


@dataclass
class StepScores:
    """Device tensors for the rows that asked: chosen log probabilities [rows], top-k values and ids."""

    rows: list[int]
    chosen: torch.Tensor
    top_values: torch.Tensor | None
    top_ids: torch.Tensor | None


def scores_on_device(
    batch: list[Sequence], tokens: torch.Tensor | list, logits: torch.Tensor
) -> StepScores | None:
    """None when no row asks for logprobs (the common case costs nothing)."""
    rows = [row for row, sequence in enumerate(batch) if sequence.params.logprobs is not None]
    if isinstance(tokens, list):  # chosen row by row: a failed row holds its exception, not a token
        rows = [row for row in rows if not isinstance(tokens[row], BaseException)]
    if not rows:
        return None
    index = torch.tensor(rows, device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    if isinstance(tokens, torch.Tensor):
        chosen_ids = tokens.index_select(0, index)
    else:
        chosen_ids = torch.tensor([tokens[row] for row in rows], device=logits.device)
    chosen = logprobs.gather(1, chosen_ids[:, None].long())[:, 0]
    k = max(batch[row].params.logprobs for row in rows)
    if k == 0:
        return StepScores(rows, chosen, None, None)
    top = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return StepScores(rows, chosen, top.values, top.indices)


def scores_on_host(batch: list[Sequence], scores: StepScores | None) -> list[TokenScores | None]:
    """Per row: (chosen log probability, [(token id, log probability), ...]) or None."""
    per_row: list[TokenScores | None] = [None] * len(batch)
    if scores is None:
        return per_row
    chosen = scores.chosen.tolist()
    values = (
        scores.top_values.tolist() if scores.top_values is not None else [[] for _ in scores.rows]
    )
    ids = scores.top_ids.tolist() if scores.top_ids is not None else [[] for _ in scores.rows]
    for position, row in enumerate(scores.rows):
        wanted = batch[row].params.logprobs
        per_row[row] = (
            chosen[position],
            list(zip(ids[position][:wanted], values[position][:wanted])),
        )
    return per_row
