"""The in-process engine's KV cache on a GPU, at a 32k-token window with 4k-token prompts: decode
tokens/s at 1, 32 and 64 streams, time to first token, and how many sequences a fixed KV memory
budget runs at once. Run once per engine build, side by side in one device session: the same
script drives whichever ``ragllm`` is first on the path (an older tree through ``PYTHONPATH``), and
tells a paged build from a slot build by its settings.

    python bench/kv_paging.py --json bench/results/kv_paging.json [--capacity-slots 16]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(
    str(Path(__file__).resolve().parents[1])
)  # after PYTHONPATH: an older tree may come first
# After ragllm, so the build under test (PYTHONPATH) is the one loaded.
from bench.gpu_workload import block_tables, random_prompt, timed  # noqa: E402
from ragllm.config import EngineSettings  # noqa: E402
from ragllm.engines.inprocess.engine import TransformersEngine  # noqa: E402
from ragllm.generation import GenerationRequest, SamplingParams  # noqa: E402
from ragllm.testing.random_checkpoints import ARCHITECTURES, build_random_checkpoint  # noqa: E402

PROMPT_TOKENS = 4096
DECODE_TOKENS = 128
WINDOW = 32768
# The slot build's cache held every sequence slot plus a scratch slot and 4 prefix slots, each a window.
SLOT_EXTRA = 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="qwen2.5-1.5b", choices=sorted(ARCHITECTURES))
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/ragllm-bench-models"))
    parser.add_argument(
        "--capacity-slots",
        type=int,
        default=16,
        help="the budget of the capacity run: what this many slots of the slot build take",
    )
    parser.add_argument("--json", type=Path, required=True)
    return parser.parse_args()


def paged_build() -> bool:
    return "num_kv_blocks" in EngineSettings.model_fields


def kv_bytes_per_token(config: dict) -> int:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 2  # bf16


async def stream(engine, request_id: str, prompt: list[int], max_tokens: int) -> list[float]:
    """Arrival time of every token."""
    request = GenerationRequest(
        request_id,
        SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens),
        prompt_token_ids=prompt,
    )
    times: list[float] = []
    async for delta in await engine.generate(request):
        times.extend([time.perf_counter()] * delta.num_tokens)
    return times


def steady_decode_rate(runs: list[list[float]]) -> float:
    """Tokens/s while every stream decodes: from the last stream's first token to the first stream's end."""
    start, end = max(times[0] for times in runs), min(times[-1] for times in runs)
    tokens = sum(1 for times in runs for t in times if start < t <= end)
    return tokens / (end - start)


async def throughput(model_dir: Path, vocab: int, per_token: int) -> dict:
    settings = dict(
        model=str(model_dir),
        device="cuda",
        dtype="bfloat16",
        max_num_seqs=64,
        max_batch_size=64,
        max_num_batched_tokens=4096,
        max_model_len=WINDOW,
        max_waiting=256,
    )
    if paged_build():  # the same KV bytes as the slot build's 64 sequences
        settings["kv_cache_memory_bytes"] = (64 + SLOT_EXTRA) * WINDOW * per_token
        settings["enable_prefix_caching"] = (
            False  # random prompts share nothing; measure the attention path
        )
    else:
        settings["prefix_cache_slots"] = 4
    engine = TransformersEngine(EngineSettings(**settings))
    await engine.start()
    results: dict = {"settings": settings, "decode_tok_s": {}, "ttft_ms": {}}
    await stream(engine, "warm", random_prompt(PROMPT_TOKENS, vocab, 99), 8)
    for length in (512, 2048, PROMPT_TOKENS):
        each = []
        for attempt in range(5):
            start = time.perf_counter()
            each.append(
                (
                    (
                        await stream(
                            engine,
                            f"t{length}-{attempt}",
                            random_prompt(length, vocab, 1000 + attempt),
                            1,
                        )
                    )[0]
                    - start
                )
                * 1e3
            )
        results["ttft_ms"][length] = statistics.median(each)
    single = [
        await stream(engine, f"single-{i}", random_prompt(PROMPT_TOKENS, vocab, i), 256)
        for i in range(3)
    ]
    results["decode_tok_s"][1] = statistics.median((len(t) - 1) / (t[-1] - t[0]) for t in single)
    for batch in (32, 64):
        runs = await asyncio.gather(
            *(
                stream(
                    engine,
                    f"c{batch}-{i}",
                    random_prompt(PROMPT_TOKENS, vocab, 5000 + i),
                    DECODE_TOKENS,
                )
                for i in range(batch)
            )
        )
        results["decode_tok_s"][batch] = steady_decode_rate(runs)
    results["decode_step_ms"] = {
        batch: step_ms(engine.worker.runner, batch) for batch in (1, 32, 64)
    }
    await engine.aclose()
    return results


def step_ms(runner, batch: int, steps: int = 50) -> float:
    """One decode step of the runner alone at position 4,096 (graph replay; no scheduler, no host
    work per token): the device's part of a step. The engine is idle, so any cache memory may be written."""
    tokens, positions = [5] * batch, [PROMPT_TOKENS] * batch
    # The paged build takes each row's block table; the slot build the first of its slots 0..batch-1.
    where = block_tables(runner, batch, PROMPT_TOKENS + 1) if paged_build() else 0
    runner.decode(where, tokens, positions)
    return (
        timed(lambda: [runner.decode(where, tokens, positions) for _ in range(steps)]) / steps * 1e3
    )


