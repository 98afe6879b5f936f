"""End-to-end latency through HTTP: a cache hit against a miss, with the Redis backend against the
in-memory one. Two real servers (same model, same settings but the backend) are measured in one run.

    python bench/cache.py [--hits 50] [--misses 8] [--redis-url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import write_report  # noqa: E402
from bench.server import served  # noqa: E402
from ragllm.config import DEFAULT_MODEL as MODEL  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=50)
    parser.add_argument("--misses", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path, default=Path("bench/results/cache.json"))
    return parser.parse_args()


def timed_post(http: httpx.Client, url: str, payload: dict, headers: dict) -> tuple[float, str]:
    start = time.perf_counter()
    response = http.post(f"{url}/v1/chat/completions", json=payload, headers=headers)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed * 1000, response.headers["x-ragllm-cache"]


def measure(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    def payload(text: str) -> dict:
        return {
            "model": MODEL,
            "messages": [{"role": "user", "content": text}],
            "temperature": 0,
            "max_tokens": args.max_tokens,
        }

    results: dict[str, list[float]] = {"miss": [], "hit": []}
    with httpx.Client(timeout=120) as http:
        timed_post(http, url, payload("warm-up"), {})
        for index in range(args.misses):  # distinct prompts: each one generates
            elapsed, cache = timed_post(
                http, url, payload(f"Tell me a fact about the number {index}."), {}
            )
            assert cache == "miss", cache
            results["miss"].append(elapsed)
        for _ in range(args.hits):
            elapsed, cache = timed_post(
                http, url, payload("Tell me a fact about the number 0."), {}
            )
            assert cache == "hit", cache
            results["hit"].append(elapsed)
    return results


def summarize(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(ordered[max(0, int(len(ordered) * 0.95) - 1)], 2),
        "mean_ms": round(statistics.mean(ordered), 2),
    }


def main() -> None:
    args = parse_args()
    backends = {
        "memory": {},
        "redis": {
            "REDIS_URL": args.redis_url,
            "RAGLLM_REDIS__PREFIX": f"bench-{uuid.uuid4().hex[:8]}",
        },
    }
    report = {"benchmark": "cache", "model": MODEL, "max_tokens": args.max_tokens, "rows": []}
    for backend, env in backends.items():
        with served(env) as url:
            for kind, samples in measure(url, args).items():
                report["rows"].append({"backend": backend, "kind": kind, **summarize(samples)})
    rows = {(r["backend"], r["kind"]): r for r in report["rows"]}
    report["hit_speedup_memory"] = round(
        rows["memory", "miss"]["p50_ms"] / rows["memory", "hit"]["p50_ms"], 1
    )
    report["hit_speedup_redis"] = round(
        rows["redis", "miss"]["p50_ms"] / rows["redis", "hit"]["p50_ms"], 1
    )
    report["redis_added_ms_on_hit_p50"] = round(
        rows["redis", "hit"]["p50_ms"] - rows["memory", "hit"]["p50_ms"], 2
    )
    print(f"\ncache  model={MODEL}  max_tokens={args.max_tokens}  (HTTP on loopback, one client)")
    print(f"{'backend':>8} {'kind':>5} {'n':>4} {'p50 ms':>9} {'p95 ms':>9} {'mean ms':>9}")
    for row in report["rows"]:
        print(
            f"{row['backend']:>8} {row['kind']:>5} {row['n']:>4} {row['p50_ms']:>9} {row['p95_ms']:>9} {row['mean_ms']:>9}"
        )
    print(
        f"\nhit vs miss (p50): {report['hit_speedup_memory']}x faster in memory, "
        f"{report['hit_speedup_redis']}x with Redis; Redis adds {report['redis_added_ms_on_hit_p50']} ms to a hit"
    )
    write_report(args.json, report)


if __name__ == "__main__":
    main()
