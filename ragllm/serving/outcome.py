"""An answer counted as it comes: each choice's text, log probabilities and tool calls, and the usage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ragllm.generation import Delta, FinishReason, TokenLogprob
from ragllm.thinking import ThinkStripper
from ragllm.tools.calls import merge_tool_call_deltas


@dataclass(slots=True)
class ChoiceOutcome:
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(
        default_factory=list
    )  # every token's, when the request asked
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # in message form
    completion_tokens: int = 0
    closed_early: bool = False  # closed under its grammar because its budget was ending


@dataclass(slots=True)
class Outcome:
    choices: list[ChoiceOutcome]
    last: Delta  # the request's summary: usage (the prompt once, every choice's tokens), first finish reason

    @property
    def closed_early(self) -> list[int]:
        """The choices closed early under their grammar because their budget was ending."""
        return closed_early(self.choices)

    @property
    def text(self) -> str:
        """The first choice's text (what the RAG report checks, the log records and the cache keeps)."""
        return self.choices[0].text


class Tally:
    """Collects a request's deltas by choice until every choice has finished, streamed or not. Every
    token of an answer passes here: ``keep_text=False`` (a stream whose text nobody reads afterwards)
    keeps none. With ``strip_thinking`` each choice's ``<think>`` blocks are removed here, the one place
    they are, so a streamed answer and a whole one show the same text."""

    def __init__(self, choices: int, keep_text: bool = True, strip_thinking: bool = False) -> None:
        self.choices = [ChoiceOutcome() for _ in range(choices)]
        self._parts: list[list[str]] | None = [[] for _ in range(choices)] if keep_text else None
        self._strippers = [ThinkStripper() for _ in range(choices)] if strip_thinking else None
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.queue_time_s: float | None = None
        self._unfinished = choices

    @property
    def done(self) -> bool:
        """Every choice has finished."""
        return not self._unfinished

    def add(self, delta: Delta) -> str:
        """Count ``delta``; returns its text as shown (without thinking, where it is stripped)."""
        choice = self.choices[delta.index]
        text = delta.text
        if self._strippers is not None:
            stripper = self._strippers[delta.index]
            text = stripper.feed(text) + (
                stripper.flush() if delta.finish_reason is not None else ""
            )
        if self._parts is not None:
            self._parts[delta.index].append(text)
        if delta.logprobs:
            choice.logprobs += delta.logprobs
        if delta.tool_calls:
            merge_tool_call_deltas(choice.tool_calls, delta.tool_calls)
        choice.completion_tokens = delta.completion_tokens
        self.prompt_tokens = delta.prompt_tokens or self.prompt_tokens
        self.cached_tokens = delta.cached_tokens or self.cached_tokens
        if self.queue_time_s is None:
            self.queue_time_s = delta.queue_time_s
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            choice.closed_early = delta.closed_early
            if self._parts is not None:
                choice.text = "".join(self._parts[delta.index])
            self._unfinished -= 1
        return text

    def outcome(self) -> Outcome:
        return Outcome(self.choices, self.summary())

    def summary(self) -> Delta:
        """One delta for the whole request, as metrics, the request log and the cache take it."""
        return Delta(
            text="",
            num_tokens=0,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=sum(c.completion_tokens for c in self.choices),
            finish_reason=self.choices[0].finish_reason,
            queue_time_s=self.queue_time_s,
            cached_tokens=self.cached_tokens,
        )


def closed_early(choices: list[ChoiceOutcome]) -> list[int]:
    return [index for index, choice in enumerate(choices) if choice.closed_early]
