"""rag.order "relevance" against "stable" under retrieval-shaped load, side by side in one run
against one ``ragllm serve`` (the response cache off, so every answer is generated).

The workload is what a retriever sends: a pool of documents (24 by default), a few topics each
retrieving its own set of them (6 of the 24; topics overlap), every request a topic's set with fresh
scores, shuffled, and a question of its own. Under "relevance" the documents render by score, so the
same set renders differently from one question to the next; under "stable" by id, the same bytes.
Requests of the two orders alternate (one at a time, so time to first token is the prefill alone),
each order with its own documents so neither warms the other's cache. Reports per order: the prefix
cache hit rate (cached_tokens / prompt_tokens, as the server reports them), the same for requests
whose set was sent before, and time to first token (mean, p50).

    python bench/rag_order.py [--requests 24] [--topics 4] [--pool 24] [--set-size 6] \\
        [--max-tokens 4] [--json bench/results/rag_order.json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import write_report  # noqa: E402
from bench.server import served  # noqa: E402

ORDERS = ("relevance", "stable")
WORDS = (
    "archive region ledger harbour council survey river valley bridge market census mill school "
    "station granary chapel quarry orchard ferry road canal tower library guild"
).split()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24, help="per order")
    parser.add_argument(
        "--topics", type=int, default=4, help="document sets the questions retrieve"
    )
    parser.add_argument("--pool", type=int, default=24, help="documents the sets are drawn from")
    parser.add_argument("--set-size", type=int, default=6)
    parser.add_argument("--doc-words", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--url", help="a running server; default: start one with the packaged model"
    )
    parser.add_argument("--model", help="served model name; default: the server's first")
    parser.add_argument("--json", type=Path, default=Path("bench/results/rag_order.json"))
    return parser.parse_args()


def document_pool(size: int, words: int, rng: random.Random, tag: str) -> list[dict]:
    """``size`` documents of ``words`` words; ``tag`` keeps one order's text from the other's."""
    pool = []
    for i in range(size):
        text = " ".join(rng.choice(WORDS) for _ in range(words - 8))
        pool.append(
            {
                "id": f"{tag}-{i:02d}",
                "title": f"Record {i} ({tag})",
                "text": f"Record {i} of the {tag} collection lists {rng.randint(10, 999)} entries: "
                f"{text}.",
            }
        )
    return pool


def workload(args: argparse.Namespace, tag: str, rng: random.Random) -> list[tuple[int, str, list]]:
    """(topic, question, documents) per request: a topic's set, rescored and shuffled."""
    pool = document_pool(args.pool, args.doc_words, rng, tag)
    topics = [rng.sample(pool, args.set_size) for _ in range(args.topics)]
    requests = []
    for i in range(args.requests):
        topic = rng.randrange(args.topics)
        documents = [{**d, "score": round(rng.random(), 3)} for d in topics[topic]]
        rng.shuffle(documents)
        question = f"Question {i}: how many entries does the {rng.choice(WORDS)} record list?"
        requests.append((topic, question, documents))
    return requests


def ask(
    client: openai.OpenAI, model: str, question: str, documents: list, order: str, max_tokens: int
):
    """Time to the first content chunk, and the usage chunk's prompt and cached tokens."""
    started = time.perf_counter()
    first = None
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"documents": documents, "rag": {"order": order}},
        extra_headers={"Cache-Control": "no-cache, no-store"},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            usage = chunk.usage
    return {
        "ttft_ms": round(1000 * (first if first is not None else time.perf_counter() - started), 2),
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": usage.prompt_tokens_details.cached_tokens,
    }


def summarize(rows: list[dict]) -> dict:
    def hit_rate(selected: list[dict]) -> float | None:
        prompt = sum(r["prompt_tokens"] for r in selected)
        return round(sum(r["cached_tokens"] for r in selected) / prompt, 4) if prompt else None

    repeats = [r for r in rows if r["repeat"]]
    ttft = [r["ttft_ms"] for r in rows]
    return {
        "requests": len(rows),
        "repeats": len(repeats),
        "hit_rate": hit_rate(rows),
        "repeat_hit_rate": hit_rate(repeats),
        "mean_prompt_tokens": round(statistics.mean(r["prompt_tokens"] for r in rows), 1),
        "ttft_mean_ms": round(statistics.mean(ttft), 1),
        "ttft_p50_ms": round(statistics.median(ttft), 1),
        "repeat_ttft_p50_ms": round(statistics.median(r["ttft_ms"] for r in repeats), 1)
        if repeats
        else None,
    }


def run(url: str, args: argparse.Namespace) -> dict:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    model = args.model or client.models.list().data[0].id
    rng = random.Random(args.seed)
    plans = {order: workload(args, f"{order}-{args.seed}", rng) for order in ORDERS}
    # One request first, not counted: the first prefill pays for lazy initialisation.
    ask(client, model, "Warm up.", document_pool(2, 20, rng, "warm"), "relevance", 2)
    rows: dict[str, list[dict]] = {order: [] for order in ORDERS}
    seen: dict[str, set[int]] = {order: set() for order in ORDERS}
    for i in range(args.requests):
        for order in ORDERS:  # alternating: drift of a shared machine touches both alike
            topic, question, documents = plans[order][i]
            row = ask(client, model, question, documents, order, args.max_tokens)
            row["repeat"] = topic in seen[order]
            seen[order].add(topic)
            rows[order].append(row)
    client.close()
    return {order: {"summary": summarize(rows[order]), "requests": rows[order]} for order in ORDERS}


def main() -> None:
    args = parse_args()
    if args.url:
        results = run(args.url, args)
    else:
        with served({"RAGLLM_CACHE__ENABLED": "false"}) as url:
            results = run(url, args)
    print(
        f"\nrag_order  {args.requests} requests per order, {args.topics} topics of {args.set_size} "
        f"from {args.pool} documents, max_tokens={args.max_tokens}, one at a time"
    )
    header = (
        f"{'order':<11}{'requests':>9}{'repeats':>8}{'hit rate':>10}{'repeat hit rate':>17}"
        f"{'prompt tokens':>15}{'TTFT mean':>11}{'TTFT p50':>10}{'repeat TTFT p50':>17}"
    )
    print(header)
    print("-" * len(header))
    for order in ORDERS:
        s = results[order]["summary"]
        repeat_ttft = s["repeat_ttft_p50_ms"]
        print(
            f"{order:<11}{s['requests']:>9}{s['repeats']:>8}{s['hit_rate']:>10.1%}"
            f"{s['repeat_hit_rate'] or 0:>17.1%}{s['mean_prompt_tokens']:>15}"
            f"{s['ttft_mean_ms']:>8.1f} ms{s['ttft_p50_ms']:>7.1f} ms"
            f"{'-' if repeat_ttft is None else f'{repeat_ttft:.1f} ms':>17}"
        )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_report(args.json, {"benchmark": "rag_order", "settings": settings, "orders": results})


if __name__ == "__main__":
    main()
