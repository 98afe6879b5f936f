"""The engine's host work per decode step, with the model taken out: what the scheduler, token masks,
detokenizing and delta hand-over cost a step of N rows, free and constrained, side by side in one
run. On a GPU this work runs while the device computes the next step, and once it takes longer
than the device it sets the pace (32 free rows of Qwen2.5-1.5B on an H200: 2.2 ms a step on the
host against 1.7 on the device), so every microsecond here is one the device may wait for.

The runner is a double that returns fixed random logits at once (named ``InstantRunner``): the
forward pass is not what is measured. Sampling and masking still run as tensor work on this CPU
(on a GPU they are kernels the host only launches), so each figure is an upper bound of the host's
share; compare rows within one run.

    python bench/host_overhead.py                 # 32 rows, the packaged model's tokenizer
    python bench/host_overhead.py --rows 8,32 --steps 256
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

from bench.engine_args import synthetic_prompt  # noqa: E402
from bench.report import write_report  # noqa: E402
from bench.structured_outputs import RECORDS  # noqa: E402
from ragllm.config import EngineSettings  # noqa: E402
from ragllm.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from ragllm.engines.transformers_impl import TransformersEngine  # noqa: E402
from ragllm.structured.spec import structured_output_of  # noqa: E402

ROUNDS = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=128, help="decode steps per batch")
    parser.add_argument("--json", type=Path, default=Path("bench/results/host_overhead.json"))
    return parser.parse_args(argv)


class InstantEngine(TransformersEngine):
    """The in-process engine with its runner replaced by ``InstantRunner``."""

    def _runner(self, model, max_model_len: int, model_path: str):
        import torch

        from ragllm.engines.model_runner import KVCacheOptions, ModelRunner

        width = model.get_output_embeddings().weight.shape[0]
        logits = torch.randn(256, width, generator=torch.Generator().manual_seed(0))

        class InstantRunner(ModelRunner):
            """A runner double: fixed random logits at once, for every row."""

            def decode(self, block_tables, token_ids, positions):
                return logits[: len(block_tables)]

            def prefill_many(self, chunks):
                return [logits[0] for _ in chunks]

        return InstantRunner(model, max_model_len, KVCacheOptions(num_blocks=8192))


async def run_batch(engine: InstantEngine, constrained: list[bool], steps: int, tag: str) -> float:
    """Wall time per decode step of one batch (from every row's 8th token to the end)."""
    spec = structured_output_of({"guided_json": RECORDS})
    prompt = synthetic_prompt(32)
    marks: list[float] = []

    async def one(index: int, with_grammar: bool) -> None:
        params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True,
                                structured=spec if with_grammar else None)
        stream = await engine.generate(GenerationRequest(f"{tag}-{index}", params, prompt_token_ids=prompt))
        async for delta in stream:
            if delta.completion_tokens >= 8 and len(marks) == index:
                marks.append(time.perf_counter())

    first = engine._scheduler.num_steps
    await asyncio.gather(*(one(i, c) for i, c in enumerate(constrained)))
    done = time.perf_counter()
    steps_taken = engine._scheduler.num_steps - first
    return (done - max(marks)) / max(1, steps_taken - 8 - len(constrained))


def without_fill_ahead(engine: InstantEngine) -> None:
    """The engine as it was before masks were filled ahead: each step fills its own masks."""
    engine._scheduler._fill_masks_ahead = lambda batch, tokens: None


async def main(args: argparse.Namespace) -> dict:
    levels = [int(level) for level in args.rows.split(",")]
    widest = max(levels)
    engine = InstantEngine(EngineSettings(device="cpu", max_num_seqs=widest, max_batch_size=widest,
                                          max_num_batched_tokens=4096, max_waiting=widest, max_queue_wait_s=None))
    await engine.start()
    engine._scheduler.launch_ahead = True  # as on a GPU: the next step is launched before this one is recorded
    fill_ahead = engine._scheduler._fill_masks_ahead
    rows = []
    try:
        await run_batch(engine, [False, True], 16, "warm")
        for level in levels:
            shapes = {"free": [False] * level, "json": [True] * level, "mixed": [i % 2 == 1 for i in range(level)]}
            times: dict[str, list[float]] = {}
            for round_index in range(ROUNDS):
                for name, shape in shapes.items():
                    for ahead in (False, True):
                        if ahead:
                            engine._scheduler._fill_masks_ahead = fill_ahead
                        else:
                            without_fill_ahead(engine)
                        key = f"{name}, masks filled {'ahead' if ahead else 'in the step'}"
                        if name == "free" and not ahead:
                            continue  # free rows have no masks: one variant
                        step = await run_batch(engine, shape, args.steps, f"{name}-{level}-{round_index}-{ahead}")
                        times.setdefault(key if name != "free" else "free", []).append(step)
            for key, values in times.items():
                rows.append({"rows": level, "variant": key, "ms_per_step": round(statistics.median(values) * 1e3, 3)})
    finally:
        engine._scheduler._fill_masks_ahead = fill_ahead
        await engine.aclose()
    return {"benchmark": "host_overhead", "steps": args.steps, "rounds": ROUNDS,
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "rows": rows}


def print_table(report: dict) -> None:
    print(f"\nhost_overhead  {report['steps']} steps a batch, medians of {report['rounds']} rounds, "
          f"runner double (no forward pass)")
    header = f"{'rows':>5} {'variant':<34} {'ms/step':>9} {'x free':>7}"
    print(header)
    print("-" * len(header))
    free = {row["rows"]: row["ms_per_step"] for row in report["rows"] if row["variant"] == "free"}
    for row in report["rows"]:
        print(f"{row['rows']:>5} {row['variant']:<34} {row['ms_per_step']:>9} "
              f"{row['ms_per_step'] / free[row['rows']]:>7.2f}")


if __name__ == "__main__":
    arguments = parse_args()
    report = asyncio.run(main(arguments))
    print_table(report)
    write_report(arguments.json, report)
