"""Document KV reuse (rag.kv_reuse): its fidelity to a full prefill and its first-token speed-up.

Retrieval-shaped prompts: ``--documents`` documents drawn from a pool of ``--pool`` by zipf popularity,
shuffled, then a question about a fact in one of them, rendered by the RAG template as the service
renders it. Every engine sees the same prompts in the same order, so their stores fill alike.

Quality: a reference engine blends with a recompute share of 1 (every token computed again: a full
prefill of the same ids) and one engine per ``--shares`` value blends as served. Per prompt: the
KL divergence of the first answer token's distribution (reference || reused, over the reference's
top 20 tokens and the rest as one bucket: the engine reports 20 alternatives), and whether the
greedy answers (``--answer-tokens``) are identical. ``--noise-floor`` adds an engine answering
without reuse: the prompt tokenized whole (its ids differ from the reusing prompt's at document
edges) and computed exactly, the same request a client would send with reuse off; how often its
greedy answers differ from the reference's shows how sensitive the comparison is.

Speed: per document set, one request stores its documents; then the same documents in another
order are timed to the first token with reuse and without it (a plain prefill, the prefix cache
holding the template), in turns.

    python bench/document_kv_reuse.py                         # packaged model, this CPU
    python bench/document_kv_reuse.py --random qwen2.5-1.5b --device cuda --doc-tokens 500
"""

from __future__ import annotations

import argparse
import asyncio
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import write_report  # noqa: E402
from ragllm.config import DEFAULT_MODEL, EngineSettings  # noqa: E402
from ragllm.engines.inprocess.engine import TransformersEngine  # noqa: E402
from ragllm.generation import GenerationRequest, SamplingParams  # noqa: E402
from ragllm.rag.contract import RagDocument  # noqa: E402
from ragllm.rag.prompt import load_template, render_document, render_messages  # noqa: E402
from ragllm.testing.random_checkpoints import ARCHITECTURES, build_random_checkpoint  # noqa: E402

