"""The upstreams' /metrics, fetched at most once per period however often we are scraped.

``GET /metrics`` is unauthenticated (Prometheus scrapes it), and in gateway mode each call fans out to
every upstream: without a bound, anyone who can reach the port multiplies their requests by the number
of replicas. Scrapes within the period get the last fan-out's result; scrapes that arrive while one is
under way wait for it rather than starting their own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ScrapeCache(Generic[T]):
    def __init__(
        self,
        fetch: Callable[[], Awaitable[T]],
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._max_age_s = max_age_s
        self._clock = clock
        self._value: T | None = None
        self._fetched_at = float(
            "-inf"
        )  # when the last fan-out started: they start max_age_s apart at least
        self._in_flight: asyncio.Future[T] | None = None
        self.num_fetches = 0

    async def get(self) -> T:
        if self._value is not None and self._clock() - self._fetched_at < self._max_age_s:
            return self._value
        if self._in_flight is None:
            self._fetched_at = self._clock()
            self.num_fetches += 1
            self._in_flight = asyncio.ensure_future(self._refresh())
        # Shielded: one scraper that gives up must not cancel the fan-out the others wait on.
        return await asyncio.shield(self._in_flight)

    async def _refresh(self) -> T:
        try:
            self._value = await self._fetch()
            return self._value
        finally:
            self._in_flight = None

    async def aclose(self) -> None:
        if self._in_flight is not None:
            self._in_flight.cancel()
            await asyncio.gather(self._in_flight, return_exceptions=True)
