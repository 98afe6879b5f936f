"""The in-process engine on a GPU against Hugging Face `generate` and transformers' `generate_batch`,
side by side in one run, on random weights of a real architecture (default Qwen2.5-1.5B, bf16).

Measures single-stream decode tokens/s, time to first token (median of 5 prompts) for 512- and
2,048-token prompts and for a 2,048-token prompt whose first 1,984 tokens were seen before, aggregate
tokens/s at 8, 32 and 64 concurrent streams (median of 3 batches; also the rate once every stream has
its first token, and the engine thread's phases per step), the fraction of the memory-bandwidth floor a single
stream reaches, and the same model end to end through `ragllm serve` (HTTP, streaming) at concurrency
1 and 32, to show what the service layer costs.

    python bench/gpu_engine.py [--architecture qwen2.5-1.5b] [--skip-serve]

``--profile`` adds where a prefill's and a decode step's GPU time goes (``--serial-launch`` for times
that add up: kernels then wait for the one before them to end before they launch).

``--variants`` runs only our engine, four times side by side: bf16 and AWQ int4 weights of the
architecture (the AWQ checkpoint written in the published layout), each with a bf16 and an fp8 KV
cache; it reports each one's weight and KV bytes, the fraction of its own bandwidth floor a single
stream reaches, and the AWQ/bf16 ratios.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gpu_workload import (  # noqa: E402
    DECODE_TOKENS,
    PROMPT_TOKENS,
    TTFT_ATTEMPTS,
    block_tables,
    copy_bandwidth,
    random_prompt,
    timed,
)
from bench.hf_baseline import hf_generate, hf_generate_batch  # noqa: E402
from bench.host_profile import PhaseTimes  # noqa: E402
from bench.serve_end_to_end import serve_end_to_end  # noqa: E402
from ragllm.config import EngineSettings  # noqa: E402
from ragllm.engines.inprocess.engine import TransformersEngine  # noqa: E402
from ragllm.engines.inprocess.layers import kernels  # noqa: E402
from ragllm.generation import GenerationRequest, SamplingParams  # noqa: E402
from ragllm.testing.random_checkpoints import ARCHITECTURES, build_random_checkpoint  # noqa: E402

CONCURRENCY = (8, 32, 64)
AGGREGATE_TRIALS = (
    3  # each concurrency's rate is the median of this many batches (one varies by ±10%)
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="qwen2.5-1.5b", choices=sorted(ARCHITECTURES))
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/ragllm-bench-models"))
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--skip-hf", action="store_true", help="only our engine")
    parser.add_argument(
        "--skip-serve", action="store_true", help="no end-to-end run through ragllm serve"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print the top kernels of a prefill and a decode step",
    )
    parser.add_argument(
        "--serial-launch",
        action="store_true",
        help="launch each kernel only after the one before it ends (no dependent launch)",
    )
    parser.add_argument(
        "--variants", action="store_true", help="bf16 and AWQ weights × bf16 and fp8 KV, ours only"
    )
    parser.add_argument(
        "--streams",
        default=",".join(map(str, CONCURRENCY)),
        help="concurrent streams of the aggregate runs, comma-separated (empty: none)",
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/gpu_engine.json"))
    return parser.parse_args()


# -- our engine ------------------------------------------------------------------------------------------
async def ours(
    model_dir: Path,
    vocab: int,
    max_model_len: int,
    profile: bool = False,
    kv_cache_dtype: str | None = None,
) -> dict:
    settings = EngineSettings(
        model=str(model_dir),
        device="cuda",
        dtype="bfloat16",
        max_num_seqs=64,
        max_batch_size=64,
        max_num_batched_tokens=8192,
        max_model_len=max_model_len,
        max_waiting=256,
        kv_cache_dtype=kv_cache_dtype,
    )
    engine = TransformersEngine(settings)
    started = time.perf_counter()
    await engine.start()
    results: dict = {"start_s": time.perf_counter() - started, "ttft_ms": {}, "aggregate_tok_s": {}}

    async def stream(request_id: str, prompt: list[int], max_tokens: int) -> list[float]:
        """Arrival time of every token."""
        request = GenerationRequest(
            request_id,
            SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens),
            prompt_token_ids=prompt,
        )
        times: list[float] = []
        deltas = await engine.generate(request)
        async for delta in deltas:
            times.extend([time.perf_counter()] * delta.num_tokens)
        return times

    async def first_token_s(request_id: str, prompt: list[int]) -> float:
        start = time.perf_counter()
        return (await stream(request_id, prompt, 1))[0] - start

    await stream("warm", random_prompt(PROMPT_TOKENS, vocab, 99), 8)
    results["ttft_ms_each"] = {}
    for length in (512, 2048):
        each = [
            await first_token_s(
                f"ttft-{length}-{attempt}", random_prompt(length, vocab, 1000 + attempt)
            )
            * 1e3
            for attempt in range(TTFT_ATTEMPTS)
        ]
        results["ttft_ms"][length] = statistics.median(each)
        results["ttft_ms_each"][length] = each
    # The same documents with other questions: the prompt prefix is reused.
    documents = random_prompt(1984, vocab, 7)
    await stream("prefix-primer", documents + random_prompt(64, vocab, 8), 1)
    each = [
        await first_token_s(f"prefix-{attempt}", documents + random_prompt(64, vocab, 9 + attempt))
        * 1e3
        for attempt in range(TTFT_ATTEMPTS)
    ]
    results["ttft_ms"]["2048_shared_prefix"] = statistics.median(each)
    results["ttft_ms_each"]["2048_shared_prefix"] = each
    rates = []
    for attempt in range(3):
        times = await stream(
            f"single-{attempt}", random_prompt(PROMPT_TOKENS, vocab, 1 + attempt), DECODE_TOKENS
        )
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    results["single_stream_tok_s"] = statistics.median(rates)
    results["decode_tok_s"], results["host_phases_ms"], results["aggregate_tok_s_each"] = {}, {}, {}
    for batch in CONCURRENCY:
        rates, decode_rates = [], []
        with PhaseTimes(engine.worker) as phases:
            for trial in range(AGGREGATE_TRIALS):
                start = time.perf_counter()
                runs = await asyncio.gather(
                    *(
                        stream(
                            f"c{batch}-{trial}-{i}",
                            random_prompt(PROMPT_TOKENS, vocab, 5000 + 100 * trial + i),
                            DECODE_TOKENS,
                        )
                        for i in range(batch)
                    )
                )
                rates.append(sum(len(t) for t in runs) / (time.perf_counter() - start))
                # Once every stream has its first token: decoding alone, without the prompts' prefill.
                decoding_from = max(t[0] for t in runs)
                later = sum(1 for t in runs for arrival in t if arrival > decoding_from)
                decode_rates.append(later / (max(t[-1] for t in runs) - decoding_from))
        results["aggregate_tok_s"][batch] = statistics.median(rates)
        results["aggregate_tok_s_each"][batch] = rates
        results["decode_tok_s"][batch] = statistics.median(decode_rates)
        # The engine thread's phases, ms a step as wall/CPU (``PhaseTimes``), those it spent time in.
        results["host_phases_ms"][batch] = {
            phase: value for phase, value in phases.per_step_ms().items() if value != "0.000/0.000"
        }
    runner = engine.worker.runner
    results["weight_bytes"] = weight_bytes(runner.model)
    results["kv_bytes_per_token"] = runner.bytes_per_block // runner.block_size
    results["kv_cache_tokens"] = runner.cache.num_blocks * runner.block_size
    results["decode_step_ms"] = {batch: step_time(runner, batch) * 1e3 for batch in (1, 32, 64)}
    results["prefill_ms"] = prefill_times(runner, vocab)
    if profile:
        profile_kernels(runner, vocab)
    await engine.aclose()
    return results


def weight_bytes(model) -> int:
    """Bytes a decode step reads at least: every parameter and buffer once (the tied output head is the
    embedding, counted once; AWQ layers' packed weights, zero points and scales are buffers)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def prefill_times(runner, vocab: int) -> dict:
    """The runner's prefill alone (no scheduler), and a continuation after a reused prefix."""
    table = block_tables(runner, 1, 2048)[0]
    times = {}
    for length in (512, 2048):
        prompt = random_prompt(length, vocab, 77 + length)
        runner.prefill(table, prompt, 0)
        times[length] = min(timed(lambda: runner.prefill(table, prompt, 0)) for _ in range(3)) * 1e3
    prompt = random_prompt(2048, vocab, 78)
    times["2048_after_1984_reused"] = (
        min(timed(lambda: runner.prefill(table, prompt[1984:], 1984)) for _ in range(3)) * 1e3
    )
    return times


def profile_kernels(runner, vocab: int) -> None:
    """Per kernel, GPU time a step (or a prefill) and launches, from the profiler's trace; and the step's
    span from its first kernel's start to its last one's end. With dependent launch a kernel starts
    before the one ahead of it ends and waits, so its time includes that wait: run with
    ``--serial-launch`` for times that add up to the step."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    prompt = random_prompt(2048, vocab, 79)
    table = block_tables(runner, 1, 2048)[0]
    tables = block_tables(runner, 32, 301)
    for name, count, work in (
        ("prefill 2048", 1, lambda: runner.prefill(table, prompt, 0)),
        (
            "decode step, batch 1, position 300",
            20,
            lambda: [runner.decode([table], [5], [300]) for _ in range(20)],
        ),
        (
            "decode step, batch 32, position 300",
            20,
            lambda: [runner.decode(tables, [5] * 32, [300] * 32) for _ in range(20)],
        ),
    ):
        work()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            work()
            torch.cuda.synchronize()
        with tempfile.NamedTemporaryFile(suffix=".json") as trace:
            prof.export_chrome_trace(trace.name)
            kernels = sorted(
                (
                    event
                    for event in json.load(open(trace.name))["traceEvents"]
                    if event.get("cat") == "kernel"
                ),
                key=lambda event: event["ts"],
            )
        span = (kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]) / count
        totals: dict[str, list[float]] = {}
        for event in kernels:
            entry = totals.setdefault(event["name"][:70], [0, 0.0])
            entry[0] += 1
            entry[1] += event["dur"]
        busy = sum(total for _, total in totals.values()) / count
        print(
            f"--- {name}: span {span:.1f} µs, kernel time {busy:.1f} µs, {len(kernels) / count:.0f} kernels"
        )
        for kernel, (launches, total) in sorted(totals.items(), key=lambda item: -item[1][1]):
            print(
                f"  {total / count:9.1f} µs {launches / count:6.0f} x {total / launches:7.2f} µs  {kernel}"
            )


def step_time(runner, batch: int, steps: int = 50) -> float:
    """One decode step of the runner alone (graph replay or eager), without the scheduler."""
    tokens, positions = [5] * batch, [PROMPT_TOKENS] * batch
    tables = block_tables(runner, batch, PROMPT_TOKENS + 1)
    runner.decode(tables, tokens, positions)
    return timed(lambda: [runner.decode(tables, tokens, positions) for _ in range(steps)]) / steps


VARIANTS = (("bf16", None), ("bf16", "fp8"), ("awq", None), ("awq", "fp8"))


def run_variants(args: argparse.Namespace, report: dict, save) -> None:
    vocab = ARCHITECTURES[args.architecture][1]["vocab_size"]
    directories = {
        "bf16": build_random_checkpoint(args.architecture, args.model_dir / args.architecture),
        "awq": build_random_checkpoint(
            args.architecture, args.model_dir / f"{args.architecture}-awq", quantization="awq"
        ),
    }
    report["variants"] = {}
    for weights, kv in VARIANTS:
        name = f"{weights} weights, {kv or 'bf16'} KV"
        result = asyncio.run(
            ours(
                directories[weights],
                vocab,
                args.max_model_len,
                args.profile and weights == "awq",
                kv_cache_dtype=kv,
            )
        )
        result["bandwidth_floor_tok_s"] = report["bandwidth_gb_s"] * 1e9 / result["weight_bytes"]
        result["fraction_of_floor"] = (
            result["single_stream_tok_s"] / result["bandwidth_floor_tok_s"]
        )
        report["variants"][name] = result
        gc.collect()  # the engine's cycles (thread, closures) hold its KV cache until collected
        torch.cuda.empty_cache()
        save()
    print_variants(report)
    for name, r in report["variants"].items():
        print(
            f"{name}: decoding alone (after every stream's first token) "
            f"{ {c: round(v) for c, v in r['decode_tok_s'].items()} } tok/s; engine thread at 32 streams, ms a "
            f"step (wall/CPU): {r['host_phases_ms'].get(32)}"
        )


def print_variants(report: dict) -> None:
    print(
        f"\n{report['architecture']} on {report['device']}; copy bandwidth {report['bandwidth_gb_s']:.0f} GB/s"
    )
    header = (
        f"{'variant':<24}{'weights GB':>11}{'KV B/token':>11}{'KV tokens':>11}{'1 stream':>10}{'floor':>7}"
        f"{'TTFT 512':>10}{'TTFT 2048':>11}"
        + "".join(f"{f'{c} streams':>12}" for c in CONCURRENCY)
        + f"{'step 1 (ms)':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, r in report["variants"].items():
        print(
            f"{name:<24}{r['weight_bytes'] / 1e9:>11.2f}{r['kv_bytes_per_token']:>11,}{r['kv_cache_tokens']:>11,}"
            f"{r['single_stream_tok_s']:>10.0f}{r['fraction_of_floor']:>7.0%}{r['ttft_ms'][512]:>8.1f}ms"
            f"{r['ttft_ms'][2048]:>9.1f}ms"
            + "".join(f"{r['aggregate_tok_s'][c]:>12.0f}" for c in CONCURRENCY)
            + f"{r['decode_step_ms'][1]:>12.3f}"
        )
    variants = report["variants"]
    awq, bf16 = variants["awq weights, bf16 KV"], variants["bf16 weights, bf16 KV"]
    at_32 = awq["aggregate_tok_s"].get(32, float("nan")) / bf16["aggregate_tok_s"].get(
        32, float("nan")
    )
    print(
        f"AWQ/bf16 single stream: {awq['single_stream_tok_s'] / bf16['single_stream_tok_s']:.2f}x; 32 streams: "
        f"{at_32:.2f}x; fp8/bf16 KV bytes per token: "
        f"{variants['awq weights, fp8 KV']['kv_bytes_per_token'] / awq['kv_bytes_per_token']:.2f}"
    )


def main() -> None:
    global CONCURRENCY
    args = parse_args()
    CONCURRENCY = tuple(int(count) for count in args.streams.split(",") if count)
    torch.manual_seed(0)
    if args.serial_launch:
        kernels.DEPENDENT_LAUNCH = False
    model_dir = build_random_checkpoint(args.architecture, args.model_dir / args.architecture)
    vocab = ARCHITECTURES[args.architecture][1]["vocab_size"]
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "architecture": args.architecture,
        "torch": torch.__version__,
        "streams": list(CONCURRENCY),
        "bandwidth_gb_s": copy_bandwidth() / 1e9,
        "dependent_launch": kernels.DEPENDENT_LAUNCH,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every phase, so a run cut short still leaves what it measured
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(
            json.dumps({k: v for k, v in report.items() if isinstance(v, dict)}, default=str)[
                -1500:
            ],
            flush=True,
        )

    if args.variants:
        run_variants(args, report, save)
        print(f"wrote {args.json}")
        return
    from transformers import AutoModelForCausalLM

    if (
        not args.skip_serve
    ):  # first, while the GPU is free: the in-process engine below keeps its KV pool
        report["ragllm_serve"] = serve_end_to_end(
            model_dir, args.max_model_len, args.json.with_suffix(".serve.log")
        )
        save()
    report["ragllm"] = asyncio.run(ours(model_dir, vocab, args.max_model_len, args.profile))
    torch.cuda.empty_cache()
    save()
    if not args.skip_hf:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
        ).cuda()
        report["weights_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        floor = (
            report["bandwidth_gb_s"] / report["weights_gb"]
        )  # tokens/s if only the weights were read
        report["bandwidth_floor_tok_s"] = floor
        report["ragllm"]["fraction_of_floor"] = report["ragllm"]["single_stream_tok_s"] / floor
        report["hf_generate"] = hf_generate(model, vocab, CONCURRENCY)
        report["hf_generate"]["fraction_of_floor"] = (
            report["hf_generate"]["single_stream_tok_s"] / floor
        )
        save()
        report["hf_generate_batch"] = hf_generate_batch(model, vocab, CONCURRENCY)
        save()
    print_table(report)
    print(f"wrote {args.json}")


def print_table(report: dict) -> None:
    print(
        f"\n{report['architecture']} bf16 random weights on {report['device']} (torch {report['torch']}); "
        f"copy bandwidth {report['bandwidth_gb_s']:.0f} GB/s"
    )
    header = (
        f"{'engine':<22}{'1 stream':>10}{'floor':>7}{'TTFT 512':>10}{'TTFT 2048':>11}"
        + "".join(f"{f'{c} streams':>12}" for c in CONCURRENCY)
    )
    print(header)
    print("-" * len(header))
    for name in ("hf_generate", "hf_generate_batch", "ragllm"):
        r = report.get(name)
        if r is None:
            continue
        if "error" in r:
            print(f"{name:<22}failed: {r['error']}")
            continue
        single = r.get("single_stream_tok_s")
        cells = [
            f"{single:>10.0f}" if single else f"{'-':>10}",
            f"{r['fraction_of_floor']:>7.0%}" if "fraction_of_floor" in r else f"{'-':>7}",
        ]
        ttft = r.get("ttft_ms", {})
        cells += [
            f"{ttft[512]:>8.1f}ms" if 512 in ttft else f"{'-':>10}",
            f"{ttft[2048]:>9.1f}ms" if 2048 in ttft else f"{'-':>11}",
        ]
        cells += [f"{r['aggregate_tok_s'].get(c, float('nan')):>12.0f}" for c in CONCURRENCY]
        print(f"{name:<22}" + "".join(cells))
    ours = report["ragllm"]
    print(
        f"\nragllm: TTFT for 2,048 tokens sharing a 1,984-token prefix with the previous prompt: "
        f"{ours['ttft_ms']['2048_shared_prefix']:.1f} ms; decode step alone (ms): {ours['decode_step_ms']}; "
        f"prefill alone (ms): {ours['prefill_ms']}; "
        f"TTFT of each prompt (ms): {_rounded(ours['ttft_ms_each'])}; "
        f"engine start {ours['start_s']:.1f} s"
    )
    if "ragllm_serve" in report:
        for concurrency, r in report["ragllm_serve"].items():
            if concurrency == "error":
                print(f"ragllm serve failed: {r}")
                continue
            if concurrency == "prompt_tokens":
                print(f"ragllm serve prompts (tokens, as its usage counted them): {r}")
                continue
            print(
                f"ragllm serve (HTTP, streaming) at {concurrency}: {r['aggregate_tok_s']:.0f} tok/s, "
                f"median TTFT {r['ttft_ms_median']:.1f} ms"
            )


def _rounded(samples: dict) -> dict:
    return {key: [round(value, 1) for value in values] for key, values in samples.items()}


if __name__ == "__main__":
    main()