async def capacity(model_dir: Path, vocab: int, slots: int, per_token: int) -> dict:
    """Sequences running at once in the KV bytes the slot build needs for ``slots`` sequences."""
    budget = (slots + SLOT_EXTRA) * WINDOW * per_token
    streams = 4 * slots
    engine = TransformersEngine(
        EngineSettings(
            model=str(model_dir),
            device="cuda",
            dtype="bfloat16",
            max_num_seqs=streams,
            max_batch_size=64,
            max_num_batched_tokens=8192,
            max_model_len=WINDOW,
            max_waiting=512,
            kv_cache_memory_bytes=budget,
        )
    )
    await engine.start()
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, engine.stats().num_running)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    start = time.perf_counter()
    runs = await asyncio.gather(
        *(
            stream(engine, f"cap-{i}", random_prompt(PROMPT_TOKENS, vocab, 7000 + i), DECODE_TOKENS)
            for i in range(streams)
        )
    )
    elapsed = time.perf_counter() - start
    done.set()
    await watcher
    # Time to first token of a 4,096-token prompt whose first 4,032 tokens (documents) were sent before,
    # against one whose documents are new: what prefix caching saves inside the engine.
    ttft: dict[str, list[float]] = {"cached_prefix": [], "uncached": []}
    for attempt in range(5):
        documents = random_prompt(PROMPT_TOKENS - 64, vocab, 9000 + attempt)
        for kind, prompt in (
            ("uncached", documents + random_prompt(64, vocab, 9100 + attempt)),
            ("cached_prefix", documents + random_prompt(64, vocab, 9200 + attempt)),
        ):
            start = time.perf_counter()
            ttft[kind].append(
                ((await stream(engine, f"p{kind}{attempt}", prompt, 1))[0] - start) * 1e3
            )
    kv = engine.stats().kv_cache
    await engine.aclose()
    return {
        "budget_gib": budget / (1 << 30),
        "slot_build_sequences": slots,
        "streams": streams,
        "ttft_4096_ms": {kind: statistics.median(each) for kind, each in ttft.items()},
        "peak_running": peak,
        "preemptions": kv.num_preemptions,
        "blocks_total": kv.blocks_total,
        "sequences_that_fit": kv.blocks_total * kv.block_size // (PROMPT_TOKENS + DECODE_TOKENS),
        "tokens": sum(len(t) for t in runs),
        "elapsed_s": elapsed,
    }


def main() -> None:
    args = parse_args()
    model_dir = build_random_checkpoint(args.architecture, args.model_dir / args.architecture)
    config = ARCHITECTURES[args.architecture][1]
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "build": "paged" if paged_build() else "slots",
        "architecture": args.architecture,
        "window": WINDOW,
        "prompt_tokens": PROMPT_TOKENS,
    }
    report["throughput"] = asyncio.run(
        throughput(model_dir, config["vocab_size"], kv_bytes_per_token(config))
    )
    gc.collect()  # the first engine's cache and graphs go before the second engine sizes its own
    torch.cuda.empty_cache()
    if paged_build():
        report["capacity"] = asyncio.run(
            capacity(
                model_dir, config["vocab_size"], args.capacity_slots, kv_bytes_per_token(config)
            )
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str))
    t = report["throughput"]
    print(
        f"{report['device']} · {report['build']} build · {WINDOW}-token window, {PROMPT_TOKENS}-token prompts"
    )
    print(
        f"{'decode tok/s 1 / 32 / 64':>28}: "
        + " / ".join(f"{t['decode_tok_s'][b]:,.0f}" for b in (1, 32, 64))
    )
    print(
        f"{'TTFT ms 512 / 2048 / 4096':>28}: "
        + " / ".join(f"{t['ttft_ms'][n]:.1f}" for n in (512, 2048, 4096))
    )
    print(
        f"{'step ms alone 1 / 32 / 64':>28}: "
        + " / ".join(f"{t['decode_step_ms'][b]:.2f}" for b in (1, 32, 64))
    )
    if "capacity" in report:
        c = report["capacity"]
        print(
            f"{'capacity':>28}: {c['peak_running']} running at once (slot build: {c['slot_build_sequences']}) in "
            f"{c['budget_gib']:.1f} GiB, {c['preemptions']} preemptions, {c['sequences_that_fit']} would fit"
        )
        print(
            f"{'TTFT 4096 uncached / cached':>28}: {c['ttft_4096_ms']['uncached']:.1f} / "
            f"{c['ttft_4096_ms']['cached_prefix']:.1f} ms (first 4,032 tokens sent before)"
        )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
