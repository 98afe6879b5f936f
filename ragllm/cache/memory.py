"""In-process response cache: LRU, bounded by bytes, entries expire after their TTL; each answer is
listed under the documents it used, so an invalidation evicts exactly those (``cache/index.py``).

Every method runs to its end without awaiting, so puts and invalidations on the event loop never
interleave half-way.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ragllm.cache import CachedResponse, Lookup
from ragllm.cache.index import INVALIDATIONS_KEPT_S, MAX_INVALIDATIONS_REMEMBERED

_ENTRY_OVERHEAD = (
    200  # dict slot, key string and tuple, roughly; keeps tiny entries from being free
)
_LISTING_OVERHEAD = 100  # one answer's place in one document's index, counted in its size


@dataclass(frozen=True, slots=True)
class _Entry:
    expires_at: float
    raw: bytes
    documents: tuple[str, ...]  # the indexes listing it

    def size(self, key: str) -> int:
        return len(self.raw) + len(key) + _ENTRY_OVERHEAD + _LISTING_OVERHEAD * len(self.documents)


class MemoryCache:
    name = "memory"

    def __init__(self, max_bytes: int, max_answers_per_document: int = 10_000) -> None:
        self.max_bytes = max_bytes
        self.max_answers_per_document = max_answers_per_document
        self.num_bytes = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # document index → the keys of the answers that used it, soonest to expire first
        self._indexes: dict[str, OrderedDict[str, None]] = {}
        # document index → when it was last invalidated, oldest first
        self._invalidated: OrderedDict[str, float] = OrderedDict()
        self._forgotten_until = float("-inf")  # invalidations up to here were forgotten (bound)

    async def get(self, key: str) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if time.monotonic() >= entry.expires_at:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return CachedResponse.loads(entry.raw)

    async def lookup(self, key: str | None) -> Lookup:
        as_of = time.monotonic()
        return Lookup(await self.get(key) if key is not None else None, as_of)

    async def put(
        self,
        key: str,
        value: CachedResponse,
        ttl_s: int,
        documents: Sequence[str] = (),
        as_of: float | None = None,
    ) -> None:
        now = time.monotonic()
        if documents and self._invalidated_since(documents, now if as_of is None else as_of, now):
            return
        entry = _Entry(now + ttl_s, value.dumps(), tuple(dict.fromkeys(documents)))
        size = entry.size(key)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = entry
        self.num_bytes += size
        for document in entry.documents:
            listed = self._indexes.setdefault(document, OrderedDict())
            listed[key] = None  # the newest expires last (one TTL for all: a constant setting)
            while len(listed) > self.max_answers_per_document:
                self._drop(next(iter(listed)))  # out of its index: out of the cache
        while self.num_bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    async def invalidate(self, documents: Sequence[str]) -> int:
        now, evicted = time.monotonic(), 0
        for document in documents:
            self._invalidated[document] = now
            self._invalidated.move_to_end(document)
            for key in list(self._indexes.get(document, ())):
                evicted += now < self._entries[key].expires_at  # an expired one was gone already
                self._drop(key)
        while len(self._invalidated) > MAX_INVALIDATIONS_REMEMBERED:
            _, self._forgotten_until = self._invalidated.popitem(last=False)
        return evicted

    def _invalidated_since(self, documents: Sequence[str], as_of: float, now: float) -> bool:
        """Whether an answer whose request began at ``as_of`` may have read a document invalidated
        since, or began too long ago to tell."""
        while (
            self._invalidated
            and next(iter(self._invalidated.values())) < now - INVALIDATIONS_KEPT_S
        ):
            self._invalidated.popitem(last=False)
        if as_of <= max(self._forgotten_until, now - INVALIDATIONS_KEPT_S):
            return True
        return any(
            self._invalidated.get(document, float("-inf")) >= as_of for document in documents
        )

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.num_bytes -= entry.size(key)
        for document in entry.documents:
            listed = self._indexes[document]
            del listed[key]
            if not listed:
                del self._indexes[document]

    def indexed(self, document: str) -> int:
        """How many answers one document's index lists (for checks and tests)."""
        return len(self._indexes.get(document, ()))

    def __len__(self) -> int:
        return len(self._entries)
