"""Structured outputs in the in-process engine: constrained against unconstrained decoding, side by
side in one run, and what compiling a grammar costs the first time and from the cache.

At each concurrency N, three batches run in turn (three rounds, medians reported):
  free   N unconstrained streams (greedy, end-of-sequence ignored);
  json   N streams under a JSON Schema that cannot end before the token budget (a long list of
         records, ``records_schema``), so both produce the same number of tokens;
  mixed  N/2 of each in one batch: the free rows' decode rate (from their 8th token, when every
         row decodes) against the free batch's shows what the constrained neighbours cost them.
Each stream's prompt ends in tokens of its own, so the answers differ as different users' do
(``--same-prompt``: one prompt for all, identical answers in lockstep, as runs before 2026-11-27).

    python bench/structured_outputs.py                        # packaged model, this CPU
    python bench/structured_outputs.py --random qwen2.5-1.5b --tokenizer DIR --device cuda --concurrency 1,8,32
      # random weights on a GPU; DIR holds a byte-level tokenizer (tokenizer.json, tokenizer_config.json)
      # for the grammar, since the random checkpoint's own word-level one cannot spell JSON
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine_args import add_engine_arguments, synthetic_prompt  # noqa: E402
from bench.host_profile import HostProfile, PhaseTimes  # noqa: E402
from bench.report import write_report  # noqa: E402
from ragllm.config import EngineSettings  # noqa: E402
from ragllm.engines.inprocess.engine import TransformersEngine  # noqa: E402
from ragllm.generation import GenerationRequest, SamplingParams  # noqa: E402
from ragllm.structured.spec import StructuredOutput, structured_output_of  # noqa: E402
from ragllm.testing.random_checkpoints import build_random_checkpoint  # noqa: E402

ROUNDS = 3
OWN_TOKENS = 4  # the last prompt tokens that differ between streams
SETTLED_AFTER = 8  # tokens a row has before its rate is measured


def records_schema(label_max_length: int | None = None) -> dict:
    """A long list of records (an id, a label, a score, a flag), as an extraction step asks for; the
    label free text, or at most ``label_max_length`` characters. llguidance computes a mask inside a
    length-bounded string by walking the vocabulary at every position (0.1-0.4 ms a row on this
    machine's CPU against under 0.05 ms in a free string), so bounded labels are its worst case."""
    label = (
        {"type": "string"}
        if label_max_length is None
        else {"type": "string", "maxLength": label_max_length}
    )
    return {
        "type": "object",
        "required": ["records"],
        "properties": {
            "records": {
                "type": "array",
                "minItems": 500,
                "items": {
                    "type": "object",
                    "required": ["id", "label", "score", "ok"],
                    "properties": {
                        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
                        "label": label,
                        "score": {"type": "number", "minimum": 0, "maximum": 1},
                        "ok": {"type": "boolean"},
                    },
                },
            }
        },
    }


# Compile-time probes: a small and a nested schema, a regular expression and a grammar.
COMPILE_PROBES = {
    "schema, 2 fields": {
        "guided_json": {
            "type": "object",
            "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
        }
    },
    "schema, nested with $defs": {
        "guided_json": {
            "type": "object",
            "properties": {
                "claims": {"type": "array", "items": {"$ref": "#/$defs/Claim"}},
                "verdict": {"enum": ["supported", "refuted", "unknown"]},
            },
            "required": ["claims", "verdict"],
            "$defs": {
                "Claim": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string"},
                        "sources": {"type": "array", "items": {"type": "integer"}},
                        "date": {"type": "string", "format": "date"},
                    },
                    "required": ["text", "sources"],
                }
            },
        }
    },
    "regex": {"guided_regex": r"(Yes|No)\. [A-Z][a-z ]{0,60}\."},
    "grammar (GBNF)": {
        "guided_grammar": 'root ::= answer " [" id "]"\nanswer ::= [A-Za-z ]+\nid ::= [0-9]+'
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_arguments(parser, concurrency="1,8", json_name="structured_outputs.json")
    parser.add_argument(
        "--no-close-early",
        action="store_true",
        help="engine.grammar_close_early off: no closing search, and rows near their budget are "
        "sampled on the device like the rest (to weigh what closing costs)",
    )
    parser.add_argument(
        "--tokenizer", type=Path, help="with --random: a directory with a byte-level tokenizer"
    )
    parser.add_argument(
        "--profile-host",
        type=int,
        default=0,
        metavar="TOP",
        help="after the measured rounds, profile one more batch of each shape at the widest "
        "concurrency and print the TOP functions by own time of the engine thread "
        "and the event loop",
    )
    parser.add_argument(
        "--label-max-length",
        type=int,
        default=None,
        metavar="N",
        help="bound the records' labels to N characters (llguidance's costliest masks; "
        "runs before 2026-11-27 used 16)",
    )
    parser.add_argument(
        "--same-prompt",
        action="store_true",
        help="every stream the same prompt, as runs before 2026-11-27 had: identical answers "
        "whose grammars reach each state in lockstep",
    )
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="Python's GIL switch interval for the run (the engine lowers it to "
        "GIL_SWITCH_INTERVAL_S on a GPU, never raises it)",
    )
    parser.add_argument(
        "--phase-times",
        action="store_true",
        help="after the measured rounds, time the engine thread's phases per step (masks, "
        "recording, waiting for tokens...) in one more batch of each shape at the widest "
        "concurrency; cheap enough to keep the host/device balance a profiler upsets",
    )
    return parser.parse_args(argv)


