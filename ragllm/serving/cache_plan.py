"""Whether the response cache may answer a request, and keep its answer: under which key."""

from __future__ import annotations

from dataclasses import dataclass

from ragllm.cache.keys import cache_key, is_deterministic
from ragllm.serving.prepare import PreparedRequest


@dataclass(frozen=True, slots=True)
class CachePlan:
    """What the response cache may do for one request."""

    key: str | None  # None: the request is not cacheable (not deterministic, or caching is off)
    read: bool
    write: bool


NO_CACHE = CachePlan(None, False, False)


def cache_plan(
    prepared: PreparedRequest, tenant: str | None, cache_control: str | None, enabled: bool
) -> CachePlan:
    """Deterministic requests are cached; ``Cache-Control: no-cache`` skips the lookup and
    ``no-store`` the write, as in HTTP."""
    params = prepared.generation.params
    if (
        not enabled
        or not is_deterministic(prepared.generation)
        or params.logprobs is not None
        or params.n > 1
    ):
        return NO_CACHE  # the cache keeps one choice's text, calls and usage, not log probabilities
    directives = {part.strip().lower() for part in (cache_control or "").split(",")}
    return CachePlan(
        key=cache_key(prepared.model, prepared.generation, tenant),
        read="no-cache" not in directives,
        write="no-store" not in directives,
    )
