"""The per-request log: one entry per finished request, appended to a bounded Redis Stream.

The request path only appends to an in-memory queue; a background task writes batches with one
pipelined round trip. While Redis is away the queue keeps the newest ``buffer`` entries (counting
what it had to drop) and flushes them when Redis returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from ragllm.config import RequestLogSettings
from ragllm.redis_link import RedisLink, RedisUnavailable

logger = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.1
BATCH_SIZE = 500

# Fields of an entry, in order (all values are strings or numbers; the API key itself never is one).
FIELDS = ("request_id", "key_id", "endpoint", "model", "status", "finish_reason", "cache", "stream",
          "prompt_tokens", "completion_tokens", "queue_ms", "ttft_ms", "latency_ms", "time")


class RequestLog:
    def __init__(self, settings: RequestLogSettings, link: RedisLink | None,
                 on_drop: Callable[[int], None] = lambda n: None) -> None:
        self.settings = settings
        self._link = link
        # Without Redis the queue is the log: a ring of the most recent entries, where letting the
        # oldest go is what a ring does, not a loss (so it is not counted as one).
        self._pending: deque[dict[str, Any]] = deque(maxlen=None if link else settings.buffer)
        self._on_drop = on_drop
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.stream_key = link.key(settings.stream) if link else settings.stream

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
        return len(self._pending) if self._link is not None else 0

    def start(self) -> None:
        if self._link is not None:
            self._task = asyncio.create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), FLUSH_INTERVAL_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write what is pending; on failure put it back for the next try."""
        while self._pending and self._link is not None:
            batch = [self._pending.popleft() for _ in range(min(BATCH_SIZE, len(self._pending)))]
            try:
                await self._link.call("request_log", lambda redis: self._write(redis, batch))
            except RedisUnavailable:
                self._pending.extendleft(reversed(batch))
                overflow = len(self._pending) - self.settings.buffer
                for _ in range(max(0, overflow)):
                    self._pending.popleft()
                if overflow > 0:
                    self._on_drop(overflow)
                return

    async def _write(self, redis: Any, batch: list[dict[str, Any]]) -> Any:
        pipeline = redis.pipeline(transaction=False)
        for entry in batch:
            pipeline.xadd(self.stream_key, {k: _field(v) for k, v in entry.items()},
                          maxlen=self.settings.maxlen, approximate=True)
        return await pipeline.execute()

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