def model_path(args: argparse.Namespace) -> str:
    if not args.random:
        return args.model
    weights = build_random_checkpoint(args.random, args.random_dir / args.random)
    if args.tokenizer is None:
        sys.exit("--random needs --tokenizer: the random checkpoint's tokenizer cannot spell JSON")
    target = args.random_dir / f"{args.random}-{args.tokenizer.name}"
    target.mkdir(parents=True, exist_ok=True)
    for source in (*weights.iterdir(), *args.tokenizer.iterdir()):  # the tokenizer's files win
        if source.is_file() and not source.name.endswith(".safetensors"):
            shutil.copy(source, target / source.name)
    for weights_file in weights.glob("*.safetensors"):
        link = target / weights_file.name
        if not link.exists():
            link.symlink_to(weights_file.resolve())
    return str(target)


def stream_prompts(prompt: list[int], streams: int, same: bool) -> list[list[int]]:
    """Each stream's prompt: ``prompt`` with its last tokens the stream's own (unless ``same``), so the
    streams' answers differ as different users' do, and their grammars are not all in the same state
    at the same step (in lockstep, every row reaches the costliest state, the start of a free
    string, at once)."""
    if same:
        return [prompt] * streams
    return [
        prompt[:-OWN_TOKENS] + [10 + (stream * 37 + 11 * j) % 1000 for j in range(OWN_TOKENS)]
        for stream in range(streams)
    ]


async def run_batch(
    engine: TransformersEngine,
    constrained: list[bool],
    prompts: list[list[int]],
    max_tokens: int,
    tag: str,
    spec: StructuredOutput,
) -> dict:

    async def one(index: int, with_grammar: bool) -> tuple[bool, int, float]:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=not with_grammar,
            structured=spec if with_grammar else None,
        )
        stream = await engine.generate(
            GenerationRequest(f"{tag}-{index}", params, prompt_token_ids=prompts[index])
        )
        tokens, settled, settled_at = 0, None, 0.0
        async for delta in stream:
            tokens = delta.completion_tokens
            if settled is None and tokens >= SETTLED_AFTER:
                settled, settled_at = tokens, time.perf_counter()
        # The decode rate once every row of the batch decodes: rows join a step or two apart (a
        # grammar is fetched before its request is queued) and a neighbour's prefill must not count.
        if settled is None or tokens == settled:
            return with_grammar, tokens, None
        return with_grammar, tokens, (tokens - settled) / (time.perf_counter() - settled_at)

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i, c) for i, c in enumerate(constrained)))
    wall = time.perf_counter() - started

    def rate(kind: bool) -> float | None:
        rates = [r for c, _, r in results if c == kind and r is not None]
        return round(statistics.mean(rates), 2) if rates else None

    return {
        "tokens": sum(t for _, t, _ in results),
        "wall_s": wall,
        "tokens_per_s": sum(t for _, t, _ in results) / wall,
        "free_row_tokens_per_s": rate(False),
        "json_row_tokens_per_s": rate(True),
    }


