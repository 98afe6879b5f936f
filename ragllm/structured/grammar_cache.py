"""Compiled grammars kept by constraint, bounded by bytes, least recently used first out.

A count bound let 24 distinct 4 MiB schemas keep 250 MB: a grammar's compiled text grows with its
schema, so the bound is on what the entries weigh, the UTF-8 bytes of their compiled text.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable


class GrammarCache:
    """At most ``max_bytes`` of compiled grammar text; an entry heavier than the whole bound is not
    kept (it is compiled again when asked for, rather than emptying the cache for itself).
    Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[Hashable, tuple[str, int]] = (
            OrderedDict()
        )  # key → (grammar, its bytes)
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> str | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, grammar: str) -> None:
        size = len(grammar.encode("utf-8", "surrogatepass"))
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self.num_bytes -= previous[1]
            if size > self.max_bytes:
                return
            self._entries[key] = (grammar, size)
            self.num_bytes += size
            while self.num_bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.num_bytes -= evicted

    def __len__(self) -> int:
        return len(self._entries)
