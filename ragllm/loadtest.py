"""The load generator: streaming chat requests against any OpenAI-compatible server.

Metrics follow `vllm bench serve`: TTFT is the time from sending a request to its first content
chunk; ITL the gaps between later chunks; TPOT (latency - TTFT) / (output tokens - 1); output tokens
come from the server's usage chunk. Levels run one after another: a closed loop of N concurrent
clients, or an open loop of Poisson arrivals at a given rate.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Workload:
    model: str
    max_tokens: int = 64
    context_words: int = 400  # the shared "retrieved documents" part of each prompt
    doc_sets: int = 4  # distinct document sets
    repeat_rate: float = 0.75  # share of requests that reuse an earlier document set
    prompts: list[str] | None = None  # a prompt file replaces the RAG-shaped prompts
    seed: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._sets = [_documents(index, self.context_words) for index in range(self.doc_sets)]
        self._used: set[int] = set()  # document sets sent at least once
        self._fresh = 0

    def next_messages(self) -> list[dict[str, str]]:
        return self.next_request()[0]

    def next_request(self) -> tuple[list[dict[str, str]], bool]:
        """The next request's messages, and whether its documents were sent before (a repeat, which a
        server's prefix cache can serve)."""
        if self.prompts:
            return [{"role": "user", "content": self._random.choice(self.prompts)}], False
        repeated = False
        if self._random.random() < self.repeat_rate:
            index = self._random.randrange(len(self._sets))
            documents, repeated = self._sets[index], index in self._used
            self._used.add(index)
        else:  # a document set never seen before
            self._fresh += 1
            documents = _documents(self.doc_sets + self._fresh, self.context_words)
        question = f"Question {self._random.randint(1, 10_000)}: what do the documents say about item " \
                   f"{self._random.randint(1, 50)}?"
        return [{"role": "system", "content": "Answer from the documents only.\n\n" + documents},
                {"role": "user", "content": question}], repeated


def _documents(index: int, words: int) -> str:
    sentence = f"Document {index} notes that item {{n}} was reviewed and found consistent with the record. "
    text, n = [], 0
    while sum(len(s.split()) for s in text) < words:
        n += 1
        text.append(sentence.format(n=n))
    return "".join(text)


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
    payload = {"model": workload.model, "messages": messages, "max_tokens": workload.max_tokens,
               "stream": True, "stream_options": {"include_usage": True}}
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
    return RequestResult(True, first - start, latency, tokens, gaps, repeated=repeated,
                         prompt_tokens=usage.get("prompt_tokens", 0), cached_tokens=cached)


@dataclass(frozen=True)
class Bounds:
    requests: int | None = None  # per level
    duration_s: float | None = None  # per level

    def __post_init__(self) -> None:
        if self.requests is None and self.duration_s is None:
            raise ValueError("give --requests, --duration or both: a load test must be bounded")


async def run_level(url: str, workload: Workload, bounds: Bounds, concurrency: int | None = None,
                    rate: float | None = None, on_done: Callable[[], None] = lambda: None,
                    timeout_s: float = 300) -> dict[str, Any]:
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
        queries, hits = counters_after[0] - counters_before[0], counters_after[1] - counters_before[1]
        summary.update(prefix_cache_queries=queries, prefix_cache_hits=hits,
                       prefix_cache_hit_rate=round(hits / queries, 4))
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
    return (totals["vllm:prefix_cache_queries_total"], totals["vllm:prefix_cache_hits_total"]) if found else None


def _percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def at(percent: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(round(percent / 100 * (len(ordered) - 1))))] * scale, 3)

    return {"mean": round(statistics.mean(ordered) * scale, 3), "p50": at(50), "p90": at(90), "p99": at(99)}


def summarize(results: list[RequestResult], duration_s: float, **level: Any) -> dict[str, Any]:
    good = [r for r in results if r.ok]
    tpots = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]
    output_tokens = sum(r.output_tokens for r in good)
    return {
        **{k: v for k, v in level.items() if v is not None},
        "requests": len(results),
        "completed": len(good),
        "errors": len(results) - len(good),
        "error_samples": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": round(duration_s, 3),
        "requests_per_s": round(len(good) / duration_s, 3) if duration_s else 0.0,
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / duration_s, 2) if duration_s else 0.0,
        "ttft_ms": _percentiles([r.ttft_s for r in good]),
        "tpot_ms": _percentiles(tpots),
        "itl_ms": _percentiles([gap for r in good for gap in r.itl_s]),
        "latency_ms": _percentiles([r.latency_s for r in good]),
        **_repeats(good),
    }


def _repeats(good: list[RequestResult]) -> dict[str, Any]:
    """Requests whose documents were sent before against those sending theirs the first time: time to
    first token of each, and the share of the repeats' prompt tokens the server reported cached."""
    repeated = [r for r in good if r.repeated]
    if not repeated:
        return {}
    prompt_tokens = sum(r.prompt_tokens for r in repeated)
    return {
        "repeated": len(repeated),
        "repeated_prompt_tokens": prompt_tokens,
        "ttft_repeated_ms": _percentiles([r.ttft_s for r in repeated]),
        "ttft_first_ms": _percentiles([r.ttft_s for r in good if not r.repeated]),
        "repeated_cached_share": round(sum(r.cached_tokens for r in repeated) / prompt_tokens, 4)
        if prompt_tokens else None,
    }


def report_json(levels: list[dict[str, Any]], settings: dict[str, Any]) -> bytes:
    return orjson.dumps({"tool": "ragllm loadtest", "settings": settings, "levels": levels},
                        option=orjson.OPT_INDENT_2)


def comparison(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, float | None, float | None]]:
    """Matching levels' key figures, old against new: (level, metric, old, new)."""
    rows = []
    old_levels = {_level_name(level): level for level in old["levels"]}
    for level in new["levels"]:
        name = _level_name(level)
        before = old_levels.get(name)
        if before is None:
            continue
        for metric, pick in (("output tok/s", lambda x: x["output_tokens_per_s"]),
                             ("TTFT p50 ms", lambda x: x["ttft_ms"]["p50"]),
                             ("TPOT p50 ms", lambda x: x["tpot_ms"]["p50"]),
                             ("latency p99 ms", lambda x: x["latency_ms"]["p99"])):
            rows.append((name, metric, pick(before), pick(level)))
    return rows


def _level_name(level: dict[str, Any]) -> str:
    return f"c={level['concurrency']}" if "concurrency" in level else f"rate={level['rate']}/s"


def as_dict(workload: Workload) -> dict[str, Any]:
    data = asdict(workload)
    data.pop("prompts", None)
    return data