async def compile_times(engine: TransformersEngine) -> list[dict]:
    compiler = engine.grammars
    rows = []
    for name, fields in COMPILE_PROBES.items():
        spec: StructuredOutput = structured_output_of(fields)
        first = time.perf_counter()
        await asyncio.to_thread(compiler.grammar, spec)
        first = time.perf_counter() - first
        cached = []
        for _ in range(5):
            start = time.perf_counter()
            await asyncio.to_thread(compiler.grammar, spec)
            cached.append(time.perf_counter() - start)
        rows.append(
            {
                "probe": name,
                "first_ms": round(first * 1e3, 2),
                "cached_ms": round(statistics.median(cached) * 1e3, 3),
            }
        )
    return rows


async def main(args: argparse.Namespace) -> dict:
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    levels = [int(level) for level in args.concurrency.split(",")]
    widest = max(levels)
    settings = EngineSettings(
        model=model_path(args),
        device=args.device,
        max_num_seqs=widest,
        max_batch_size=widest,
        max_num_batched_tokens=max(1024, args.prompt_tokens),
        max_waiting=widest,
        max_queue_wait_s=None,
        grammar_close_early=not args.no_close_early,
    )
    engine = TransformersEngine(settings)
    await engine.start()
    try:
        # The tokenizer's index is built once per engine, before any grammar: timed on its own.
        started = time.perf_counter()
        await asyncio.to_thread(engine.grammars.tokenizer_index)
        tokenizer_index_s = time.perf_counter() - started
        compiles = await compile_times(engine)
        spec = structured_output_of({"guided_json": records_schema(args.label_max_length)})
        prompts = stream_prompts(synthetic_prompt(args.prompt_tokens), widest, args.same_prompt)
        await run_batch(
            engine, [False, True], prompts, 4, "warm", spec
        )  # first-call allocations, lazy kernels
        engine.worker.sampler.masks.fill_seconds.clear()  # the fills reported are the measured batches' only
        rows = []
        for level in levels:
            shapes = {"free": [False] * level, "json": [True] * level}
            if level >= 2:
                shapes["mixed"] = [i % 2 == 1 for i in range(level)]
            runs: dict[str, list[dict]] = {name: [] for name in shapes}
            fills: list[float] = []
            for round_index in range(ROUNDS):  # interleaved, so drift hits every shape alike
                for name, shape in shapes.items():
                    runs[name].append(
                        await run_batch(
                            engine,
                            shape,
                            prompts,
                            args.max_tokens,
                            f"{name}-{level}-{round_index}",
                            spec,
                        )
                    )
                    if name == "json" and engine.worker.sampler.masks is not None:
                        fills += engine.worker.sampler.masks.fill_seconds
                        engine.worker.sampler.masks.fill_seconds.clear()
            rows.append({**summarise(level, runs), **fill_summary(fills)})
            if args.phase_times and level == widest:
                rows[-1]["phase_ms_per_step"] = await phase_times(
                    engine, shapes, prompts, args.max_tokens, spec
                )
            if args.profile_host and level == widest:
                for name, shape in shapes.items():
                    with HostProfile(engine.worker) as profile:
                        await run_batch(
                            engine, shape, prompts, args.max_tokens, f"profile-{name}", spec
                        )
                    print(
                        f"\n### host profile: {name}, {level} streams\n{profile.table(args.profile_host)}"
                    )
    finally:
        await engine.aclose()
    return {
        "benchmark": "structured_outputs",
        "model": args.random or args.model,
        "random_weights": bool(args.random),
        "tokenizer": str(args.tokenizer) if args.tokenizer else "the model's",
        "device": engine.device_name,
        "dtype": engine.dtype_name,
        "machine": platform.processor() or platform.machine(),
        "prompt_tokens": args.prompt_tokens,
        "same_prompt": args.same_prompt,
        "label_max_length": args.label_max_length,
        "switch_interval_ms": args.switch_interval_ms,
        "max_tokens": args.max_tokens,
        "rounds": ROUNDS,
        "tokenizer_index_s": round(tokenizer_index_s, 3),
        "compile": compiles,
        "rows": rows,
    }


