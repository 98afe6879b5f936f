"""How much of a scheduling step goes to prefilling prompts: the admission policy, on plain numbers.

A step decodes one token for every decoding row, then prefills waiting prompts in arrival order within
the tokens the step has left (``max_num_batched_tokens``). While rows decode, the prefill is capped at
``max_while_decoding`` tokens a step (half the step's budget unless set), so both sides get a bounded
share:

- a running answer waits at most one decode plus one capped chunk between two tokens, however long
  the prompt beside it (without the cap a step prefilled a whole budget, and a chunk deep in a long
  prompt costs more than one near its start: its attention reads every earlier position);
- a prompt of ``n`` tokens gets its first token within ``ceil(n / max_while_decoding)`` steps, each
  only one decode longer than its chunk alone, so its time to first token stays a small multiple of
  its time alone at any length up to the context window.

With nothing decoding nobody waits on the prefill: in whole-prompt mode (``chunked=False``, the local
profile) the head of the queue is prefilled whole, whatever its length, for the lowest time to first
token; in chunked mode a step prefills its whole budget.
"""

from __future__ import annotations

from dataclasses import dataclass

# The head of the prefill queue gets at least this many tokens a step, however many rows decode.
MIN_PREFILL_CHUNK = 16


@dataclass(frozen=True)
class PrefillPolicy:
    step_tokens: int  # max_num_batched_tokens: decode rows and prefill tokens of one step
    chunked: bool  # every prompt in chunks; otherwise a prompt is prefilled whole where it may be
    max_while_decoding: int | None = (
        None  # prefill tokens a step while rows decode; None: half a step
    )

    @property
    def cap(self) -> int:
        cap = (
            self.max_while_decoding
            if self.max_while_decoding is not None
            else self.step_tokens // 2
        )
        return max(MIN_PREFILL_CHUNK, min(cap, self.step_tokens))

    def budget(self, num_decoding: int) -> int:
        """Prefill tokens this step may take after decoding ``num_decoding`` rows."""
        if num_decoding == 0:
            return self.step_tokens
        return min(self.step_tokens - num_decoding, self.cap)

    def chunk(self, remaining: int, budget: int, head: bool, decoding: bool) -> int:
        """Tokens of a prompt with ``remaining`` to prefill that it gets now, from ``budget`` left this
        step; ``head``: first in the queue (it always gets a chunk, so decodes never starve it). 0: it
        waits for a later step (first come, first served: nothing behind it is prefilled either)."""
        if not self.chunked:
            if remaining <= budget or (head and not decoding):
                return remaining
            if not head:  # whole-prompt mode splits only the head, and only while rows decode
                return 0
        if head:
            budget = max(budget, MIN_PREFILL_CHUNK)
        return min(remaining, max(budget, 0))
