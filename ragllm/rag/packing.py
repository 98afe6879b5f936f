"""Fitting a RAG request into the model's context: documents packed by rank with the real tokenizer.

Whole documents are dropped, lowest-ranked first; the instruction and the question never are. When
even they do not fit beside the room kept for the answer, the request is refused (400): nothing is
ever truncated silently. Which documents are kept is a relevance decision whatever the request's
``rag.order``; the order only lays the kept ones out (``prompt.arrange``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ragllm.engines.base import Engine
from ragllm.errors import ContextLengthExceeded
from ragllm.generation import GenerationRequest, ModelCard, SamplingParams
from ragllm.rag.citations import declines, parse_citations
from ragllm.rag.contract import RagDocument, RagOptions, RagOrder
from ragllm.rag.document_set import document_set_key
from ragllm.rag.outcome import RagOutcome
from ragllm.rag.prompt import RagTemplate, arrange, render_messages, with_no_think
from ragllm.thinking import answer_after_thinking

T = TypeVar("T")

# Room kept for the answer when a RAG request sets no max_tokens.
DEFAULT_ANSWER_TOKENS = 512
# Past these, ranking, rendering and reporting documents run on a worker thread; below them the work
# takes microseconds, less than a hop to a thread and back (which on a busy GPU engine can wait for
# the GIL a whole switch interval).
MANY_DOCUMENTS = 256
LARGE_DOCUMENTS_CHARS = 256 * 1024


def is_heavy(documents: list[RagDocument]) -> bool:
    return (
        len(documents) > MANY_DOCUMENTS
        or sum(len(d.text) for d in documents) > LARGE_DOCUMENTS_CHARS
    )


async def off_loop_if(heavy: bool, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, on a worker thread when the work is heavy, else right here."""
    return await asyncio.to_thread(function, *args) if heavy else function(*args)


@dataclass(slots=True)
class RagContext:
    """What packing decided; turned into the response's ``rag`` object once the answer is known."""

    template: str
    documents: dict[str, RagDocument]  # every supplied document, by id
    used: list[str]  # in the order the prompt holds them
    dropped: list[str]  # lowest-ranked last
    context_tokens: int
    citations: bool | str  # True, False or "constrained" (RagOptions.citations)
    decline: str = ""  # the template's sentence for an answer the documents do not hold
    # The budget it packed within, and the whole prompt's tokens it settled on (what a dry run reports).
    prompt_tokens: int = 0
    max_model_len: int = 0
    reserved_for_answer: int = 0
    max_context_tokens: int | None = None
    # The packed documents as a set (``document_set.document_set_key``): an upstream router's
    # affinity; None when none was packed.
    document_set: str | None = None

    def packed(self) -> tuple[tuple[str, str | None], ...]:
        """The id and version of each document the prompt holds, in its order: what shaped the answer.
        Dropped documents are not among them: the prompt, hence the answer, is the same whatever they
        say (an edit that lets one fit changes the prompt, so the request misses the cache anyway)."""
        return tuple((id_, self.documents[id_].version) for id_ in self.used)

    def report(self, answer: str) -> dict[str, Any]:
        # Citations are the answer's: brackets in the thinking (kept with rag.reasoning) are notes.
        answer = answer_after_thinking(answer)
        citations, unknown = parse_citations(answer, self.documents) if self.citations else ([], [])
        return {
            "template": self.template,
            "used_documents": self.used,
            "dropped_documents": self.dropped,
            "context_tokens": self.context_tokens,
            "citations": [c.model_dump() for c in citations],
            "unknown_citations": unknown,
            "cited": bool(citations),
            "citation_mode": "constrained"
            if self.citations == "constrained"
            else "parsed"
            if self.citations
            else "off",
        }

    def answered(self, answer: str) -> tuple[dict[str, Any], RagOutcome]:
        """The response's ``rag`` report of ``answer``, and its counts for telemetry."""
        report = self.report(answer)
        outcome = RagOutcome(
            template=self.template,
            citation_mode=report["citation_mode"],
            documents_received=len(self.documents),
            documents_used=len(self.used),
            documents_dropped=len(self.dropped),
            context_tokens=self.context_tokens,
            citations_valid=len(report["citations"]),
            citations_unknown=len(report["unknown_citations"]),
            declined=bool(self.decline) and declines(answer_after_thinking(answer), self.decline),
        )
        return report, outcome


