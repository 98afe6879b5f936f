"""Whether the response cache may answer a request, and keep its answer: under which key."""

from __future__ import annotations

from dataclasses import dataclass

from ragllm.cache.index import document_index
from ragllm.cache.keys import cache_key, is_deterministic
from ragllm.serving.prepare import PreparedRequest


@dataclass(frozen=True, slots=True)
class CachePlan:
    """What the response cache may do for one request."""

    key: str | None  # None: the request is not cacheable (not deterministic, or caching is off)
    read: bool
    write: bool
    # The indexes a stored answer is listed under: one per packed document, in the caller's cache
    # group, so invalidating a document finds it (cache/index.py).
    documents: tuple[str, ...] = ()


NO_CACHE = CachePlan(None, False, False)


def cache_plan(
    prepared: PreparedRequest,
    tenant: str | None,
    cache_control: str | None,
    enabled: bool,
    group: str | None = None,
) -> CachePlan:
    """Deterministic requests are cached; ``Cache-Control: no-cache`` skips the lookup and
    ``no-store`` the write, as in HTTP. ``group``: the caller's cache group, which its documents
    belong to (None with API keys off)."""
    params = prepared.generation.params
    if (
        not enabled
        or not is_deterministic(prepared.generation)
        or params.logprobs is not None
        or params.n > 1
    ):
        return NO_CACHE  # the cache keeps one choice's text, calls and usage, not log probabilities
    directives = {part.strip().lower() for part in (cache_control or "").split(",")}
    packed = prepared.rag.packed() if prepared.rag is not None else ()
    return CachePlan(
        key=cache_key(prepared.model, prepared.generation, tenant, packed),
        read="no-cache" not in directives,
        write="no-store" not in directives,
        documents=tuple(document_index(group, document_id) for document_id, _ in packed),
    )
