"""From a step's logits to each row's token: grammar masks, the choice under each row's sampling
parameters, and the log probabilities asked for, with faults kept to their own row.

A fault that belongs to one row (its grammar, its sampling parameters, its scores) ends that row alone
with an error in place of its token; the rest of the batch is chosen again row by row and goes on
exactly as it would have (seeded rows from their generator's state before the failed attempt).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ragllm.engines.inprocess.sample.choice import (
    samplable_on_device,
    sample_next_tokens,
    sample_on_device,
    sample_row_by_row,
)
from ragllm.engines.inprocess.sample.logprobs import scores_on_device, scores_on_host
from ragllm.engines.inprocess.sample.masks import TokenMasks
from ragllm.engines.inprocess.sequence import Sequence

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class Sampler:
    """Chooses among the first ``choosable`` columns of the logits (None: all of them): the ids the
    tokenizer can write. Models pad their vocabulary past it (Qwen2.5: 151,936 columns for 151,665
    ids); a padded id is no text and no token a grammar knows, so it is never a choice. Grammar masks
    are bounded per row by ``mask_budget_s`` and ``mask_step_share`` (``mask_watch``)."""

    def __init__(
        self,
        choosable: int | None = None,
        mask_budget_s: float | None = None,
        mask_step_share: float | None = None,
    ) -> None:
        self.choosable = choosable
        self._mask_budget_s = mask_budget_s
        self._mask_step_share = mask_step_share
        self.masks: TokenMasks | None = None  # made when a structured-output request first runs

    def sample(self, batch: list[Sequence], logits: torch.Tensor) -> tuple[list, list | None]:
        """Each row's token (or the error that ends it alone) and its scores, chosen on the host's
        terms (any sampling parameters)."""
        logits = self.choosable_columns(logits)
        masked, failures = self.constrain(batch, logits)
        tokens = vetted(batch, with_failures(choose(batch, masked), failures))
        return tokens, self.scores(batch, tokens, logits)

    @staticmethod
    def on_device(batch: list[Sequence]) -> bool:
        """Whether the batch's tokens can be chosen on the device (no host-side parameters, and no
        row whose closer must vet its token before it is used, see ``vetted``)."""
        if any(s.closer is not None and s.closer.vetting(s.remaining_tokens) for s in batch):
            return False
        return samplable_on_device([s.params for s in batch], [s.generator for s in batch])

    def choosable_columns(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits' columns of ids the tokenizer can write, cut once where a step's logits come in:
        what tokens are chosen from and log probabilities are normalised over (a padded id is no
        candidate, as in vLLM's logits)."""
        if self.choosable is not None and logits.shape[-1] > self.choosable:
            return logits[:, : self.choosable]  # a view: no copy, no launch
        return logits

    def constrain(
        self, batch: list[Sequence], logits: torch.Tensor
    ) -> tuple[torch.Tensor, list | None]:
        """The logits to choose from (structured-output rows masked to what their grammar allows) and
        the rows whose grammar failed (None when no row follows one: the common case costs nothing)."""
        if all(s.grammar is None for s in batch):
            return logits, None
        if self.masks is None:
            self.masks = TokenMasks(
                logits.shape[-1],
                logits.device,
                budget_s=self._mask_budget_s,
                step_share=self._mask_step_share,
            )
        try:
            masked, failures = self.masks.apply(logits, [s.grammar for s in batch])
        except (
            Exception
        ) as exc:  # the masks themselves failed: the constrained rows end, the rest go on
            logger.warning("computing token masks failed", exc_info=True)
            return logits, [exc if s.grammar is not None else None for s in batch]
        watch = self.masks.watch
        slow = [s.grammar is not None and watch.is_suspect(id(s.grammar.matcher)) for s in batch]
        try:
            return force_closing(batch, logits, masked, failures, slow), failures
        except Exception:  # closing is a courtesy: without it the rows go on under their masks
            logger.warning("closing structured answers early failed", exc_info=True)
            return masked, failures

    @staticmethod
    def choose_on_device(batch: list[Sequence], masked: torch.Tensor) -> torch.Tensor | None:
        """The batch's tokens chosen on the device, left there (None: that failed; choose row by row)."""
        try:
            return sample_on_device(masked, [s.params for s in batch])
        except Exception:
            logger.warning("batched sampling failed; choosing row by row", exc_info=True)
            return None

    @staticmethod
    def scores(batch: list[Sequence], tokens: list, logits: torch.Tensor) -> list:
        try:
            return scores_on_host(batch, scores_on_device(batch, tokens, logits))
        except Exception:  # scoring failed: the rows that asked for it fail alone, when recorded
            logger.warning("scoring logprobs failed", exc_info=True)
            return [
                RuntimeError("computing logprobs failed") if s.params.logprobs is not None else None
                for s in batch
            ]


