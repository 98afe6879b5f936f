"""Aggregate output tokens/s of the in-process engine at several concurrency levels, in one run.

Each level starts N streams at once (same prompt length, same output length, end-of-sequence
ignored) and measures from the first submission to the last token. The speed-up of N streams over
one shows what continuous batching buys on this machine.

    python bench/engine_throughput.py                                  # packaged model, this CPU
    python bench/engine_throughput.py --random qwen2.5-1.5b --concurrency 1,8,32,64   # e.g. on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine_args import add_engine_arguments, synthetic_prompt  # noqa: E402
from bench.report import write_report  # noqa: E402
from ragllm.config import EngineSettings  # noqa: E402
from ragllm.engines.inprocess.engine import TransformersEngine  # noqa: E402
from ragllm.generation import GenerationRequest, SamplingParams  # noqa: E402
from ragllm.testing.random_checkpoints import build_random_checkpoint  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_arguments(parser, concurrency="1,4,8", json_name="engine_throughput.json")
    return parser.parse_args(argv)


async def run_level(
    engine: TransformersEngine, concurrency: int, prompt: list[int], max_tokens: int
) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(index: int) -> tuple[float, float, int]:
        start = time.perf_counter()
        stream = await engine.generate(
            GenerationRequest(f"bench-{concurrency}-{index}", params, prompt_token_ids=prompt)
        )
        first = None
        tokens = 0
        async for delta in stream:
            if first is None and delta.num_tokens:
                first = time.perf_counter() - start
            tokens = delta.completion_tokens
        return first, time.perf_counter() - start, tokens

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(concurrency)))
    wall = time.perf_counter() - started
    total_tokens = sum(tokens for _, _, tokens in results)
    return {
        "concurrency": concurrency,
        "output_tokens": total_tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(total_tokens / wall, 1),
        "per_stream_tokens_per_s": round(statistics.mean(t / e for _, e, t in results), 1),
        "mean_ttft_ms": round(1000 * statistics.mean(f for f, _, _ in results), 1),
    }


async def main(args: argparse.Namespace) -> dict:
    levels = [int(level) for level in args.concurrency.split(",")]
    model = args.model
    if args.random:
        model = str(build_random_checkpoint(args.random, args.random_dir / args.random))
    widest = max(levels)
    settings = EngineSettings(
        model=model,
        device=args.device,
        max_num_seqs=widest,
        max_batch_size=widest,
        max_num_batched_tokens=max(1024, args.prompt_tokens),
        max_waiting=widest,
    )
    engine = TransformersEngine(settings)
    await engine.start()
    try:
        prompt = synthetic_prompt(args.prompt_tokens)
        await run_level(engine, 1, prompt, 4)  # warm-up: first-call allocations, lazy kernels
        rows = [await run_level(engine, level, prompt, args.max_tokens) for level in levels]
    finally:
        await engine.aclose()
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_vs_first"] = round(row["tokens_per_s"] / base, 2)
    return {
        "benchmark": "engine_throughput",
        "model": args.random or args.model,
        "random_weights": bool(args.random),
        "device": engine.device_name,
        "dtype": engine.dtype_name,
        "machine": platform.processor() or platform.machine(),
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "rows": rows,
    }


def print_table(report: dict) -> None:
    print(
        f"\nengine_throughput  model={report['model']}  device={report['device']}  dtype={report['dtype']}  "
        f"prompt={report['prompt_tokens']} tokens  output={report['max_tokens']} tokens/stream"
    )
    header = f"{'streams':>8} {'tokens':>8} {'wall s':>8} {'tok/s':>10} {'tok/s/stream':>13} {'TTFT ms':>9} {'x vs 1st':>9}"
    print(header)
    print("-" * len(header))
    for row in report["rows"]:
        print(
            f"{row['concurrency']:>8} {row['output_tokens']:>8} {row['wall_s']:>8} {row['tokens_per_s']:>10} "
            f"{row['per_stream_tokens_per_s']:>13} {row['mean_ttft_ms']:>9} {row['speedup_vs_first']:>9}"
        )


if __name__ == "__main__":
    arguments = parse_args()
    report = asyncio.run(main(arguments))
    print_table(report)
    write_report(arguments.json, report)
