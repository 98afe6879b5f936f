"""Answers that open with the model's thinking (``<think> ... </think>``, as Qwen3 and DeepSeek-R1
write it): a structured constraint holds the answer after the end-of-thinking marker, never the
thinking, as vLLM does when a reasoning parser is set (``enable_in_reasoning`` off).

One grammar does it: the constraint's own grammar becomes a subgrammar that follows

    [<think>] THINKING </think> "\\n"{0,2} @answer

- ``<think>`` is there only when the chat template did not already open the block in the
  generation prompt (Qwen3's thinking variants and DeepSeek-R1 end the prompt with ``<think>\\n``);
  a template that closed it (``enable_thinking: false`` renders an empty block) means no thinking.
- THINKING is free text: anything but a special token (the end of the answer cannot come before the
  answer) and but the marker's own spelling in plain text, which would end the thinking for every
  reader of the answer but not for the grammar.
- The markers are single tokens of the vocabulary, matched as tokens (``<[id]>``).
- THINKING takes at most ``budget`` tokens (llguidance's ``max_tokens`` on the lexeme): then
  ``</think>`` is the only token the mask allows, so a model that would think forever still reaches
  its constrained answer within ``max_tokens`` (``thinking_tokens`` picks the budget).

A request that only bounds its thinking (``thinking_token_budget`` without a constraint) gets the
same grammar around ``FREE_ANSWER``, which allows any token.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ragllm.structured.spec import StructuredOutput

OPEN, CLOSE = "<think>", "</think>"
# The name of the constraint's grammar inside the wrapper; no request names its grammars.
_ANSWER = "answer_after_thinking"
# Any token at all, the end of the answer included: thinking bounded, the answer free.
FREE_ANSWER = StructuredOutput("grammar", "start: <[*]>*", "thinking_token_budget")
# Prompt ids looked at for an opened or closed block: the generation prompt's tail.
_PROMPT_TAIL = 8


@dataclass(frozen=True, slots=True)
class ThinkingFirst:
    """The answer opens with the model's thinking (a thinking model, thinking not switched off).
    ``budget``: the client's ``thinking_token_budget``; None: the server's default share."""

    budget: int | None = None


@dataclass(frozen=True, slots=True)
class ThinkingMarkers:
    """The ids of ``<think>`` and ``</think>``, each one token of the vocabulary."""

    open_id: int
    close_id: int


@dataclass(frozen=True, slots=True)
class ThinkingGrammar:
    """How one answer's thinking is shaped; part of the compiled grammar's cache key."""

    markers: ThinkingMarkers
    opened: bool  # the prompt opened the block: the answer starts inside the thinking
    budget: int  # thinking tokens, after which only </think> may come


def thinking_markers(tokenizer: Any) -> ThinkingMarkers | None:
    """The markers of a tokenizer that has both as tokens of their own (None: the model does not
    write thinking this way)."""
    ids = []
    for marker in (OPEN, CLOSE):
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
            return None
        ids.append(token_id)
    return ThinkingMarkers(*ids)


def prompt_opens_thinking(
    prompt_ids: Sequence[int], markers: ThinkingMarkers, decode: Callable[[list[int]], str]
) -> bool | None:
    """True: the prompt ends inside an opened block (only blank text after ``<think>``); False: the
    answer must open one; None: the prompt ends just after ``</think>``, the template closed the
    thinking (an empty block: thinking switched off)."""
    tail = list(prompt_ids[-_PROMPT_TAIL:])
    for position in range(len(tail) - 1, -1, -1):
        if tail[position] in (markers.open_id, markers.close_id):
            if decode(tail[position + 1 :]).strip():
                return False  # the marker belongs to an earlier turn
            return True if tail[position] == markers.open_id else None
    return False


def thinking_tokens(requested: int | None, default: int, max_tokens: int, opened: bool) -> int:
    """The thinking budget within ``max_tokens``: the client's ``requested`` budget, leaving room for
    the markers and at least one token of the answer; by default ``default``, and never more than
    half of ``max_tokens``, so the answer keeps the other half."""
    room = max(0, max_tokens - (1 if opened else 2) - 1)
    if requested is not None:
        return min(requested, room)
    return min(default, max_tokens // 2, room)


def after_thinking(compiled: str, thinking: ThinkingGrammar) -> str:
    """``compiled`` (a grammar as llguidance's compiler returns it) held after the thinking."""
    grammars = _grammars_of(compiled)
    opener = "" if thinking.opened else f"<[{thinking.markers.open_id}]> "
    lark = (
        f"start: {opener}thinking <[{thinking.markers.close_id}]> BLANK @{_ANSWER}\n"
        f"thinking[max_tokens={thinking.budget}]: THINKING\n"
        "THINKING: /(?s:.*)/ & ~/(?s:.*)<\\/think>(?s:.*)/\n"
        "BLANK: /\\n{0,2}/\n"
    )
    return json.dumps(
        {"grammars": [{"lark_grammar": lark}, {**grammars[0], "name": _ANSWER}, *grammars[1:]]}
    )


def _grammars_of(compiled: str) -> list[dict[str, Any]]:
    """The list of grammars in ``compiled``: llguidance's JSON form (schemas, regular expressions)
    or Lark text (grammars, choices)."""
    if compiled.lstrip().startswith("{"):
        try:
            value = json.loads(compiled)
        except ValueError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("grammars"), list):
            return value["grammars"]
    return [{"lark_grammar": compiled}]
