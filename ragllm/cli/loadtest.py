"""``ragllm loadtest``: a bounded load against any OpenAI-compatible URL, with a table and JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from ragllm.config import DEFAULT_MODEL


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("loadtest", help="measure TTFT, ITL, TPOT, latency and throughput")
    parser.add_argument(
        "--url", default="http://127.0.0.1:8081", help="server base URL (without /v1)"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency", default="1,4,8", help="closed-loop clients per level, e.g. 1,4,16,32"
    )
    load.add_argument(
        "--rate", help="open loop: Poisson arrivals per second per level, e.g. 0.5,1,2"
    )
    parser.add_argument("--requests", type=int, help="requests per level")
    parser.add_argument("--duration", type=float, help="seconds per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--context-words", type=int, default=400, help="size of the shared document context"
    )
    parser.add_argument("--doc-sets", type=int, default=4, help="distinct document sets")
    parser.add_argument(
        "--repeat-rate", type=float, default=0.75, help="share of requests reusing a set"
    )
    parser.add_argument(
        "--prompt-file", type=Path, help="one prompt per line instead of RAG-shaped prompts"
    )
    parser.add_argument(
        "--json", type=Path, default=Path("loadtest.json"), help="where to write the report"
    )
    parser.add_argument(
        "--png", type=Path, help="where to draw the plot (default: the JSON path with .png)"
    )
    parser.add_argument(
        "--compare", type=Path, help="an earlier report to print the change against"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ragllm.loadtest.generator import Bounds, run_level
    from ragllm.loadtest.plot import plot_report
    from ragllm.loadtest.report import comparison, report_json
    from ragllm.loadtest.workload import Workload, as_dict

    console = Console(
        width=None if sys.stdout.isatty() else 160
    )  # logs and CI: keep the table whole
    try:
        bounds = Bounds(requests=args.requests, duration_s=args.duration)
    except ValueError as exc:
        console.print(f"ragllm loadtest: {exc}")
        return 2
    prompts = args.prompt_file.read_text().splitlines() if args.prompt_file else None
    workload = Workload(
        model=args.model,
        max_tokens=args.max_tokens,
        context_words=args.context_words,
        doc_sets=args.doc_sets,
        repeat_rate=args.repeat_rate,
        prompts=prompts,
    )
    levels = (
        [("rate", float(v)) for v in args.rate.split(",")]
        if args.rate
        else [("concurrency", int(v)) for v in args.concurrency.split(",")]
    )
    results = asyncio.run(_run_levels(console, args.url, workload, bounds, levels, run_level))
    console.print(_table(results))
    if any("repeated" in level for level in results):
        console.print(_repeats_table(results))
    settings = {
        "url": args.url,
        "requests": args.requests,
        "duration_s": args.duration,
        **as_dict(workload),
    }
    args.json.write_bytes(report_json(results, settings))
    png = plot_report(
        results, args.png or args.json.with_suffix(".png"), title=f"ragllm loadtest: {args.url}"
    )
    console.print(f"wrote {args.json} and {png}")
    if args.compare:
        old = json.loads(args.compare.read_text())
        new = json.loads(args.json.read_text())
        console.print(_comparison_table(comparison(old, new)))
    return 0 if all(level["completed"] for level in results) else 1


async def _run_levels(
    console: Any, url: str, workload: Any, bounds: Any, levels: list, run_level: Any
) -> list:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        for kind, value in levels:
            task = progress.add_task(f"{kind}={value}", total=bounds.requests)
            results.append(
                await run_level(
                    url,
                    workload,
                    bounds,
                    on_done=lambda t=task: progress.advance(t),
                    **{kind: value},
                )
            )
    return results


def _table(levels: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="ragllm loadtest (ms; tokens/s)")
    for column in (
        "level",
        "ok/err",
        "req/s",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "ITL p50",
        "ITL p99",
        "latency p50",
        "latency p90",
        "latency p99",
    ):
        table.add_column(column, justify="right")
    for level in levels:
        name = f"c={level['concurrency']}" if "concurrency" in level else f"{level['rate']}/s"
        table.add_row(
            name,
            f"{level['completed']}/{level['errors']}",
            str(level["requests_per_s"]),
            str(level["output_tokens_per_s"]),
            _ms(level["ttft_ms"]["p50"]),
            _ms(level["ttft_ms"]["p99"]),
            _ms(level["tpot_ms"]["p50"]),
            _ms(level["itl_ms"]["p50"]),
            _ms(level["itl_ms"]["p99"]),
            _ms(level["latency_ms"]["p50"]),
            _ms(level["latency_ms"]["p90"]),
            _ms(level["latency_ms"]["p99"]),
        )
    return table


def _repeats_table(levels: list[dict[str, Any]]) -> Any:
    """Requests whose documents the server saw before, against first sends: what prefix caching buys."""
    from rich.table import Table

    table = Table(title="repeated document sets (ms)")
    for column in (
        "level",
        "repeats",
        "TTFT p50 repeat",
        "TTFT p50 first",
        "cached share of repeats' prompts",
        "prefix-cache hit rate (metrics)",
    ):
        table.add_column(column, justify="right")
    for level in levels:
        if "repeated" not in level:
            continue
        name = f"c={level['concurrency']}" if "concurrency" in level else f"{level['rate']}/s"
        share, rate = level["repeated_cached_share"], level.get("prefix_cache_hit_rate")
        table.add_row(
            name,
            str(level["repeated"]),
            _ms(level["ttft_repeated_ms"]["p50"]),
            _ms(level["ttft_first_ms"]["p50"]),
            "-" if share is None else f"{share:.1%}",
            "-" if rate is None else f"{rate:.1%}",
        )
    return table


def _comparison_table(rows: list) -> Any:
    from rich.table import Table

    table = Table(title="change against the earlier report")
    for column in ("level", "metric", "before", "after", "change"):
        table.add_column(column, justify="right")
    for level, metric, before, after in rows:
        change = "-" if not before or after is None else f"{(after - before) / before:+.1%}"
        table.add_row(level, metric, _ms(before), _ms(after), change)
    return table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
