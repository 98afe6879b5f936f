"""A gateway's /metrics (unauthenticated) is not an amplifier: however many scrapes arrive, the
upstreams are scraped at most once per ``upstream.metrics_cache_s``, concurrent scrapes sharing one
fan-out. The upstream is ``MisbehavingUpstream``, a double that counts the scrapes it receives."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support.misbehaving_upstream import MisbehavingUpstream
from tests.support.servers import ServerProcess, metric_value

CACHE_S = 3.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    upstreams = [MisbehavingUpstream().start(), MisbehavingUpstream().start()]
    server = ServerProcess(
        "--engine",
        "upstream",
        log_dir=tmp_path_factory.mktemp("gateway-metrics"),
        env={
            "RAGLLM_UPSTREAM__URLS": ",".join(u.url for u in upstreams),
            "RAGLLM_UPSTREAM__METRICS_CACHE_S": str(CACHE_S),
        },
    )
    try:
        server.wait_ready()
        server.upstreams = upstreams
        yield server
    finally:
        server.stop()
        for upstream in upstreams:
            upstream.stop()


def _scrapes(gateway) -> list[int]:
    return [upstream.metrics_scrapes for upstream in gateway.upstreams]


async def _scrape_concurrently(url: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as http:
        return await asyncio.gather(*(http.get(f"{url}/metrics") for _ in range(count)))


def test_concurrent_scrapes_share_one_fan_out_per_period(gateway):
    time.sleep(CACHE_S)  # whatever scraped before has aged out: the next scrape fans out
    before = _scrapes(gateway)
    started = time.monotonic()
    responses = asyncio.run(_scrape_concurrently(gateway.url, 40))
    assert all(r.status_code == 200 for r in responses)
    for response in responses:  # every scrape carries both upstreams' series, labelled
        for upstream in gateway.upstreams:
            assert f'vllm:num_requests_running{{upstream="{upstream.url}"}} 3.0' in response.text
        assert metric_value(response.text, "ragllm_requests_in_flight") >= 0  # and our own registry
    assert [n - b for n, b in zip(_scrapes(gateway), before)] == [1, 1]
    # Within the period, more scrapes (one after another, then at once) are answered from the cache.
    for _ in range(10):
        assert httpx.get(f"{gateway.url}/metrics").status_code == 200
    asyncio.run(_scrape_concurrently(gateway.url, 20))
    if (
        time.monotonic() - started < CACHE_S
    ):  # a very slow machine may have crossed into the next period
        assert [n - b for n, b in zip(_scrapes(gateway), before)] == [1, 1]
    # Once the period is over, the next scrape fans out again, once.
    time.sleep(CACHE_S)
    asyncio.run(_scrape_concurrently(gateway.url, 20))
    assert [n - b for n, b in zip(_scrapes(gateway), before)] == [2, 2]
    print(
        f"\n90 gateway scrapes over two periods: upstream scrapes {[n - b for n, b in zip(_scrapes(gateway), before)]}"
    )
