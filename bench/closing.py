"""What closing structured answers early costs the engine thread, beside what it already spends on
the same rows' token masks, in one run: a row's mask each step (what closing off costs) and, with
closing on, its look for a way out and the vetting of the model's token (each step of its last
``--window`` tokens, as the engine does both).

No model: each row is a runaway answer under its constraint (a string repeated until the budget,
as the packaged model writes them), with the repetition rule off so every step of the window looks.
Times are per row and step on this thread's CPU clock, in ms: mean, p90 and worst.

    python bench/closing.py                     # the packaged tokenizer
    python bench/closing.py --budget 200 --window 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import write_report  # noqa: E402
from ragllm.structured.closing import Closer, ClosingSearch, ClosingSettings  # noqa: E402
from ragllm.structured.grammars import GrammarCompiler  # noqa: E402
from ragllm.structured.spec import StructuredOutput  # noqa: E402
from ragllm.tools.formats import call_constraint  # noqa: E402
from ragllm.tools.request import ToolUse  # noqa: E402


def _nested(depth: int, width: int) -> dict:
    if depth == 0:
        return {"type": "string"}
    props = {f"p{i}": _nested(depth - 1, width) for i in range(width)}
    return {"type": "object", "properties": props, "required": list(props)}


def constraints() -> dict[str, StructuredOutput]:
    three = {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "summary": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["title", "summary", "tags"],
    }
    search = {
        "type": "function",
        "function": {
            "name": "search_documents",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "top_k": {"type": "integer"}},
                "required": ["query", "top_k"],
            },
        },
    }
    return {
        "json_schema (3 properties)": StructuredOutput("json_schema", json.dumps(three)),
        "json_object": StructuredOutput("json_object"),
        "required tool call": call_constraint("hermes", ToolUse([search], "required", None, None)),
        "json_schema (3 deep x 3 wide)": StructuredOutput("json_schema", json.dumps(_nested(3, 3))),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=120, help="max_tokens of each answer")
    parser.add_argument("--window", type=int, default=ClosingSettings().window)
    parser.add_argument("--rows", type=int, default=8, help="answers per constraint")
    parser.add_argument("--json", type=Path, default=Path("bench/results/closing.json"))
    return parser.parse_args(argv)


def runaway(tokenizer) -> list[int]:
    """What the row writes when it chooses: the first of these its grammar allows."""
    texts = ("architecture", "-", '{"', ' "', '"', "[", ", ", "1", "x")
    return [tokenizer.encode(text, add_special_tokens=False)[0] for text in texts]


def run_row(compiler, search, spec, tokens, budget, settings) -> tuple[list[float], list[float]]:
    """One answer: per step, the mask's CPU time, and the look's (steps that looked)."""
    grammar = compiler.grammar(spec)
    closer = Closer(grammar.matcher, search, settings)
    masks, looks = [], []
    written = 0
    while written < budget and not grammar.finished and not closer.closed:
        started = time.thread_time()
        mask = grammar.matcher.compute_bitmask()
        masks.append(time.thread_time() - started)
        started = time.thread_time()
        forced = closer.forced(budget - written)
        if forced is None:
            forced = closer.vetted(choose(grammar, tokens, mask, search), budget - written)
        if budget - written <= settings.window:
            looks.append(time.thread_time() - started)
        token = forced
        grammar.accept(token)
        closer.accepted(token)
        written += 1
    return masks, looks


def choose(grammar, tokens, mask: bytes, search) -> int:
    for token in tokens:
        if mask[token // 8] >> (token % 8) & 1:
            return token
    allowed = (i for i in range(search.vocab_size) if mask[i // 8] >> (i % 8) & 1)
    return next(i for i in allowed if search.token_bytes[i])


def summary(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds) or [0.0]
    return {
        "mean_ms": round(statistics.fmean(ms), 4),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 4),
        "max_ms": round(ms[-1], 4),
        "steps": len(seconds),
    }


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from ragllm.config import load_settings
    from ragllm.models import resolve_model

    args = parse_args(argv)
    engine = load_settings().engine
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(engine.model, engine.model_cache_dir))
    compiler = GrammarCompiler(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    started = time.perf_counter()
    search = ClosingSearch(compiler.tokenizer_index(), compiler.vocab_size)
    build_s = time.perf_counter() - started
    settings = ClosingSettings(window=args.window, repeat_tokens=0)
    tokens = runaway(tokenizer)
    results = {}
    print(f"{'constraint':32} {'mask (off) mean/p90/max':>26} {'look (on) mean/p90/max':>26}")
    for name, spec in constraints().items():
        masks, looks = [], []
        for _ in range(args.rows):
            row_masks, row_looks = run_row(compiler, search, spec, tokens, args.budget, settings)
            masks += row_masks
            looks += row_looks
        results[name] = {"mask": summary(masks), "look": summary(looks)}
        off, on = results[name]["mask"], results[name]["look"]
        print(
            f"{name:32} {off['mean_ms']:8.3f} {off['p90_ms']:8.3f} {off['max_ms']:8.3f} "
            f"{on['mean_ms']:8.3f} {on['p90_ms']:8.3f} {on['max_ms']:8.3f}"
        )
    print(f"vocabulary read once for the search: {build_s:.2f} s")
    write_report(
        args.json,
        {
            "bench": "closing",
            "args": {k: str(v) for k, v in vars(args).items()},
            "host": {"machine": platform.machine(), "python": platform.python_version()},
            "search_build_s": round(build_s, 3),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
