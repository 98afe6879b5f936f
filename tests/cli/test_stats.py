"""``ragllm stats`` over a request log written to a real Redis."""

from __future__ import annotations

import uuid

import pytest

from ragllm.cli import main
from ragllm.cli.stats import parse_duration, render, summarize
from ragllm.config import RedisSettings, RequestLogSettings
from ragllm.redis_link import RedisLink
from ragllm.telemetry.request_log import RequestLog


def _entry(status=200, ttft=10.0, latency=100.0, tokens=10, cache="miss"):
    return {
        "status": str(status),
        "ttft_ms": str(ttft),
        "latency_ms": str(latency),
        "completion_tokens": str(tokens),
        "cache": cache,
    }


def test_summary_percentiles_rates_and_tokens():
    entries = [_entry(ttft=t, latency=10 * t) for t in range(1, 21)]
    entries += [
        _entry(status=404, ttft="", latency=1.0, tokens=0, cache=""),
        _entry(status=499, tokens=3),
        _entry(cache="hit", tokens=50),
    ]
    summary = summarize(entries, window_s=10)
    assert summary.requests == 23
    assert summary.errors == 1 and summary.cancelled == 1
    assert summary.ttft_p50_ms == 10.0 and summary.ttft_p95_ms == 19.0
    assert summary.completion_tokens == 20 * 10 + 3  # cache hits generated nothing
    assert summary.tokens_per_s == pytest.approx(20.3)
    assert summary.cache_hits == 1 and summary.cache_lookups == 22


def test_rag_answers_are_summarised_from_their_fields():
    def rag(received, dropped, missing, declined, cache="miss"):
        return {
            **_entry(cache=cache),
            "rag_template": "default@1",
            "rag_documents_received": str(received),
            "rag_documents_dropped": str(dropped),
            "rag_citations_missing": str(missing),
            "rag_declined": str(declined),
        }

    entries = [rag(4, 1, 1, 0), rag(4, 3, 0, 1), rag(2, 0, 0, 0, cache="hit"), _entry()]
    summary = summarize(entries, window_s=10)
    assert (summary.rag.answers, summary.rag.documents_received) == (3, 10)
    assert (summary.rag.documents_dropped, summary.rag.citations_missing) == (4, 1)
    assert summary.rag.declined == 1
    rendered = render(summary, "5m")
    assert "RAG docs dropped    40.0% (4/10)" in rendered
    assert "RAG uncited         33.3% (1/3)" in rendered
    assert "RAG declined        33.3% (1/3)" in rendered
    assert "RAG declined        -" in render(summarize([_entry()], window_s=10), "5m")


def test_durations():
    assert (
        parse_duration("15m") == 900
        and parse_duration("2h") == 7200
        and parse_duration("30s") == 30
    )


async def test_stats_command_reads_the_log_from_redis(shared_redis_url, monkeypatch, capsys):
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    link = RedisLink(RedisSettings(url=shared_redis_url, prefix=prefix))
    log = RequestLog(RequestLogSettings(), link)
    for index in range(4):
        log.append({"request_id": f"r{index}", **_entry(status=200 if index else 500)})
    await log.flush()
    await link.aclose()
    monkeypatch.setenv("REDIS_URL", shared_redis_url)
    monkeypatch.setenv("RAGLLM_REDIS__PREFIX", prefix)
    assert main(["stats", "--since", "5m"]) == 0
    out = capsys.readouterr().out
    assert "requests            4" in out
    assert "25.0% (1)" in out


def test_stats_without_redis_says_how_to_fix_it(monkeypatch, capsys):
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert main(["stats"]) == 2
    assert "REDIS_URL" in capsys.readouterr().err
