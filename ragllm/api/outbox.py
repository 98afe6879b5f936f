"""The bytes of one streamed answer on their way to a client that may read slower than they are made.

The engine's side puts events in as fast as it generates them; the response takes them out as fast as
the client reads (uvicorn's ``send`` waits while the connection's write buffer is full). So a client
that stops reading no longer holds its engine slot: its answer, bounded by max_tokens, waits here, up
to a bound in bytes, and within the process-wide ``OutboxBudget`` that every outbox shares.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ragllm.api.outbox_budget import OutboxBudget


class Outbox:
    """A byte-bounded buffer between one producer and one sender.

    Its bytes count against ``budget`` from ``put`` until the connection has passed them to the
    kernel: a chunk handed to ``send`` may wait in the connection's write buffer (an asyncio
    transport buffers whatever the socket does not take, up to its high-water mark before a send
    waits), so after each send ``sent`` is told how much that buffer still holds, or when the server
    cannot say, the chunk counts until the next send returns. ``discard`` releases everything. A budget that overflows may ``evict``
    this outbox: its bytes are dropped and ``on_evicted`` ends the stream.
    """

    def __init__(
        self,
        max_bytes: int,
        budget: OutboxBudget | None = None,
        on_evicted: Callable[[], None] = lambda: None,
    ) -> None:
        self.max_bytes = max_bytes
        self._chunks: list[bytes] = []
        self._size = 0
        self._taken = 0  # bytes of the last take, being sent
        self._in_connection = (
            0  # bytes of the take before, perhaps still in the connection's buffer
        )
        self._closed = False
        self._evicted = False
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._budget = budget
        self._on_evicted = on_evicted
        if budget is not None:
            budget.add(self)

    @property
    def num_bytes(self) -> int:
        """Bytes put in and not yet taken."""
        return self._size

    @property
    def num_held(self) -> int:
        """Bytes this stream holds in memory: queued, being sent, or perhaps still in the connection's buffer."""
        return self._size + self._taken + self._in_connection

    @property
    def evicted(self) -> bool:
        return self._evicted

    def put(self, chunk: bytes) -> bool:
        """Queue ``chunk``; False (and nothing queued) once the backlog has reached the bound or the
        budget evicted this outbox, which only a client that stopped reading lets happen."""
        if self._evicted or self._size >= self.max_bytes:
            return False
        self._chunks.append(chunk)
        self._size += len(chunk)
        self._ready.set()
        if self._budget is not None:
            self._budget.charge(len(chunk))  # may evict this outbox, or others holding more
        return not self._evicted

    def close(self, error: BaseException | None = None) -> None:
        """Nothing more will come; ``error``: raised by ``take`` once the backlog is sent."""
        self._closed, self._error = True, error
        self._ready.set()

    async def take(self) -> bytes | None:
        """Everything queued, as one write (fewer, larger writes to a client that lags); None once
        the answer is complete."""
        while not self._chunks:
            if self._closed:
                if self._error is not None:
                    raise self._error
                return None
            self._ready.clear()
            await self._ready.wait()
        chunks, self._chunks = self._chunks, []
        self._taken += self._size
        self._size = 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def sent(self, in_connection: int | None = None) -> None:
        """A send has returned; ``in_connection``: the bytes the connection's write buffer still holds
        (None: unknown, taken to be the chunk just sent)."""
        released = self._taken + self._in_connection
        self._in_connection = self._taken if in_connection is None else in_connection
        self._taken = 0
        if self._budget is not None:
            if self._in_connection > released:
                self._budget.charge(self._in_connection - released)  # may evict this outbox
            elif released > self._in_connection:
                self._budget.release(released - self._in_connection)

    def evict(self) -> None:
        """Drop every byte held and end the stream (the budget's choice: this client holds the most)."""
        if self._evicted:
            return
        self._evicted = True
        self.discard()
        self._on_evicted()

    def discard(self) -> None:
        """The stream is over: whatever it still holds is released and the budget forgets it."""
        self._chunks = []
        self._release(self._size + self._taken + self._in_connection)
        self._size = self._taken = self._in_connection = 0
        if self._budget is not None:
            self._budget.remove(self)

    def _release(self, num_bytes: int) -> None:
        if self._budget is not None and num_bytes:
            self._budget.release(num_bytes)
