"""One guarded connection to Redis: every call is bounded in time, and a failure opens a breaker.

While the breaker is open, calls fail at once (no waiting on a dead server) and each user falls back:
the cache is bypassed, limits are kept per process, the request log buffers in memory. After
``retry_interval_s`` one call is let through to probe; success closes the breaker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ragllm.config import RedisSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis did not answer in time, or the breaker is open."""


class RedisLink:
    def __init__(
        self, settings: RedisSettings, on_fallback: Callable[[str], None] = lambda op: None
    ) -> None:
        from redis.asyncio import Redis

        self.settings = settings
        self.prefix = settings.prefix
        self._on_fallback = on_fallback
        self._client = Redis.from_url(
            settings.url,
            socket_timeout=settings.timeout_s,
            socket_connect_timeout=settings.timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._open_until = 0.0
        self.last_error = ""

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def client(self) -> Any:
        return self._client

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._open_until and not self.last_error

    def status(self) -> str:
        return "ok" if self.healthy else "degraded"

    async def call(self, operation: str, action: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``action(client)``; raises RedisUnavailable (and counts a fallback) on any failure."""
        if time.monotonic() < self._open_until:
            self._on_fallback(operation)
            raise RedisUnavailable(self.last_error)
        try:
            result = await asyncio.wait_for(action(self._client), self.settings.timeout_s)
        except (
            Exception
        ) as exc:  # timeouts, refused connections, protocol errors: all mean "not now"
            self._trip(operation, exc)
            raise RedisUnavailable(str(exc)) from exc
        if self.last_error:
            logger.info("redis is back")
            self.last_error = ""
        return result

    def _trip(self, operation: str, exc: BaseException) -> None:
        if not self.last_error:
            logger.warning(
                "redis unavailable during %s (%s); falling back for %.1fs",
                operation,
                exc or type(exc).__name__,
                self.settings.retry_interval_s,
            )
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._open_until = time.monotonic() + self.settings.retry_interval_s
        self._on_fallback(operation)

    async def aclose(self) -> None:
        await self._client.aclose()
