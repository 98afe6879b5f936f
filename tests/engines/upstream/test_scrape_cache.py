"""The upstream scrape behind a gateway's /metrics: at most one fan-out per period, shared by every
scrape that arrives while it runs, and never cancelled by one scraper giving up."""

from __future__ import annotations

import asyncio

import pytest

from ragllm.engines.upstream.scrape_cache import ScrapeCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Upstreams:
    """Test double for the fan-out: counts calls, answers after ``release`` is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.fail = False

    async def scrape(self) -> list[tuple[str, str]]:
        self.calls += 1
        await self.release.wait()
        if self.fail:
            raise ConnectionError("upstream gone")
        return [("http://up", f"scrape {self.calls}")]


async def test_concurrent_scrapes_share_one_fan_out_and_the_period_serves_it_again():
    clock, upstreams = Clock(), Upstreams()
    cache = ScrapeCache(upstreams.scrape, 5.0, clock)
    waiting = [asyncio.ensure_future(cache.get()) for _ in range(50)]
    await asyncio.sleep(0)
    upstreams.release.set()
    assert {str(result) for result in await asyncio.gather(*waiting)} == {
        str([("http://up", "scrape 1")])
    }
    assert upstreams.calls == 1
    clock.now += 4.9
    assert await cache.get() == [("http://up", "scrape 1")] and upstreams.calls == 1
    clock.now += 0.2
    assert await cache.get() == [("http://up", "scrape 2")] and upstreams.calls == 2


async def test_a_scraper_that_gives_up_does_not_cancel_the_shared_fan_out():
    upstreams = Upstreams()
    cache = ScrapeCache(upstreams.scrape, 5.0, Clock())
    impatient, patient = asyncio.ensure_future(cache.get()), asyncio.ensure_future(cache.get())
    await asyncio.sleep(0)
    impatient.cancel()
    upstreams.release.set()
    assert await patient == [("http://up", "scrape 1")]
    assert upstreams.calls == 1


async def test_a_failed_fan_out_reaches_its_waiters_and_is_not_cached_as_a_result():
    upstreams = Upstreams()
    cache = ScrapeCache(upstreams.scrape, 5.0, Clock())
    upstreams.fail = True
    upstreams.release.set()
    with pytest.raises(ConnectionError):
        await cache.get()
    upstreams.fail = False
    assert await cache.get() == [
        ("http://up", "scrape 2")
    ]  # with nothing to serve, the next scrape tries again
