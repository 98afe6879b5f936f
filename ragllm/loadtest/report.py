"""The load test's report: each level summarized (percentiles of TTFT, TPOT, ITL and latency;
throughput; repeats against first sends), written as JSON and compared against an earlier report.

TPOT is (latency - TTFT) / (output tokens - 1), as `vllm bench serve` computes it.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from ragllm.loadtest.generator import RequestResult


def _percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def at(percent: float) -> float:
        return round(
            ordered[min(len(ordered) - 1, int(round(percent / 100 * (len(ordered) - 1))))] * scale,
            3,
        )

    return {
        "mean": round(statistics.mean(ordered) * scale, 3),
        "p50": at(50),
        "p90": at(90),
        "p99": at(99),
    }


def summarize(results: list[RequestResult], duration_s: float, **level: Any) -> dict[str, Any]:
    good = [r for r in results if r.ok]
    tpots = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]
    output_tokens = sum(r.output_tokens for r in good)
    return {
        **{k: v for k, v in level.items() if v is not None},
        "requests": len(results),
        "completed": len(good),
        "errors": len(results) - len(good),
        "error_samples": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": round(duration_s, 3),
        "requests_per_s": round(len(good) / duration_s, 3) if duration_s else 0.0,
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / duration_s, 2) if duration_s else 0.0,
        "ttft_ms": _percentiles([r.ttft_s for r in good]),
        "tpot_ms": _percentiles(tpots),
        "itl_ms": _percentiles([gap for r in good for gap in r.itl_s]),
        "latency_ms": _percentiles([r.latency_s for r in good]),
        **_repeats(good),
    }


def _repeats(good: list[RequestResult]) -> dict[str, Any]:
    """Requests whose documents were sent before against those sending theirs the first time: time to
    first token of each, and the share of the repeats' prompt tokens the server reported cached."""
    repeated = [r for r in good if r.repeated]
    if not repeated:
        return {}
    prompt_tokens = sum(r.prompt_tokens for r in repeated)
    return {
        "repeated": len(repeated),
        "repeated_prompt_tokens": prompt_tokens,
        "ttft_repeated_ms": _percentiles([r.ttft_s for r in repeated]),
        "ttft_first_ms": _percentiles([r.ttft_s for r in good if not r.repeated]),
        "repeated_cached_share": round(sum(r.cached_tokens for r in repeated) / prompt_tokens, 4)
        if prompt_tokens
        else None,
    }


def report_json(levels: list[dict[str, Any]], settings: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {"tool": "ragllm loadtest", "settings": settings, "levels": levels},
        option=orjson.OPT_INDENT_2,
    )


def comparison(
    old: dict[str, Any], new: dict[str, Any]
) -> list[tuple[str, str, float | None, float | None]]:
    """Matching levels' key figures, old against new: (level, metric, old, new)."""
    rows = []
    old_levels = {_level_name(level): level for level in old["levels"]}
    for level in new["levels"]:
        name = _level_name(level)
        before = old_levels.get(name)
        if before is None:
            continue
        for metric, pick in (
            ("output tok/s", lambda x: x["output_tokens_per_s"]),
            ("TTFT p50 ms", lambda x: x["ttft_ms"]["p50"]),
            ("TPOT p50 ms", lambda x: x["tpot_ms"]["p50"]),
            ("latency p99 ms", lambda x: x["latency_ms"]["p99"]),
        ):
            rows.append((name, metric, pick(before), pick(level)))
    return rows


def _level_name(level: dict[str, Any]) -> str:
    return f"c={level['concurrency']}" if "concurrency" in level else f"rate={level['rate']}/s"
