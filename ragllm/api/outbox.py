"""The bytes of one streamed answer on their way to a client that may read slower than they are made.

The engine's side puts events in as fast as it generates them; the response takes them out as fast as
the client reads (uvicorn's ``send`` waits while the connection's write buffer is full). So a client
that stops reading no longer holds its engine slot: its answer, bounded by max_tokens, waits here, up
to a bound in bytes.
"""

from __future__ import annotations

import asyncio


class Outbox:
    """A byte-bounded buffer between one producer and one sender."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._chunks: list[bytes] = []
        self._size = 0
        self._closed = False
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    @property
    def num_bytes(self) -> int:
        """Bytes put in and not yet taken."""
        return self._size

    def put(self, chunk: bytes) -> bool:
        """Queue ``chunk``; False (and nothing queued) once the backlog has reached the bound, which
        only a client that stopped reading lets happen."""
        if self._size >= self.max_bytes:
            return False
        self._chunks.append(chunk)
        self._size += len(chunk)
        self._ready.set()
        return True

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
        chunks, self._chunks, self._size = self._chunks, [], 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