def force_closing(
    batch: list[Sequence],
    logits: torch.Tensor,
    masked: torch.Tensor,
    failures: list,
    slow: list[bool],
) -> torch.Tensor:
    """Rows whose closer says they must take a token now (their budget is ending, or a string of
    theirs runs away) are left that one token; the others keep their grammar's mask. A row whose
    grammar failed is not looked at, nor one whose masks are ``slow`` (a suspect of ``mask_watch``:
    a look would cost as much as a mask, beyond what the watch allows) unless it is being closed. A closer that fails gives up on its row,
    which goes on under its grammar alone."""
    for row, sequence in enumerate(batch):
        closer = sequence.closer
        if closer is None or failures[row] is not None or (slow[row] and not closer.pending):
            continue
        try:
            token = closer.forced(sequence.remaining_tokens)
        except Exception:
            logger.warning("closing request %s early failed", sequence.request_id, exc_info=True)
            closer.hopeless = True
            continue
        if token is not None:
            kept = logits[row, token].clone()
            masked[row] = float("-inf")
            masked[row, token] = kept
    return masked


def vetted(batch: list[Sequence], tokens: list) -> list:
    """Each row's token, or where its closer finds that the token would leave no way out within
    the budget (``, {"`` opening an object of required properties a few tokens before the end), the
    way out's next token instead. A closer that fails gives up on its row."""
    for row, sequence in enumerate(batch):
        closer, token = sequence.closer, tokens[row]
        if closer is None or not isinstance(token, int):
            continue
        try:
            tokens[row] = closer.vetted(token, sequence.remaining_tokens)
        except Exception:
            logger.warning("closing request %s early failed", sequence.request_id, exc_info=True)
            closer.hopeless = True
    return tokens


def choose(batch: list[Sequence], logits: torch.Tensor) -> list:
    """One token a row, chosen together; if that fails, each row alone (a fault then ends only its own
    row), seeded rows from their generator state before the failed attempt."""
    generators = [s.generator for s in batch]
    saved = [g.get_state() if g is not None else None for g in generators]
    try:
        return sample_next_tokens(logits, [s.params for s in batch], _histories(batch), generators)
    except Exception:
        logger.warning("batched sampling failed; choosing row by row", exc_info=True)
        for generator, state in zip(generators, saved):
            if generator is not None:
                generator.set_state(state)
        return choose_row_by_row(batch, logits)


def choose_row_by_row(batch: list[Sequence], logits: torch.Tensor) -> list:
    return sample_row_by_row(
        logits, [s.params for s in batch], _histories(batch), [s.generator for s in batch]
    )


def with_failures(tokens: list, failures: list | None) -> list:
    """Rows whose grammar failed hold their error instead of a token (and end alone)."""
    if failures is None:
        return tokens
    return [failure if failure is not None else token for token, failure in zip(tokens, failures)]


def _histories(batch: list[Sequence]) -> list[list[int]]:
    """What a repetition penalty needs; empty for rows without one."""
    return [s.history() if s.params.repetition_penalty != 1.0 else [] for s in batch]
