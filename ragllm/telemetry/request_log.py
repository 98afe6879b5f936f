"""The per-request log: one entry per finished request, appended to a bounded Redis Stream.

The request path only appends to an in-memory queue; a background task writes batches, each in one
round trip. While Redis is away the queue keeps the newest ``buffer`` entries (counting what it had
to drop) and flushes them when Redis returns.

Exactly once: a batch whose write failed ambiguously (a timeout, Redis dying after it executed) is
sent again under the same batch id, and the script that writes it does nothing for an id it has
already seen, so no request is logged twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from ragllm.config import RequestLogSettings
from ragllm.redis_link import RedisLink, RedisUnavailable

logger = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.1
BATCH_SIZE = 500
BATCH_MARKER_TTL_S = 3600  # how long a written batch's id is remembered, against late duplicates

# KEYS: the stream, the batch's marker. ARGV: maxlen, marker TTL, then each entry as a JSON array of
# alternating field names and values. Writes the batch unless its marker already exists.
_WRITE_BATCH_LUA = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
  return 0
end
for i = 3, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(cjson.decode(ARGV[i])))
end
return #ARGV - 2
"""

# Fields of an entry, in order (all values are strings or numbers; the API key itself never is one).
FIELDS = (
    "request_id",
    "key_id",
    "endpoint",
    "model",
    "status",
    "finish_reason",
    "cache",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "queue_ms",
    "ttft_ms",
    "latency_ms",
    "time",
    "trace_id",
)
# Fields a RAG answer adds (``RagOutcome.fields``): counts only, never the client's document ids.
RAG_FIELDS = (
    "rag_template",
    "rag_citation_mode",
    "rag_documents_received",
    "rag_documents_used",
    "rag_documents_dropped",
    "rag_context_tokens",
    "rag_citations_valid",
    "rag_citations_unknown",
    "rag_citations_missing",
    "rag_declined",
)


class RequestLog:
    def __init__(
        self,
        settings: RequestLogSettings,
        link: RedisLink | None,
        on_drop: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.settings = settings
        self._link = link
        # Without Redis the queue is the log: a ring of the most recent entries, where letting the
        # oldest go is what a ring does, not a loss (so it is not counted as one).
        self._pending: deque[dict[str, Any]] = deque(maxlen=None if link else settings.buffer)
        self._on_drop = on_drop
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.stream_key = link.key(settings.stream) if link else settings.stream
        self._unsent: tuple[str, list[dict[str, Any]]] | None = (
            None  # a batch to send again, same id
        )
        self._write_script = link.client.register_script(_WRITE_BATCH_LUA) if link else None

    def append(self, entry: dict[str, Any]) -> None:
        if self._link is None:
            self._pending.append(entry)
            return
        if len(self._pending) >= self.settings.buffer:  # Redis away this long: an entry is lost
            self._pending.popleft()
            self._on_drop(1)
        self._pending.append(entry)
        if len(self._pending) >= BATCH_SIZE:
            self._wake.set()

    @property
    def num_pending(self) -> int:
        if self._link is None:
            return 0
        return len(self._pending) + (len(self._unsent[1]) if self._unsent else 0)

    def start(self) -> None:
        if self._link is not None:
            self._task = asyncio.create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), FLUSH_INTERVAL_S)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write what is pending; on failure keep the batch, under its id, for the next try."""
        while self._link is not None and (self._unsent or self._pending):
            batch_id, batch = self._unsent or (os.urandom(8).hex(), self._take_batch())
            try:
                await self._link.call(
                    "request_log", lambda redis: self._write(redis, batch_id, batch)
                )
            except RedisUnavailable:
                self._unsent = (batch_id, batch)
                self._drop_overflow()
                return
            self._unsent = None

    def _take_batch(self) -> list[dict[str, Any]]:
        return [self._pending.popleft() for _ in range(min(BATCH_SIZE, len(self._pending)))]

    def _drop_overflow(self) -> None:
        """While Redis is away, keep the newest ``buffer`` entries; older ones are lost, and counted."""
        overflow = self.num_pending - self.settings.buffer
        if overflow <= 0:
            return
        lost = min(overflow, len(self._pending))
        for _ in range(lost):
            self._pending.popleft()
        if overflow > lost and self._unsent is not None:  # the buffer is smaller than a batch
            batch_id, batch = self._unsent
            self._unsent = (
                (batch_id, batch[overflow - lost :]) if overflow - lost < len(batch) else None
            )
        self._on_drop(overflow)

    async def _write(self, redis: Any, batch_id: str, batch: list[dict[str, Any]]) -> Any:
        # Values as text here (as redis-py writes them), not left to Lua's number formatting.
        entries = [
            orjson.dumps(
                [part for key, value in entry.items() for part in (key, str(_field(value)))]
            )
            for entry in batch
        ]
        marker = self._link.key("request_log_batch", batch_id)
        return await self._write_script(
            keys=[self.stream_key, marker],
            args=[self.settings.maxlen, BATCH_MARKER_TTL_S, *entries],
            client=redis,
        )

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            await self.flush()


def _field(value: Any) -> str | int | float:
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    return value
