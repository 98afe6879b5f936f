"""What listing answers by document costs the response cache: a store and a lookup of an answer with no
document against one listed under several (the RAG case), in memory and in Redis, side by side in one
run; and an invalidation of a document that many answers used.

    python bench/cache_index.py [--answers 2000] [--documents 8] [--redis-url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import write_report  # noqa: E402
from ragllm.cache import CachedResponse  # noqa: E402
from ragllm.cache.index import document_index  # noqa: E402
from ragllm.cache.memory import MemoryCache  # noqa: E402
from ragllm.cache.redis_impl import RedisCache  # noqa: E402
from ragllm.config import RedisSettings  # noqa: E402
from ragllm.redis_link import RedisLink  # noqa: E402

ANSWER = CachedResponse("The Verdant Bridge was completed in 1987. [bridge]", "stop", 412, 14)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=2000, help="stores per variant")
    parser.add_argument("--documents", type=int, default=8, help="documents a RAG answer used")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path, default=Path("bench/results/cache_index.json"))
    return parser.parse_args()


async def measure(cache, answers: int, documents: tuple[str, ...]) -> dict[str, list[float]]:
    """Per answer: a lookup (as a request makes one) then its store, timed apart (µs)."""
    samples: dict[str, list[float]] = {"lookup": [], "store": []}
    run = uuid.uuid4().hex[:8]
    for index in range(answers):
        key = f"{run}-{index}"
        start = time.perf_counter()
        lookup = await cache.lookup(key)
        looked_up = time.perf_counter()
        await cache.put(key, ANSWER, 3600, documents, lookup.as_of)
        stored = time.perf_counter()
        samples["lookup"].append((looked_up - start) * 1e6)
        samples["store"].append((stored - looked_up) * 1e6)
    return samples


async def invalidation_us(cache) -> float:
    start = time.perf_counter()
    await cache.invalidate([document_index(None, "shared")])
    return (time.perf_counter() - start) * 1e6


def summarize(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_us": round(statistics.median(ordered), 1),
        "p95_us": round(ordered[max(0, int(len(ordered) * 0.95) - 1)], 1),
    }


async def run(args: argparse.Namespace) -> dict:
    listed = (
        document_index(None, "shared"),
        *(document_index(None, f"doc-{i}") for i in range(args.documents - 1)),
    )
    link = RedisLink(
        RedisSettings(url=args.redis_url, prefix=f"bench-{uuid.uuid4().hex[:8]}", timeout_s=5.0)
    )
    backends = {"memory": MemoryCache(1 << 30), "redis": RedisCache(link)}
    report: dict = {"benchmark": "cache_index", "answers": args.answers, "rows": []}
    report["documents"] = args.documents
    try:
        for backend, cache in backends.items():
            await cache.lookup(None)  # connected
            for variant, documents in (
                ("no documents", ()),
                (f"{args.documents} documents", listed),
            ):
                for operation, samples in (await measure(cache, args.answers, documents)).items():
                    row = {"backend": backend, "answer": variant, "operation": operation}
                    report["rows"].append({**row, **summarize(samples)})
            # Every listed answer used "shared": one invalidation evicts them all.
            report[f"invalidate_{backend}_us"] = round(await invalidation_us(cache), 1)
    finally:
        await link.aclose()
    return report


def main() -> None:
    args = parse_args()
    report = asyncio.run(run(args))
    print(f"\ncache index  answers={args.answers}  documents={args.documents}  (one client)")
    print(f"{'backend':>8} {'answer':>12} {'operation':>9} {'n':>6} {'p50 µs':>9} {'p95 µs':>9}")
    for row in report["rows"]:
        print(
            f"{row['backend']:>8} {row['answer']:>12} {row['operation']:>9} {row['n']:>6} "
            f"{row['p50_us']:>9} {row['p95_us']:>9}"
        )
    print(
        f"\ninvalidating one document used by {args.answers} answers: "
        f"{report['invalidate_memory_us']} µs in memory, {report['invalidate_redis_us']} µs in Redis"
    )
    write_report(args.json, report)


if __name__ == "__main__":
    main()
