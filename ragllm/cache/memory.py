"""In-process response cache: LRU, bounded by bytes, entries expire after their TTL."""

from __future__ import annotations

import time
from collections import OrderedDict

from ragllm.cache import CachedResponse

_ENTRY_OVERHEAD = (
    200  # dict slot, key string and tuple, roughly; keeps tiny entries from being free
)


class MemoryCache:
    name = "memory"

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, raw = entry
        if time.monotonic() >= expires_at:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return CachedResponse.loads(raw)

    async def put(self, key: str, value: CachedResponse, ttl_s: int) -> None:
        raw = value.dumps()
        size = len(raw) + len(key) + _ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (time.monotonic() + ttl_s, raw)
        self.num_bytes += size
        while self.num_bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, raw = self._entries.pop(key)
        self.num_bytes -= len(raw) + len(key) + _ENTRY_OVERHEAD

    def __len__(self) -> int:
        return len(self._entries)
