"""The dry run's report counts what packing could reach, never megabytes of documents it dropped
unread: a dropped document that no prompt of the model could hold is reported with ``tokens: null``."""

from __future__ import annotations

import asyncio

from ragllm.generation import ModelCard
from ragllm.rag.contract import RagDocument, RagOptions
from ragllm.rag.dry_run import MAX_COUNTED_DROPPED, dry_run_report
from ragllm.rag.packing import PackRequest, pack
from ragllm.rag.prompt import load_template, rank
from tests.support.word_counting import WordCountingEngine

QUESTION = [{"role": "user", "content": "What is it?"}]


class CountingEngine(WordCountingEngine):
    """Words as tokens; remembers the bytes of every text it was asked to count."""

    def __init__(self) -> None:
        self.counted: list[int] = []

    async def count_text_tokens(self, texts: list[str]) -> list[int]:
        self.counted.extend(len(t.encode()) for t in texts)
        return [len(t.split()) for t in texts]


def _report(documents, max_token_bytes, window=1000):
    model = ModelCard("m", window, max_token_bytes=max_token_bytes)
    engine = CountingEngine()
    request = PackRequest(
        model=model,
        template=load_template("default@1"),
        ranked=rank(documents),
        messages=QUESTION,
        template_kwargs=None,
        max_tokens=16,
        options=RagOptions(max_context_tokens=50),
        no_think=False,
    )

    async def run():
        _, context = await pack(engine, request)
        return await dry_run_report(engine, context, model)

    return asyncio.run(run()), engine.counted


def test_dropped_documents_past_any_prompt_are_not_counted():
    # 400 documents of 20 KB: 8 MB of text, none of which a 1,000-token window could hold.
    small = [RagDocument(id=f"s{i}", text="word " * 5, score=1.0 - i / 100) for i in range(20)]
    huge = [RagDocument(id=f"h{i:03}", text="x " * 10_000, score=0.0) for i in range(400)]
    report, counted = _report(small + huge, max_token_bytes=16)
    assert sum(counted) <= 1000 * 16 + sum(len(d.text) + 200 for d in small)
    tokens = {d["id"]: d["tokens"] for d in report["used_documents"] + report["dropped_documents"]}
    assert all(isinstance(tokens[d.id], int) for d in small)
    assert all(tokens[d.id] is None for d in huge)
    assert len(report["dropped_documents"]) == len(small) + len(huge) - len(
        report["used_documents"]
    )


def test_without_a_bound_on_token_bytes_at_most_a_few_dropped_documents_are_counted():
    # An upstream's counts are one request per document: a dry run never sends hundreds.
    documents = [RagDocument(id=f"d{i:04}", text="word " * 20, score=-i) for i in range(1000)]
    report, counted = _report(documents, max_token_bytes=None)
    assert len(counted) <= len(report["used_documents"]) + MAX_COUNTED_DROPPED
    dropped = report["dropped_documents"]
    assert [d["tokens"] is not None for d in dropped] == [
        i < MAX_COUNTED_DROPPED for i in range(len(dropped))
    ]
