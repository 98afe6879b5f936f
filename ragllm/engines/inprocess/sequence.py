"""One request's life inside the in-process engine."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ragllm.engines.inprocess.detokenizer import IncrementalDetokenizer, StopMatcher
from ragllm.engines.inprocess.kv.document_store import DocumentBlend, DocumentSpan
from ragllm.generation import Delta, FinishReason, SamplingParams, TokenLogprob
from ragllm.structured.closing import Closer
from ragllm.structured.grammars import Grammar


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


# A token's log probability and its top alternatives as (token id, log probability).
TokenScores = tuple[float, list[tuple[int, float]]]

# Receives deltas (or an exception) on the engine thread; it must hand them over to the event loop.
DeltaSink = Callable[["Sequence", "Delta | BaseException"], None]


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_token_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopMatcher
    sink: Any  # the consumer's queue; opaque to the engine thread
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0  # prompt tokens already in the KV cache
    output_ids: list[int] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    queue_time_s: float | None = None
    tokens_since_delta: int = 0
    token_text: Callable[[int], str] | None = None  # set when the request asks for logprobs
    logprobs_since_delta: list[TokenLogprob] = field(default_factory=list)
    grammar: Grammar | None = None  # the structured output the answer must follow
    closer: Closer | None = None  # steers it to a complete answer before its budget ends
    index: int = 0  # the choice this sequence answers (of its request's n)
    # A client's request, whose tokens the engine counts as produced; the engine's own canary is not.
    for_client: bool = True
    # Choices 1..n-1 of the request, which wait for this sequence's prompt to be prefilled and then
    # start from a copy of its cache (the prompt is prefilled once).
    followers: list[Sequence] = field(default_factory=list)
    leader: Sequence | None = None  # for a follower: the sequence that prefills its prompt
    # The KV blocks holding its positions, in order; they only grow while the sequence runs (a
    # preemption replaces the list), which lets a runner tell a changed table by length.
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, chained
    # Roots its block-hash chain beside the model's salt: its request's cache scope (tenant and
    # cache_salt), so only requests of the same scope share its blocks. Empty: the unscoped chain.
    scope_salt: bytes = b""
    num_registered: int = 0  # leading full blocks registered for prefix sharing
    num_cached_tokens: int | None = (
        None  # prompt tokens found in the prefix cache when first admitted
    )
    # Documents of the prompt whose KV may be reused at any position (rag.kv_reuse), and what the
    # next prefill reuses of them (set at admission, cleared once it has run).
    documents: list[DocumentSpan] = field(default_factory=list)
    blend: DocumentBlend | None = None
    # Positions from here on hold KV blended from stored documents (or computed after it): an
    # approximation, so their blocks are never registered for prefix sharing. None: all exact.
    exact_until: int | None = None
    documents_counted: bool = False  # the first blend's reused tokens are in num_cached_tokens

    @property
    def remaining_tokens(self) -> int:
        """Tokens this answer may still take, the next one included (max_tokens within the context)."""
        return self.max_tokens - len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefill_done(self) -> bool:
        return self.status is SequenceStatus.DECODING

    def prefill_ids(self) -> list[int]:
        """What a prefill computes: the prompt, or after a preemption the prompt and answer so far."""
        return self.history() if self.output_ids else self.prompt_ids

    @property
    def next_position(self) -> int:
        """Position of the last sampled token, which the next decode step feeds in."""
        return self.num_prompt_tokens + len(self.output_ids) - 1

    def history(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def mark_scheduled(self) -> bool:
        """Note when the sequence first left the queue; True that first time (its prompt starts)."""
        if self.queue_time_s is not None:
            return False
        self.queue_time_s = time.monotonic() - self.arrival_time
        return True

    def append_token(self, token_id: int, scores: TokenScores | None = None) -> Delta | None:
        """Record a sampled token (with its log probabilities, when asked for); returns a delta when
        there is something to tell the consumer."""
        self.output_ids.append(token_id)
        self.tokens_since_delta += 1
        if scores is not None and self.token_text is not None:
            logprob, top = scores
            self.logprobs_since_delta.append(
                TokenLogprob(
                    self.token_text(token_id),
                    logprob,
                    tuple((self.token_text(i), value) for i, value in top),
                )
            )
        if token_id in self.stop_token_ids:
            # The end-of-sequence token adds no text, but text held back so far (an unfinished
            # character, a possible stop-string prefix) is part of the answer.
            return self._finish(FinishReason.STOP, self._flush_held_back()[0])
        if self.grammar is not None:
            self.grammar.accept(token_id)
            if self.closer is not None:
                self.closer.accepted(token_id)
        text, hit_stop = self.stop_matcher.feed(self.detokenizer.push(token_id))
        if hit_stop:
            return self._finish(FinishReason.STOP, text)
        if self.closer is not None and self.closer.closed:
            # Closed because the budget was ending: a complete answer, but a shortened one.
            tail, _ = self._flush_held_back()
            return self._finish(FinishReason.LENGTH, text + tail)
        if (
            self.grammar is not None and self.grammar.finished
        ):  # complete: only the end could follow
            tail, _ = self._flush_held_back()
            return self._finish(FinishReason.STOP, text + tail)
        if len(self.output_ids) >= self.max_tokens:
            tail, hit_stop = self._flush_held_back()
            return self._finish(FinishReason.STOP if hit_stop else FinishReason.LENGTH, text + tail)
        if not text:
            return None
        return self._delta(text, None)

    def _flush_held_back(self) -> tuple[str, bool]:
        """Everything still held back, cut at a stop string if one completes; (text, stop reached)."""
        released, hit_stop = self.stop_matcher.feed(self.detokenizer.flush())
        return (released if hit_stop else released + self.stop_matcher.flush()), hit_stop

    def _finish(self, reason: FinishReason, text: str) -> Delta:
        self.status = SequenceStatus.FINISHED
        return self._delta(text, reason)

    def _delta(self, text: str, reason: FinishReason | None) -> Delta:
        delta = Delta(
            text=text,
            num_tokens=self.tokens_since_delta,
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=len(self.output_ids),
            finish_reason=reason,
            queue_time_s=self.queue_time_s,
            closed_early=reason is FinishReason.LENGTH
            and self.closer is not None
            and self.closer.closed,
            logprobs=self.logprobs_since_delta or None,
            index=self.index,
            cached_tokens=self.num_cached_tokens or 0,
        )
        self.tokens_since_delta = 0
        if self.logprobs_since_delta:
            self.logprobs_since_delta = []
        return delta
