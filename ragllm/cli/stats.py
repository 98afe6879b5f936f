"""``ragllm stats``: a summary of the request log (the Redis Stream every replica appends to)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ragllm.config import load_settings

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("stats", help="summarise the request log kept in Redis")
    parser.add_argument(
        "--since", default="15m", help="window to summarise: 30s, 15m, 2h, 1d (default 15m)"
    )
    parser.add_argument("--redis-url", help="default: REDIS_URL")
    parser.set_defaults(run=run)


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}; use e.g. 30s, 15m, 2h, 1d")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class RagSummary:
    """RAG answers' counts from their ``rag_*`` fields (requests without documents have none)."""

    answers: int = 0
    documents_received: int = 0
    documents_dropped: int = 0
    citations_missing: int = 0
    declined: int = 0

    @classmethod
    def of(cls, entries: list[dict[str, str]]) -> RagSummary:
        answers = [e for e in entries if e.get("rag_template")]

        def total(name: str) -> int:
            return sum(int(e.get(name) or 0) for e in answers)

        return cls(
            answers=len(answers),
            documents_received=total("rag_documents_received"),
            documents_dropped=total("rag_documents_dropped"),
            citations_missing=total("rag_citations_missing"),
            declined=total("rag_declined"),
        )


@dataclass
class Summary:
    requests: int
    errors: int
    cancelled: int
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    completion_tokens: int
    tokens_per_s: float
    cache_hits: int
    cache_lookups: int
    rag: RagSummary = field(default_factory=RagSummary)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def cache_hit_rate(self) -> float | None:
        return self.cache_hits / self.cache_lookups if self.cache_lookups else None


def summarize(entries: list[dict[str, str]], window_s: float) -> Summary:
    """Errors are statuses >= 400 other than 499 (the client left, counted as cancelled)."""
    statuses = [int(e.get("status") or 0) for e in entries]
    ttfts = sorted(float(e["ttft_ms"]) for e in entries if e.get("ttft_ms"))
    latencies = sorted(float(e["latency_ms"]) for e in entries if e.get("latency_ms"))
    tokens = sum(int(e.get("completion_tokens") or 0) for e in entries if e.get("cache") != "hit")
    lookups = [e for e in entries if e.get("cache") in ("hit", "miss")]
    return Summary(
        requests=len(entries),
        errors=sum(1 for s in statuses if s >= 400 and s != 499),
        cancelled=sum(1 for s in statuses if s == 499),
        ttft_p50_ms=_percentile(ttfts, 50),
        ttft_p95_ms=_percentile(ttfts, 95),
        latency_p50_ms=_percentile(latencies, 50),
        latency_p95_ms=_percentile(latencies, 95),
        completion_tokens=tokens,
        tokens_per_s=tokens / window_s if window_s else 0.0,
        cache_hits=sum(1 for e in lookups if e["cache"] == "hit"),
        cache_lookups=len(lookups),
        rag=RagSummary.of(entries),
    )


def _percentile(ordered: list[float], percent: float) -> float | None:
    """Nearest-rank percentile."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * percent // 100))
    return ordered[int(rank) - 1]


def render(summary: Summary, since: str) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} ms"

    hit_rate = summary.cache_hit_rate
    rows = [
        ("window", since),
        ("requests", str(summary.requests)),
        ("error rate", f"{summary.error_rate:.1%} ({summary.errors})"),
        ("cancelled", str(summary.cancelled)),
        ("TTFT p50 / p95", f"{ms(summary.ttft_p50_ms)} / {ms(summary.ttft_p95_ms)}"),
        ("latency p50 / p95", f"{ms(summary.latency_p50_ms)} / {ms(summary.latency_p95_ms)}"),
        ("generated tokens/s", f"{summary.tokens_per_s:.2f} ({summary.completion_tokens} tokens)"),
        (
            "cache hit rate",
            "-"
            if hit_rate is None
            else f"{hit_rate:.1%} ({summary.cache_hits}/{summary.cache_lookups})",
        ),
        *_rag_rows(summary.rag),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _rag_rows(rag: RagSummary) -> list[tuple[str, str]]:
    def share(part: int, whole: int) -> str:
        return "-" if not whole else f"{part / whole:.1%} ({part}/{whole})"

    return [
        ("RAG answers", str(rag.answers)),
        ("RAG docs dropped", share(rag.documents_dropped, rag.documents_received)),
        ("RAG uncited", share(rag.citations_missing, rag.answers)),
        ("RAG declined", share(rag.declined, rag.answers)),
    ]


def run(args: argparse.Namespace) -> int:
    import redis

    settings = load_settings()
    url = args.redis_url or settings.redis.url
    if not url:
        print(
            "ragllm stats: the request log lives in Redis; set REDIS_URL or pass --redis-url",
            file=sys.stderr,
        )
        return 2
    window_s = parse_duration(args.since)
    start_ms = int((time.time() - window_s) * 1000)
    stream = f"{settings.redis.prefix}:{settings.request_log.stream}"
    client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
    try:
        entries = [fields for _, fields in client.xrange(stream, min=f"{start_ms}-0", max="+")]
    except redis.RedisError as exc:
        print(f"ragllm stats: cannot read {stream} from Redis: {exc}", file=sys.stderr)
        return 1
    print(render(summarize(entries, window_s), args.since))
    return 0
