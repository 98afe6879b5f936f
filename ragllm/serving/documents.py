"""A chat's documents packed into its messages: the thinking switch the RAG contract sets, the
canonical ranking and the packing itself. Shared by chat completions and their dry run (/tokenize
with documents), so that the dry run packs exactly what the completion would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ragllm.engines.base import Engine
from ragllm.generation import ModelCard
from ragllm.rag.contract import RagDocument, RagOptions, RagOrder
from ragllm.rag.packing import PackRequest, RagContext, is_heavy, off_loop_if, pack
from ragllm.rag.prompt import load_template, rank, render_document


@dataclass(frozen=True, slots=True)
class PackedChat:
    messages: list[dict[str, Any]]  # the template's system message with the packed documents first
    template_kwargs: dict[str, Any]  # the request's, with the thinking switch the contract sets
    context: RagContext


async def pack_documents(
    engine: Engine,
    model: ModelCard,
    messages: list[dict[str, Any]],
    documents: list[RagDocument],
    options: RagOptions,
    template_kwargs: dict[str, Any],
    max_tokens: int | None,
    default_order: RagOrder,
) -> PackedChat:
    """Without ``options.reasoning``, thinking is switched off: by the template's switch where it
    has one, else by the model's ``/no_think`` suffix where it understands one. ``default_order``:
    the server's layout of the documents, for a request that names none."""
    kwargs, no_think = dict(template_kwargs), False
    if not options.reasoning:
        if model.thinking_switch:
            kwargs.setdefault("enable_thinking", False)
        else:
            no_think = model.no_think_suffix
    ranked = await off_loop_if(is_heavy(documents), rank, documents)
    packed, context = await pack(
        engine,
        PackRequest(
            model=model,
            template=load_template(options.template),
            ranked=ranked,
            messages=messages,
            template_kwargs=kwargs or None,
            max_tokens=max_tokens,
            options=options,
            no_think=no_think,
            order=options.order or default_order,
        ),
    )
    return PackedChat(packed, kwargs, context)


def rendered_documents(context: RagContext) -> tuple[str, ...]:
    """The packed documents as the prompt holds them, in its order: what the in-process engine looks
    for in the rendered prompt to reuse each one's KV (``GenerationRequest.reusable_documents``)."""
    template = load_template(context.template)
    return tuple(render_document(template, context.documents[id_]) for id_ in context.used)
