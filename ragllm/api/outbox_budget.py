"""The bytes that every stream's outbox holds, bounded together.

Each outbox is bounded (``server.stream_buffer_bytes``), but a client that stops reading keeps its
bytes until its write timeout, so without a shared bound the memory held for finished-but-unread
answers would grow with the number of such connections. When a ``put`` takes the total past
``max_bytes``, the outboxes holding the most are evicted until it fits again: their bytes are dropped
at once and their streams end as clients too slow to keep (408, produced tokens billed). A client
that keeps up holds about one event, so it is never the one evicted while a non-reader holds more;
the engine never waits on the budget, and nothing is dropped without its stream being dropped too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ragllm.api.outbox import Outbox


class OutboxBudget:
    """A process-wide count of the bytes held for streaming clients, with eviction past ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.num_evicted = 0
        self._outboxes: set[Outbox] = set()

    @property
    def num_outboxes(self) -> int:
        return len(self._outboxes)

    def add(self, outbox: Outbox) -> None:
        self._outboxes.add(outbox)

    def remove(self, outbox: Outbox) -> None:
        self._outboxes.discard(outbox)

    def charge(self, num_bytes: int) -> None:
        """Count ``num_bytes`` more; past the bound, evict the largest holders until it fits. A scan
        of every outbox, but only on overflow, and each one removes a stream."""
        self.num_bytes += num_bytes
        while self.num_bytes > self.max_bytes and self._outboxes:
            largest = max(self._outboxes, key=_held)
            self.num_evicted += 1
            largest.evict()

    def release(self, num_bytes: int) -> None:
        self.num_bytes -= num_bytes


def _held(outbox: Outbox) -> int:
    return outbox.num_held
