"""The RAG series in a real Prometheus registry: one finished answer moves each by its counts, under
the model and template labels alone."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ragllm.rag.contract import RagDocument
from ragllm.rag.packing import RagContext
from ragllm.telemetry.rag_metrics import RagMetrics

DECLINE = "The documents do not contain the answer."


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("ragllm_rag_") and not sample.name.endswith("_created")
    }


def _outcome(answer: str, ids: list[str], used: int):
    documents = {i: RagDocument(id=i, text="x") for i in ids}
    context = RagContext("default@1", documents, ids[:used], ids[used:], 300, True, DECLINE)
    return context.answered(answer)[1]


def test_each_answer_moves_the_series_by_its_counts():
    registry = CollectorRegistry()
    metrics = RagMetrics(registry)
    metrics.observe("m", _outcome("In 1987. [a] And [zz].", ["a", "b", "c"], used=1))
    metrics.observe("m", _outcome("No citation here.", ["a", "b"], used=2))
    metrics.observe("m", _outcome(DECLINE, ["a"], used=1))
    labels = (("model_name", "m"), ("template", "default@1"))
    samples = _samples(registry)
    assert {name: value for (name, got), value in samples.items() if got == labels} == {
        "ragllm_rag_answers_total": 3,
        "ragllm_rag_documents_received_total": 6,
        "ragllm_rag_documents_used_total": 4,
        "ragllm_rag_documents_dropped_total": 2,
        "ragllm_rag_citations_valid_total": 1,
        "ragllm_rag_citations_unknown_total": 1,
        "ragllm_rag_citations_missing_total": 1,
        "ragllm_rag_answers_declined_total": 1,
        "ragllm_rag_context_tokens_count": 3,
        "ragllm_rag_context_tokens_sum": 900,
    }
    buckets = {
        dict(got)["le"]: value
        for (name, got), value in samples.items()
        if name == "ragllm_rag_context_tokens_bucket"
    }
    assert buckets["256.0"] == 0 and buckets["512.0"] == 3
    # No label but the two: a document id or an answer's text has nowhere to go.
    assert {key for _, got in samples for key, _ in got} == {"model_name", "template", "le"}