@dataclass(frozen=True, slots=True)
class PackRequest:
    model: ModelCard
    template: RagTemplate
    ranked: list[RagDocument]
    messages: list[dict[str, Any]]
    template_kwargs: dict[str, Any] | None
    max_tokens: int | None
    options: RagOptions
    no_think: bool
    order: RagOrder = "relevance"  # the request's, or the server's default


async def pack(engine: Engine, request: PackRequest) -> tuple[list[dict[str, Any]], RagContext]:
    """The rendered messages holding as many top-ranked documents as fit, and the packing report."""
    reserve = request.max_tokens or DEFAULT_ANSWER_TOKENS
    window = request.model.max_model_len
    budget = window - reserve

    def render_sync(count: int) -> list[dict[str, Any]]:
        documents = arrange(request.ranked[:count], request.order)
        messages = render_messages(request.template, documents, request.messages)
        return with_no_think(messages) if request.no_think else messages

    heavy = is_heavy(request.ranked)

    async def render(count: int) -> tuple[list[dict[str, Any]], int]:
        messages = await off_loop_if(heavy, render_sync, count)
        probe = GenerationRequest(
            "count",
            SamplingParams(),
            messages=messages,
            chat_template_kwargs=request.template_kwargs,
        )
        return messages, await engine.count_prompt_tokens(probe)

    bare_messages, bare = await render(0)
    if bare > budget:
        raise ContextLengthExceeded(
            f"the instruction and the question alone take {bare} tokens; with {reserve} kept for the answer, "
            f"the model's {window}-token context cannot hold them; shorten the question or lower max_tokens",
            param="messages",
        )
    cap = request.options.max_context_tokens

    def fits(tokens: int) -> bool:
        return tokens <= budget and (cap is None or tokens - bare <= cap)

    best_count, best = 0, (bare_messages, bare)
    reachable = within_reach(
        request.ranked, min(budget - bare, cap or budget), request.model.max_token_bytes
    )
    everything = await render(reachable) if reachable else best
    if fits(everything[1]):  # the common case: two renders
        best_count, best = reachable, everything
    else:  # the largest prefix of the ranking that fits, by bisection
        low, high = 0, reachable - 1
        while low < high:
            middle = (low + high + 1) // 2
            candidate = await render(middle)
            if fits(candidate[1]):
                low, best = middle, candidate
            else:
                high = middle - 1
        best_count = low
    messages, tokens = best
    context = await off_loop_if(heavy, _context, request, best_count, tokens - bare)
    context.prompt_tokens, context.max_model_len = tokens, window
    context.reserved_for_answer, context.max_context_tokens = reserve, cap
    return messages, context


def within_reach(ranked: list[RagDocument], token_room: int, max_token_bytes: int | None) -> int:
    """How many top-ranked documents could fit at all, known without tokenizing: a token covers at most
    ``max_token_bytes`` bytes, so documents whose bytes alone need more tokens than there is room for
    cannot fit. Tokenizing them would only cost time (and a request may carry thousands)."""
    if max_token_bytes is None:
        return len(ranked)
    room_bytes, total = max(token_room, 0) * max_token_bytes, 0
    for count, document in enumerate(ranked):
        total += sum(
            len(part.encode())
            for part in (document.id, document.text, document.title or "", document.source or "")
        )
        if total > room_bytes:
            return count
    return len(ranked)


def _context(request: PackRequest, used: int, context_tokens: int) -> RagContext:
    packed = request.ranked[:used]
    return RagContext(
        template=request.template.name,
        documents={d.id: d for d in request.ranked},
        used=[d.id for d in arrange(packed, request.order)],
        dropped=[d.id for d in request.ranked[used:]],
        context_tokens=context_tokens,
        citations=request.options.citations,
        document_set=document_set_key(request.template.name, packed),
        decline=request.template.decline,
    )
