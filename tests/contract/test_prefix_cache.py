"""Prefix caching through the real server and the official SDK: a repeated system prompt (a RAG
template and documents) is reported as cached tokens, answers do not change, and the cache's
series and /health detail move as they should."""

from __future__ import annotations

import re
import uuid

import httpx

NO_RESPONSE_CACHE = {"Cache-Control": "no-cache"}


def _documents() -> str:
    """A system prompt no other test sends (so its first use cannot be a hit), some 300 tokens long."""
    words = uuid.uuid4().hex
    return "Answer from these documents only.\n" + "\n".join(
        f"[doc{i}] The {words[i % 32]}-series archive lists {100 + 7 * i} records for region {words[i : i + 6]}."
        for i in range(20)
    )


def _ask(client, model, system: str, question: str, **extra):
    return client.chat.completions.create(
        model=model,
        max_tokens=8,
        temperature=0,
        extra_headers=NO_RESPONSE_CACHE,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        **extra,
    )


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not exported"
    return float(match.group(1))


def test_a_repeated_prefix_is_reported_cached_and_counted(server, client, model):
    system = _documents()
    queries = _metric(server, "vllm:prefix_cache_queries_total")
    hits = _metric(server, "vllm:prefix_cache_hits_total")
    first = _ask(client, model, system, "Which region has the most records?")
    second = _ask(client, model, system, "How many records does doc3 list?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert (
        200 <= cached < second.usage.prompt_tokens and cached % 16 == 0
    )  # whole blocks of the documents
    assert (
        _metric(server, "vllm:prefix_cache_queries_total") - queries
        >= first.usage.prompt_tokens + second.usage.prompt_tokens
    )
    assert _metric(server, "vllm:prefix_cache_hits_total") - hits >= cached
    assert 0 <= _metric(server, "vllm:kv_cache_usage_perc") <= 1
    assert _metric(server, "vllm:num_preemptions_total") >= 0


def test_an_answer_from_cached_blocks_equals_the_computed_one(client, model):
    system = _documents()
    computed = _ask(client, model, system, "Summarise doc1.")
    again = _ask(client, model, system, "Summarise doc1.")
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.choices[0].message.content == computed.choices[0].message.content


def test_a_stream_reports_the_hit_in_its_usage_chunk(client, model):
    system = _documents()
    _ask(client, model, system, "Which doc mentions region a?")
    chunks = list(
        _ask(
            client,
            model,
            system,
            "Which doc lists 107 records?",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 200


def test_health_reports_the_kv_blocks(server):
    kv = httpx.get(f"{server.url}/health").json()["kv_cache"]
    assert (
        kv["block_size"] == 16
        and kv["blocks_total"] > 0
        and 0 <= kv["blocks_free"] <= kv["blocks_total"]
    )
    assert 0 <= kv["usage"] <= 1 and kv["preemptions"] >= 0


def test_the_load_generator_reports_what_repeated_documents_found_cached(server, model):
    import asyncio

    from ragllm.loadtest.generator import Bounds, run_level
    from ragllm.loadtest.workload import Workload

    workload = Workload(model=model, max_tokens=4, context_words=150, doc_sets=2, repeat_rate=1.0)
    level = asyncio.run(run_level(server.url, workload, Bounds(requests=6), concurrency=1))
    assert level["completed"] == 6 and level["repeated"] >= 4
    assert level["repeated_cached_share"] >= 0.75  # the documents are most of each prompt
    assert level["prefix_cache_hit_rate"] > 0.4  # first sends included
