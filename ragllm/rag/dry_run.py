"""What packing decided, reported before anything is generated: each document used or dropped with
its tokens, the prompt's tokens and the budget they were packed within (/tokenize with documents)."""

from __future__ import annotations

from typing import Any

from ragllm.engines.base import Engine
from ragllm.generation import ModelCard
from ragllm.rag.contract import RagDocument
from ragllm.rag.packing import RagContext, is_heavy, off_loop_if
from ragllm.rag.prompt import load_template, render_document

# Dropped documents counted where the model's longest token is unknown (an upstream's counts are one
# request per document): a dry run never sends hundreds of them.
MAX_COUNTED_DROPPED = 64


async def dry_run_report(engine: Engine, context: RagContext, model: ModelCard) -> dict[str, Any]:
    """The ``rag`` object of a /tokenize response. Each document is counted as the template renders
    it, alone, in one pass over all of them (a dropped document's size is what a caller trims).
    Dropped documents are counted in rank order only while no prompt of the model could be past
    holding them (``counted_dropped``); the rest report ``tokens: null``, so a dry run tokenizes no
    more than the completion's packing would, not megabytes of documents it never reads."""
    dropped = counted_dropped(context, model)
    ids = [*context.used, *dropped]
    documents = [context.documents[id_] for id_ in ids]
    template = load_template(context.template)
    rendered = await off_loop_if(
        is_heavy(documents), lambda: [render_document(template, d) for d in documents]
    )
    counts: dict[str, int | None] = dict(zip(ids, await engine.count_text_tokens(rendered)))
    return {
        "template": context.template,
        "used_documents": [{"id": i, "tokens": counts[i]} for i in context.used],
        "dropped_documents": [{"id": i, "tokens": counts.get(i)} for i in context.dropped],
        "context_tokens": context.context_tokens,
        "prompt_tokens": context.prompt_tokens,
        "budget": {
            "max_model_len": context.max_model_len,
            "reserved_for_answer": context.reserved_for_answer,
            "max_context_tokens": context.max_context_tokens,
        },
    }


def counted_dropped(context: RagContext, model: ModelCard) -> list[str]:
    """The dropped documents worth counting, highest-ranked first: while their bytes together could
    still fit the model's whole context (a token covers at most ``max_token_bytes``), or, where that
    is unknown, the first ``MAX_COUNTED_DROPPED``."""
    if model.max_token_bytes is None:
        return context.dropped[:MAX_COUNTED_DROPPED]
    room, total = model.max_model_len * model.max_token_bytes, 0
    for count, id_ in enumerate(context.dropped):
        total += _bytes(context.documents[id_])
        if total > room:
            return context.dropped[:count]
    return list(context.dropped)


def _bytes(document: RagDocument) -> int:
    return sum(
        len(part.encode())
        for part in (document.id, document.text, document.title or "", document.source or "")
    )
