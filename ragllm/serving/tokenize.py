"""The answer of /tokenize: the prompt's count (with its ids and token strings when asked), and for
a chat with documents, the dry run of its packing."""

from __future__ import annotations

from typing import Any

from ragllm.engines.base import Engine
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
        tokenized = await engine.tokenize(prepared.generation, strings=body.return_token_strs)
        answer.update(count=len(tokenized.ids), tokens=tokenized.ids)
        if tokenized.strings is not None:
            answer["token_strs"] = tokenized.strings
    elif prepared.rag is not None:
        answer["count"] = prepared.rag.prompt_tokens
    else:
        answer["count"] = await engine.count_prompt_tokens(prepared.generation)
    if prepared.rag is not None:
        answer["rag"] = await dry_run_report(engine, prepared.rag)
    return answer
