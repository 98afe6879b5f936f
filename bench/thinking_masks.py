"""What holding a constraint after the thinking costs: token masks of a bare constraint and of the
same constraint behind a bounded thinking (``structured/thinking_first.py``), side by side in one
run, over the packaged tokenizer taught ``<think>`` and ``</think>`` as tokens of their own.

Each variant walks N rows through the benchmark's records schema (16-character labels) and the
constrained-citation pattern, every row choosing the allowed token its own fixed random scores rank
highest (as greedy decoding of random weights does); the wrapped rows first think for the budget,
which the grammar then ends. Masks are filled as the engine fills them (one call per step over
matchers of their own); times are per step, in ms, split into the thinking steps and the answer
steps, with the time to make one matcher.

    python bench/thinking_masks.py
    python bench/thinking_masks.py --rows 32 --budget 256 --answer-steps 128
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import write_report  # noqa: E402
from bench.structured_outputs import records_schema  # noqa: E402
from ragllm.engines.inprocess.sample.mask_kernel import masked_logits  # noqa: E402
from ragllm.rag.citations import citation_pattern  # noqa: E402
from ragllm.structured.grammars import GrammarCompiler  # noqa: E402
from ragllm.structured.spec import StructuredOutput, structured_output_of  # noqa: E402
from ragllm.structured.thinking_first import (  # noqa: E402
    ThinkingGrammar,
    thinking_markers,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--budget", type=int, default=64, help="thinking tokens of wrapped rows")
    parser.add_argument("--answer-steps", type=int, default=64)
    parser.add_argument("--json", type=Path, default=Path("bench/results/thinking_masks.json"))
    return parser.parse_args(argv)


def thinking_tokenizer():
    """The packaged model's tokenizer with the thinking markers added (as Qwen3's has them)."""
    from transformers import AutoTokenizer

    from ragllm.config import load_settings
    from ragllm.models import resolve_model

    engine = load_settings().engine
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(engine.model, engine.model_cache_dir))
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def constraints() -> dict[str, StructuredOutput]:
    return {
        "records schema": structured_output_of({"guided_json": records_schema(16)}),
        "citations": StructuredOutput(
            "regex", citation_pattern(["bridge", "ferry", "weather"], "I cannot tell."), "rag"
        ),
    }


def walk(compiler, spec, thinking, rows: int, steps: int, scores) -> dict:
    """``rows`` matchers walked for ``steps`` tokens; each step's fill time by phase."""
    import llguidance
    import torch

    started = time.perf_counter()
    grammars = [compiler.grammar(spec, thinking) for _ in range(rows)]
    make_ms = (time.perf_counter() - started) / rows * 1e3
    words = (scores.shape[1] + 31) // 32
    bitmask = torch.full((rows, words), -1, dtype=torch.int32)
    executor = llguidance.LLExecutor()
    close_id = thinking.markers.close_id if thinking is not None else None
    answering = [thinking is None] * rows
    fills: dict[str, list[float]] = {"thinking": [], "answer": []}
    for _ in range(steps):
        started = time.perf_counter()
        executor.unsafe_compute_mask_ptr(
            [(g.matcher, i) for i, g in enumerate(grammars)], bitmask.data_ptr(), words * 4, rows
        )
        fills["answer" if all(answering) else "thinking"].append(time.perf_counter() - started)
        chosen = masked_logits(scores, bitmask).argmax(dim=1).tolist()
        for row, (grammar, token) in enumerate(zip(grammars, chosen)):
            if grammar.finished:
                continue
            grammar.accept(token)
            answering[row] = answering[row] or token == close_id
    return {"matcher_ms": round(make_ms, 3), **{k: _summary(v) for k, v in fills.items() if v}}


def _summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "steps": len(times),
        "mean_ms": round(statistics.mean(times) * 1e3, 4),
        "p50_ms": round(ordered[len(ordered) // 2] * 1e3, 4),
        "p90_ms": round(ordered[int(len(ordered) * 0.9)] * 1e3, 4),
        "max_ms": round(ordered[-1] * 1e3, 4),
    }


def main(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    tokenizer = thinking_tokenizer()
    markers = thinking_markers(tokenizer)
    compiler = GrammarCompiler(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    scores = torch.randn(args.rows, len(tokenizer), generator=torch.Generator().manual_seed(0))
    scores[:, markers.close_id] = -1e9  # the model never ends its thinking: the budget does
    variants = []
    for name, spec in constraints().items():
        compiler.grammar(spec)  # compiled once, as the engine's cache would hold it
        for thinking in (None, ThinkingGrammar(markers, True, args.budget)):
            steps = args.answer_steps + (args.budget + 1 if thinking is not None else 0)
            result = walk(compiler, spec, thinking, args.rows, steps, scores)
            variants.append({"constraint": name, "after_thinking": thinking is not None, **result})
    return {
        "benchmark": "thinking_masks",
        "vocab": len(tokenizer),
        "rows": args.rows,
        "budget": args.budget,
        "answer_steps": args.answer_steps,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "variants": variants,
    }


def print_table(report: dict) -> None:
    print(
        f"\nthinking_masks  {report['rows']} rows  thinking budget {report['budget']}  "
        f"{report['answer_steps']} answer steps  vocab={report['vocab']}  cpus={report['cpus']}"
    )
    header = (
        f"{'constraint':<16} {'after thinking':>14} {'matcher':>8} {'phase':>9} "
        f"{'mean':>8} {'p50':>8} {'p90':>8} {'max':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in report["variants"]:
        for phase in ("thinking", "answer"):
            if phase in row:
                stats = row[phase]
                print(
                    f"{row['constraint']:<16} {row['after_thinking']!s:>14} "
                    f"{row['matcher_ms']:>8} {phase:>9} {stats['mean_ms']:>8} "
                    f"{stats['p50_ms']:>8} {stats['p90_ms']:>8} {stats['max_ms']:>8}"
                )


if __name__ == "__main__":
    arguments = parse_args()
    report = main(arguments)
    print_table(report)
    write_report(arguments.json, report)
