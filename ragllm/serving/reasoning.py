"""Whether a chat answer opens with the model's thinking, as the engine needs to know before it
constrains the answer (the constraint then applies after the thinking, see
``structured/thinking_first``) or bounds the thinking (``thinking_token_budget``)."""

from __future__ import annotations

from typing import Any

from ragllm.errors import InvalidRequest
from ragllm.generation import ModelCard
from ragllm.structured.thinking_first import ThinkingFirst

# Template switches that turn thinking off when false (Qwen3's, DeepSeek-V3.1's).
_SWITCHES = ("enable_thinking", "thinking")


def thinking_first(
    model: ModelCard,
    template_kwargs: dict[str, Any],
    reasoning_off: bool,
    budget: int | None,
    max_tokens: int | None,
) -> ThinkingFirst | None:
    """The thinking a request's answer opens with: None where the model does not think in markers of
    its own, the request switched thinking off, or a RAG request did not ask for reasoning. A
    template that closes the thinking block in its prompt by default is seen by the engine."""
    if budget is not None and max_tokens is not None and budget >= max_tokens:
        raise InvalidRequest(
            f"thinking_token_budget ({budget}) must be less than max_tokens ({max_tokens}): "
            "the answer after the thinking needs tokens of its own",
            param="thinking_token_budget",
        )
    if not model.thinks or reasoning_off:
        return None
    if any(template_kwargs.get(switch) is False for switch in _SWITCHES):
        return None
    return ThinkingFirst(budget)
