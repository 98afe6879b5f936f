"""What packing decided, reported before anything is generated: each document used or dropped with
its tokens, the prompt's tokens and the budget they were packed within (/tokenize with documents)."""

from __future__ import annotations

from typing import Any

from ragllm.engines.base import Engine
from ragllm.rag.packing import RagContext, is_heavy, off_loop_if
from ragllm.rag.prompt import load_template, render_document


async def dry_run_report(engine: Engine, context: RagContext) -> dict[str, Any]:
    """The ``rag`` object of a /tokenize response. Each document is counted as the template renders
    it, alone, in one pass over all of them (a dropped document's size is what a caller trims)."""
    ids = [*context.used, *context.dropped]
    documents = [context.documents[id_] for id_ in ids]
    template = load_template(context.template)
    rendered = await off_loop_if(
        is_heavy(documents), lambda: [render_document(template, d) for d in documents]
    )
    counts = dict(zip(ids, await engine.count_text_tokens(rendered)))
    return {
        "template": context.template,
        "used_documents": [{"id": i, "tokens": counts[i]} for i in context.used],
        "dropped_documents": [{"id": i, "tokens": counts[i]} for i in context.dropped],
        "context_tokens": context.context_tokens,
        "prompt_tokens": context.prompt_tokens,
        "budget": {
            "max_model_len": context.max_model_len,
            "reserved_for_answer": context.reserved_for_answer,
            "max_context_tokens": context.max_context_tokens,
        },
    }
