"""Filling a batch's token masks on the host with llguidance, the ways the engine could call it,
side by side in one run: each row its own call, or the whole batch in one call on 1-N threads; the
rows' matchers copies of one compiled grammar (what the engine's grammar cache hands out) or each
compiled on its own; and, optionally, beside a Python thread that holds the GIL as a busy event loop
does.

Every variant walks the same path: N rows under the structured-outputs benchmark's schema, each
choosing the allowed token its own fixed random scores rank highest (as greedy decoding of random
weights does). Per-step fill times are reported as mean, median, p90 and worst, in ms.

    python bench/mask_fill.py                                # the packaged tokenizer
    python bench/mask_fill.py --tokenizer DIR --vocab 151936 # another tokenizer, logits this wide
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import write_report  # noqa: E402
from bench.structured_outputs import records_schema  # noqa: E402
from ragllm.engines.inprocess.sample.mask_kernel import masked_logits  # noqa: E402
from ragllm.structured.grammars import GrammarCompiler  # noqa: E402
from ragllm.structured.spec import structured_output_of  # noqa: E402

# The engine's GIL switch interval on a GPU (transformers_impl.GIL_SWITCH_INTERVAL_S).
SWITCH_INTERVAL_S = 0.0005


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer", type=Path, help="a tokenizer directory (default: the packaged model's)"
    )
    parser.add_argument("--vocab", type=int, help="logits width (default: the tokenizer's length)")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--threads", default="1,4,8,16", help="thread counts for the one-call fill")
    parser.add_argument(
        "--busy", action="store_true", help="also run each variant beside a GIL-holding thread"
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/mask_fill.json"))
    return parser.parse_args(argv)


def tokenizer_path(args: argparse.Namespace) -> Path:
    if args.tokenizer is not None:
        return args.tokenizer
    from ragllm.config import load_settings
    from ragllm.models import resolve_model

    engine = load_settings().engine
    return resolve_model(engine.model, engine.model_cache_dir)


class FillBench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(tokenizer_path(args))
        self.vocab = args.vocab or len(hf)
        self.compiler = GrammarCompiler(
            hf, self.vocab, frozenset()
        )  # the engine's, as it makes matchers
        self.spec = structured_output_of(
            {"guided_json": records_schema(label_max_length=16)}
        )  # as recorded
        self.rows, self.steps = args.rows, args.steps
        self.words = (self.vocab + 31) // 32
        self.scores = torch.randn(self.rows, self.vocab, generator=torch.Generator().manual_seed(0))
        self.template = self.compiler.grammar(self.spec).matcher

    def matchers(self, independent: bool) -> list:
        if independent:  # what the engine gives each request
            return [self.compiler.grammar(self.spec).matcher for _ in range(self.rows)]
        return [self.template.deep_copy() for _ in range(self.rows)]

    def run(self, threads: int | None, independent: bool, busy: bool) -> dict:
        """``threads`` None: a call per row; else one call for the batch on that many threads."""
        import llguidance
        import torch

        matchers = self.matchers(independent)
        bitmask = torch.full((self.rows, self.words), -1, dtype=torch.int32)
        row_bytes = self.words * bitmask.element_size()
        executor = llguidance.LLExecutor(num_threads=threads) if threads else None
        stop = threading.Event()
        holder = threading.Thread(target=_hold_the_gil, args=(stop,)) if busy else None
        if holder:
            holder.start()
        times = []
        try:
            for _ in range(self.steps):
                started = time.perf_counter()
                if executor is not None:
                    executor.unsafe_compute_mask_ptr(
                        [(m, i) for i, m in enumerate(matchers)],
                        bitmask.data_ptr(),
                        row_bytes,
                        self.rows,
                    )
                else:
                    for i, matcher in enumerate(matchers):
                        matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), row_bytes)
                times.append(time.perf_counter() - started)
                chosen = masked_logits(self.scores, bitmask).argmax(dim=1).tolist()
                for matcher, token in zip(matchers, chosen):
                    matcher.consume_token(token)
        finally:
            stop.set()
            if holder:
                holder.join()
        ordered = sorted(times)
        return {
            "call": f"one call, {threads} thread(s)" if threads else "a call per row",
            "matchers": "independent" if independent else "copies of one",
            "busy_gil": busy,
            "mean_ms": round(statistics.mean(times) * 1e3, 3),
            "p50_ms": round(ordered[len(ordered) // 2] * 1e3, 3),
            "p90_ms": round(ordered[int(len(ordered) * 0.9)] * 1e3, 3),
            "max_ms": round(ordered[-1] * 1e3, 3),
        }


def _hold_the_gil(stop: threading.Event) -> None:
    """Pure Python work without a pause, as an event loop handing over a step's deltas."""
    while not stop.is_set():
        total = 0
        for i in range(2000):
            total += i


def main(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)  # the walk's own tensor work stays off the fill's cores
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    bench = FillBench(args)
    started = time.perf_counter()
    bench.matchers(independent=True)
    compile_ms = (time.perf_counter() - started) / bench.rows * 1e3
    bench.run(None, independent=False, busy=False)  # warm-up: the shared lexer's states get built
    thread_counts = [int(count) for count in args.threads.split(",")]
    rows = []
    for busy in (False, True) if args.busy else (False,):
        for independent in (False, True):
            for threads in (None, *thread_counts):
                rows.append(bench.run(threads, independent, busy))
    return {
        "benchmark": "mask_fill",
        "tokenizer": str(tokenizer_path(args)),
        "vocab": bench.vocab,
        "rows": args.rows,
        "steps": args.steps,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "independent_matcher_ms": round(compile_ms, 3),
        "variants": rows,
    }


def print_table(report: dict) -> None:
    print(
        f"\nmask_fill  {report['rows']} rows x {report['steps']} steps  vocab={report['vocab']}  "
        f"cpus={report['cpus']}  (an independent matcher costs {report['independent_matcher_ms']} ms to make)"
    )
    header = f"{'call':<22} {'matchers':<15} {'busy GIL':>9} {'mean':>8} {'p50':>8} {'p90':>8} {'max':>8}"
    print(header)
    print("-" * len(header))
    for row in report["variants"]:
        print(
            f"{row['call']:<22} {row['matchers']:<15} {row['busy_gil']!s:>9} {row['mean_ms']:>8} "
            f"{row['p50_ms']:>8} {row['p90_ms']:>8} {row['max_ms']:>8}"
        )


if __name__ == "__main__":
    arguments = parse_args()
    report = main(arguments)
    print_table(report)
    write_report(arguments.json, report)
