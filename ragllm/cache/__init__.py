"""The response cache: a seam with an in-process and a Redis backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """What a deterministic generation produced; replayed with a fresh id and timestamp."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tool_calls: tuple[dict, ...] = ()  # in message form
    cached_tokens: int = 0  # the original answer's prefix-cache hit, replayed as it was reported
    closed_early: bool = False  # closed under its grammar because its budget was ending

    def dumps(self) -> bytes:
        fields = [self.text, self.finish_reason, self.prompt_tokens, self.completion_tokens]
        if self.tool_calls or self.cached_tokens or self.closed_early:
            fields += [list(self.tool_calls), self.cached_tokens]
        if self.closed_early:
            fields.append(True)
        return orjson.dumps(fields)

    @classmethod
    def loads(cls, raw: bytes) -> CachedResponse:
        text, finish_reason, prompt_tokens, completion_tokens, *rest = orjson.loads(raw)
        tool_calls = tuple(rest[0]) if rest else ()
        return cls(
            text,
            finish_reason,
            prompt_tokens,
            completion_tokens,
            tool_calls,
            rest[1] if len(rest) > 1 else 0,
            len(rest) > 2 and rest[2] is True,
        )


@dataclass(frozen=True, slots=True)
class Lookup:
    """What a lookup found, and when, by the cache's own clock: an answer stored later for the same
    request is refused if one of its documents was invalidated since (``cache/index.py``)."""

    response: CachedResponse | None
    as_of: float | None  # None: the cache could not be read (Redis away)


class ResponseCache(Protocol):
    name: str

    async def get(self, key: str) -> CachedResponse | None: ...

    async def lookup(self, key: str | None) -> Lookup:
        """The entry under ``key`` (None: only the clock) and the time of the reading."""
        ...

    async def put(
        self,
        key: str,
        value: CachedResponse,
        ttl_s: int,
        documents: Sequence[str] = (),
        as_of: float | None = None,
    ) -> None:
        """Store ``value``, listed under each of ``documents`` (``index.document_index`` names),
        unless one of them was invalidated at or after ``as_of`` (None: now)."""
        ...

    async def invalidate(self, documents: Sequence[str]) -> int:
        """Evict every answer listed under any of ``documents``; how many were evicted."""
        ...
