"""The answer of /tokenize: the prompt's count (with its ids and token strings when asked), and for
a chat with documents, the dry run of its packing."""

from __future__ import annotations

from typing import Any

from ragllm.engines.base import Engine
from ragllm.errors import ContextLengthExceeded
from ragllm.protocol.openai import TokenizeRequest
from ragllm.rag.dry_run import dry_run_report
from ragllm.serving.prepare import PreparedTokenize


async def tokenize_answer(
    engine: Engine, prepared: PreparedTokenize, body: TokenizeRequest
) -> dict[str, Any]:
    """``count`` and ``max_model_len`` as vLLM's; ``tokens``/``token_strs`` only when asked (a plain
    request's answer is as it always was); ``rag`` with documents. Packing has already counted the
    packed prompt, so a dry run without ids tokenizes nothing more than its documents."""
    answer: dict[str, Any] = {"count": 0, "max_model_len": prepared.model.max_model_len}
    if body.return_token_ids or body.return_token_strs:
        if prepared.rag is None:  # a packed prompt fits by construction
            await _refuse_past_context(engine, prepared, body)
        tokenized = await engine.tokenize(prepared.generation, strings=body.return_token_strs)
        answer.update(count=len(tokenized.ids), tokens=tokenized.ids)
        if tokenized.strings is not None:
            answer["token_strs"] = tokenized.strings
    elif prepared.rag is not None:
        answer["count"] = prepared.rag.prompt_tokens
    else:
        answer["count"] = await engine.count_prompt_tokens(prepared.generation)
    if prepared.rag is not None:
        answer["rag"] = await dry_run_report(engine, prepared.rag, prepared.model)
    return answer


async def _refuse_past_context(
    engine: Engine, prepared: PreparedTokenize, body: TokenizeRequest
) -> None:
    """Ids and token strings only for a prompt that fits the model's context (as /detokenize takes
    no more ids than it holds): counted first, so a long prompt costs what its count costs and no
    list of strings or answer of megabytes is built for it."""
    count = await engine.count_prompt_tokens(prepared.generation)
    if count > prepared.model.max_model_len:
        raise ContextLengthExceeded(
            f"the prompt has {count} tokens, more than this model's context length "
            f"({prepared.model.max_model_len}); return_token_ids and return_token_strs are answered "
            "only for a prompt that fits it (its count alone is answered without them)",
            param="messages" if body.messages is not None else "prompt",
        )
