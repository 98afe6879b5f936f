"""The load generator: streaming chat requests against any OpenAI-compatible server, one level at a
time, timed on the client's own clock.

Metrics follow `vllm bench serve`: TTFT is the time from sending a request to its first content
chunk; ITL the gaps between later chunks; output tokens come from the server's usage chunk. A level
is a closed loop of N concurrent clients, or an open loop of Poisson arrivals at a given rate.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from ragllm.loadtest.report import summarize
from ragllm.loadtest.workload import Workload


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    repeated: bool = False  # its documents were sent before
    prompt_tokens: int = 0
    cached_tokens: int = 0  # as the server's usage reported them (prompt_tokens_details)


async def one_request(http: httpx.AsyncClient, url: str, workload: Workload) -> RequestResult:
    messages, repeated = workload.next_request()
    payload = {
        "model": workload.model,
        "messages": messages,
        "max_tokens": workload.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage: dict[str, Any] = {}
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=payload) as response:
            if response.status_code != 200:
                body = await response.aread()
                return RequestResult(False, error=f"HTTP {response.status_code}: {body[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = orjson.loads(line[6:])
                if "error" in event:
                    return RequestResult(False, error=str(event["error"].get("message")))
                if event.get("usage"):
                    usage = event["usage"]
                    tokens = usage["completion_tokens"]
                if any(c.get("delta", {}).get("content") for c in event.get("choices", ())):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - start
    if first is None:
        return RequestResult(False, latency_s=latency, error="no content in the stream")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return RequestResult(
        True,
        first - start,
        latency,
        tokens,
        gaps,
        repeated=repeated,
        prompt_tokens=usage.get("prompt_tokens", 0),
        cached_tokens=cached,
    )


@dataclass(frozen=True)
class Bounds:
    requests: int | None = None  # per level
    duration_s: float | None = None  # per level

    def __post_init__(self) -> None:
        if self.requests is None and self.duration_s is None:
            raise ValueError("give --requests, --duration or both: a load test must be bounded")


async def run_level(
    url: str,
    workload: Workload,
    bounds: Bounds,
    concurrency: int | None = None,
    rate: float | None = None,
    on_done: Callable[[], None] = lambda: None,
    timeout_s: float = 300,
) -> dict[str, Any]:
    """One level: ``concurrency`` closed-loop clients, or Poisson arrivals at ``rate`` per second."""
    results: list[RequestResult] = []
    started = time.perf_counter()
    deadline = started + bounds.duration_s if bounds.duration_s else float("inf")
    budget = bounds.requests if bounds.requests is not None else float("inf")
    issued = 0

    def may_issue() -> bool:
        return issued < budget and time.perf_counter() < deadline

    async def record(http: httpx.AsyncClient) -> None:
        results.append(await one_request(http, url, workload))
        on_done()

    limits = httpx.Limits(max_connections=max(concurrency or 0, 256), max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        counters_before = await prefix_cache_counters(http, url)
        if concurrency is not None:

            async def client() -> None:
                nonlocal issued
                while may_issue():
                    issued += 1
                    await record(http)

            await asyncio.gather(*(client() for _ in range(concurrency)))
        else:
            arrivals = random.Random(workload.seed + 1)
            tasks = []
            while may_issue():
                issued += 1
                tasks.append(asyncio.create_task(record(http)))
                await asyncio.sleep(arrivals.expovariate(rate))
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        counters_after = await prefix_cache_counters(http, url)
    summary = summarize(results, elapsed, concurrency=concurrency, rate=rate)
    if counters_before and counters_after and counters_after[0] > counters_before[0]:
        queries, hits = (
            counters_after[0] - counters_before[0],
            counters_after[1] - counters_before[1],
        )
        summary.update(
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
            prefix_cache_hit_rate=round(hits / queries, 4),
        )
    return summary


async def prefix_cache_counters(http: httpx.AsyncClient, url: str) -> tuple[float, float] | None:
    """The server's prefix-cache (queries, hits) so far, from vLLM's series on /metrics (summed over
    its label sets: one engine, or every upstream); None where it exports none."""
    try:
        response = await http.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    totals = {"vllm:prefix_cache_queries_total": 0.0, "vllm:prefix_cache_hits_total": 0.0}
    found = False
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
                found = True
    return (
        (totals["vllm:prefix_cache_queries_total"], totals["vllm:prefix_cache_hits_total"])
        if found
        else None
    )