async def phase_times(
    engine: TransformersEngine,
    shapes: dict[str, list[bool]],
    prompts: list[list[int]],
    max_tokens: int,
    spec: StructuredOutput,
) -> dict[str, dict]:
    """Each shape's engine-thread phases, ms per step (``PhaseTimes``), printed and returned."""
    times = {}
    masks = engine.worker.sampler.masks
    for name, shape in shapes.items():
        masks.fill_seconds.clear()
        with PhaseTimes(engine.worker) as phases:
            await run_batch(engine, shape, prompts, max_tokens, f"phases-{name}", spec)
        times[name] = phases.per_step_ms()
        # Where the slow fills fall in the answer: the first steps (each request's matcher starts
        # cold) or anywhere.
        fills = list(masks.fill_seconds)
        slowest = sorted(range(len(fills)), key=lambda i: -fills[i])[:8]
        times[name]["slowest fills (step: ms)"] = {
            i: round(fills[i] * 1e3, 2) for i in sorted(slowest)
        }
        print(
            f"phases, {name} x{len(shape)}: "
            + ", ".join(f"{k} {v}" for k, v in times[name].items())
        )
    return times


def fill_summary(fills: list[float]) -> dict:
    """Per-step mask fill times of the all-constrained batches: median, p90 and worst, in ms."""
    if not fills:
        return {}
    ordered = sorted(fills)
    return {
        "fill_ms_p50": round(ordered[len(ordered) // 2] * 1e3, 3),
        "fill_ms_p90": round(ordered[int(len(ordered) * 0.9)] * 1e3, 3),
        "fill_ms_max": round(ordered[-1] * 1e3, 3),
    }


def summarise(level: int, runs: dict[str, list[dict]]) -> dict:
    def median(name: str, key: str) -> float | None:
        values = [run[key] for run in runs.get(name, []) if run[key] is not None]
        return round(statistics.median(values), 2) if values else None

    row = {"concurrency": level}
    for name in runs:
        row[f"{name}_tokens_per_s"] = median(name, "tokens_per_s")
    row["json_vs_free"] = round(row["json_tokens_per_s"] / row["free_tokens_per_s"], 3)
    if "mixed" in runs:
        row["mixed_free_row_tokens_per_s"] = median("mixed", "free_row_tokens_per_s")
        row["free_row_tokens_per_s"] = median("free", "free_row_tokens_per_s")
        row["mixed_free_rows_vs_free"] = round(
            row["mixed_free_row_tokens_per_s"] / row["free_row_tokens_per_s"], 3
        )
    row["json_row_tokens_per_s"] = median("json", "json_row_tokens_per_s")
    row["free_row_tokens_per_s"] = median("free", "free_row_tokens_per_s")
    return row


def print_table(report: dict) -> None:
    print(
        f"\nstructured_outputs  model={report['model']}  device={report['device']}  dtype={report['dtype']}  "
        f"prompt={report['prompt_tokens']}  output={report['max_tokens']} tokens/stream  "
        f"medians of {report['rounds']} rounds"
    )
    header = (
        f"{'streams':>8} {'free tok/s':>11} {'json tok/s':>11} {'json/free':>10} "
        f"{'mixed tok/s':>12} {'free row in mixed / alone':>26} {'fill ms p50/p90/max':>22}"
    )
    print(header)
    print("-" * len(header))
    for row in report["rows"]:
        mixed = row.get("mixed_tokens_per_s", "-")
        ratio = row.get("mixed_free_rows_vs_free", "-")
        fill = f"{row.get('fill_ms_p50', '-')}/{row.get('fill_ms_p90', '-')}/{row.get('fill_ms_max', '-')}"
        print(
            f"{row['concurrency']:>8} {row['free_tokens_per_s']:>11} "
            f"{row['json_tokens_per_s']:>11} {row['json_vs_free']:>10} {mixed!s:>12} {ratio!s:>26} {fill:>22}"
        )
    print(
        f"\ngrammar compile  (tokenizer index, once per engine: {report['tokenizer_index_s'] * 1e3:.0f} ms)"
    )
    print(f"{'probe':<28} {'first ms':>9} {'cached ms':>10}")
    for row in report["compile"]:
        print(f"{row['probe']:<28} {row['first_ms']:>9} {row['cached_ms']:>10}")


if __name__ == "__main__":
    arguments = parse_args()
    report = asyncio.run(main(arguments))
    print_table(report)
    write_report(arguments.json, report)