PLACES = (
    "Oslund Verrin Maltby Corro Ashfell Tamsk Quillby Dornae Essler Haverly Lunmark Pell".split()
)
THINGS = "bridge library harbor mill observatory market school theatre dam lighthouse".split()
FILLER = [
    "Visitors often arrive by the old coastal road, which floods in early spring.",
    "The surrounding valley is known for rye bread baked with caraway seeds.",
    "Local records were kept in a ledger that the town council still holds.",
    "A weekly market fills the square with cheese, wool and smoked fish.",
    "Cycling paths connect most of the villages along the river.",
    "The winters are long, and the first snow usually falls in late October.",
    "Several families have run the same workshops for four generations.",
    "An annual festival celebrates the harvest with music and lantern parades.",
    "The municipal archive lists repairs made after the storm of the previous decade.",
    "Most houses are built of grey stone quarried in the hills to the north.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--random", choices=sorted(ARCHITECTURES), help="random weights")
    parser.add_argument("--random-dir", type=Path, default=Path("bench/results/models"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--prompts", type=int, default=200, help="quality: prompts compared")
    parser.add_argument("--sets", type=int, default=8, help="speed: document sets timed")
    parser.add_argument("--documents", type=int, default=8, help="documents per prompt")
    parser.add_argument("--pool", type=int, default=64, help="documents to draw from")
    parser.add_argument("--doc-tokens", type=int, default=120, help="about this many tokens each")
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity exponent")
    parser.add_argument("--shares", default="0.15", help="recompute shares compared (commas)")
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument(
        "--noise-floor",
        action="store_true",
        help="quality: also compare the same request without reuse (tokenized whole, exact)",
    )
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench/results/document_kv_reuse.json"))
    return parser.parse_args(argv)


def document_pool(size: int, tokens: int, rng: random.Random) -> list[tuple[RagDocument, str]]:
    """(document, a question its text answers) pairs, each document about ``tokens`` tokens long."""
    pool = []
    for i in range(size):
        place, thing = f"{rng.choice(PLACES)}-{i}", rng.choice(THINGS)
        year, length = rng.randint(1700, 1990), rng.randint(20, 900)
        facts = [
            f"The {thing} of {place} was completed in {year}.",
            f"It is {length} metres long and was designed by the engineer Ada {rng.choice(PLACES)}.",
        ]
        sentences = list(facts)
        while len(" ".join(sentences).split()) * 4 // 3 < tokens:
            sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(FILLER))
        document = RagDocument(
            id=f"doc-{i:02d}", title=f"{place} {thing}", text=" ".join(sentences)
        )
        pool.append((document, f"When was the {thing} of {place} completed?"))
    return pool


def prompts(args: argparse.Namespace, count: int, rng: random.Random) -> list[tuple[list, str]]:
    """(documents in prompt order, question) per prompt: zipf-popular documents, shuffled."""
    pool = document_pool(args.pool, args.doc_tokens, rng)
    weights = [1 / (rank + 1) ** args.zipf for rank in range(len(pool))]
    result = []
    for _ in range(count):
        chosen: dict[int, None] = {}
        while len(chosen) < min(args.documents, len(pool)):
            chosen[rng.choices(range(len(pool)), weights)[0]] = None
        order = list(chosen)
        rng.shuffle(order)
        result.append(([pool[i][0] for i in order], pool[rng.choice(order)][1]))
    return result


def request(
    request_id: str,
    documents: list[RagDocument],
    question: str,
    params: SamplingParams,
    reuse: bool,
) -> GenerationRequest:
    template = load_template("default@1")
    messages = render_messages(template, documents, [{"role": "user", "content": question}])
    reusable = tuple(render_document(template, d) for d in documents) if reuse else ()
    return GenerationRequest(request_id, params, messages=messages, reusable_documents=reusable)


async def answer(engine: TransformersEngine, generation: GenerationRequest) -> dict:
    started = time.perf_counter()
    first, text, first_top, usage = None, "", None, None
    async for delta in await engine.generate(generation):
        if first is None:
            first = time.perf_counter() - started
        if first_top is None and delta.logprobs:
            first_top = delta.logprobs[0]
        text += delta.text
        usage = delta
    return {
        "ttft_s": first,
        "text": text,
        "first": first_top,
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": usage.cached_tokens,
    }


def kl_top(reference, candidate) -> float:
    """KL(reference || candidate) over the reference's top tokens plus one bucket for the rest; a
    token missing from the candidate's list gets the least probability the candidate listed."""
    ref = {token: math.exp(logprob) for token, logprob in reference.top}
    cand = {token: math.exp(logprob) for token, logprob in candidate.top}
    floor = min(cand.values())
    divergence = sum(p * math.log(p / cand.get(t, floor)) for t, p in ref.items() if p > 0)
    ref_rest = max(1e-12, 1 - sum(ref.values()))
    cand_rest = max(1e-12, 1 - sum(cand.get(t, floor) for t in ref))
    return max(0.0, divergence + ref_rest * math.log(ref_rest / cand_rest))


async def engine_with(args: argparse.Namespace, model: str, share: float) -> TransformersEngine:
    engine = TransformersEngine(
        EngineSettings(
            model=model,
            device=args.device,
            document_kv_recompute_share=share,
            max_num_batched_tokens=max(8192, args.documents * args.doc_tokens * 6),
        )
    )
    await engine.start()
    return engine


async def quality(args: argparse.Namespace, model: str) -> list[dict]:
    # (share, reuse): the shares blend; the noise floor is the request without reuse (tokenized
    # whole, computed exactly), compared the same way.
    compared = [(float(s), True) for s in args.shares.split(",")]
    if args.noise_floor:
        compared.append((1.0, False))
    engines = [await engine_with(args, model, share) for share in [1.0, *(s for s, _ in compared)]]
    params = SamplingParams(max_tokens=args.answer_tokens, temperature=0.0, logprobs=20)
    rows: list[list[dict]] = [[] for _ in compared]
    try:
        for index, (documents, question) in enumerate(
            prompts(args, args.prompts, random.Random(args.seed))
        ):
            generation = request(f"q{index}", documents, question, params, reuse=True)
            plain = request(f"q{index}", documents, question, params, reuse=False)
            reference = await answer(engines[0], generation)
            for row, engine, (_, reuse) in zip(rows, engines[1:], compared):
                reused = await answer(engine, generation if reuse else plain)
                row.append(
                    {
                        "kl": kl_top(reference["first"], reused["first"]),
                        "same_answer": reused["text"] == reference["text"],
                        "same_first_token": reused["first"].token == reference["first"].token,
                        "cached_tokens": reused["cached_tokens"],
                        "prompt_tokens": reused["prompt_tokens"],
                    }
                )
        stats = [engine.stats().kv_cache for engine in engines[1:]]
    finally:
        for engine in engines:
            await engine.aclose()
    summary = []
    for (share, reuse), row, kv in zip(compared, rows, stats):
        kls = sorted(r["kl"] for r in row)
        summary.append(
            {
                "share": share if reuse else None,  # None: the noise floor, no reuse
                "prompts": len(row),
                "kl_median": round(statistics.median(kls), 5),
                "kl_p95": round(kls[int(0.95 * (len(kls) - 1))], 5),
                "identical_answers": round(statistics.mean(r["same_answer"] for r in row), 3),
                "same_first_token": round(statistics.mean(r["same_first_token"] for r in row), 3),
                "mean_prompt_tokens": round(statistics.mean(r["prompt_tokens"] for r in row)),
                "document_hits": kv.document_hits,
                "document_misses": kv.document_misses,
                "tokens_reused": kv.document_tokens_reused,
                "tokens_recomputed": kv.document_tokens_recomputed,
            }
        )
    return summary


async def speed(args: argparse.Namespace, model: str) -> dict:
    share = float(args.shares.split(",")[0])
    engine = await engine_with(args, model, share)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    rng = random.Random(args.seed + 1)
    cold, reused, plain, prompt_tokens = [], [], [], []
    try:
        sets = prompts(args, args.sets + 1, rng)
        warm_documents, warm_question = sets[0]  # first-call allocations and lazy kernels
        await answer(engine, request("warm", warm_documents, warm_question, params, reuse=False))
        for index, (documents, question) in enumerate(sets[1:]):
            first = await answer(engine, request(f"c{index}", documents, question, params, True))
            cold.append(first["ttft_s"])
            shuffled = documents[1:] + documents[:1]  # another first document: no prefix hit
            timed = await answer(engine, request(f"r{index}", shuffled, question, params, True))
            full = await answer(engine, request(f"p{index}", shuffled, question, params, False))
            reused.append(timed["ttft_s"])
            plain.append(full["ttft_s"])
            prompt_tokens.append(full["prompt_tokens"])
    finally:
        await engine.aclose()
    return {
        "share": share,
        "sets": args.sets,
        "mean_prompt_tokens": round(statistics.mean(prompt_tokens)),
        "ttft_ms_full_prefill": round(1000 * statistics.median(plain), 1),
        "ttft_ms_reused": round(1000 * statistics.median(reused), 1),
        "ttft_ms_first_sight": round(1000 * statistics.median(cold), 1),
        "reused_over_full": round(statistics.median(r / p for r, p in zip(reused, plain)), 3),
    }


async def main(args: argparse.Namespace) -> dict:
    model = args.model
    if args.random:
        model = str(build_random_checkpoint(args.random, args.random_dir / args.random))
    report: dict = {
        "benchmark": "document_kv_reuse",
        "model": args.random or args.model,
        "random_weights": bool(args.random),
        "device": args.device,
        "machine": platform.processor() or platform.machine(),
        "documents": args.documents,
        "pool": args.pool,
        "doc_tokens": args.doc_tokens,
        "zipf": args.zipf,
    }
    if not args.skip_quality:
        report["quality"] = await quality(args, model)
    if not args.skip_speed:
        report["speed"] = await speed(args, model)
    return report


def print_table(report: dict) -> None:
    for row in report.get("quality", []):
        label = "no reuse" if row["share"] is None else f"share {row['share']:.2f}"
        print(
            f"{label:<10}  {row['prompts']} prompts of ~{row['mean_prompt_tokens']} "
            f"tokens  KL median {row['kl_median']:.4f} p95 {row['kl_p95']:.4f}  identical answers "
            f"{100 * row['identical_answers']:.1f}%  same first token "
            f"{100 * row['same_first_token']:.1f}%  hits {row['document_hits']} misses "
            f"{row['document_misses']}"
        )
    speed = report.get("speed")
    if speed:
        print(
            f"first token, {speed['mean_prompt_tokens']}-token prompts (median of {speed['sets']}): "
            f"full prefill {speed['ttft_ms_full_prefill']} ms, reused "
            f"{speed['ttft_ms_reused']} ms ({speed['reused_over_full']:.2f}x), first sight "
            f"{speed['ttft_ms_first_sight']} ms"
        )


if __name__ == "__main__":
    arguments = parse_args()
    result = asyncio.run(main(arguments))
    print_table(result)
    write_report(arguments.json, result)
