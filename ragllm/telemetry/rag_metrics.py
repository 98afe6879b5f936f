"""The RAG series: what answers did with their documents (received, used, dropped, the context they
took), whether they cited them, and how often they declined.

Labelled ``model_name`` and ``template`` only, and both come from the server: a template from its
registry (an unknown name is refused before packing), a model from the served ones (an unknown one is
a 404). A client cannot mint a label value, so the number of series stays bounded whatever it sends;
document ids are counted, never named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram

if TYPE_CHECKING:
    from ragllm.rag.outcome import RagOutcome

LABELS = ("model_name", "template")
# Tokens the packed documents took: from a short snippet to a long-context model's whole window.
CONTEXT_TOKEN_BUCKETS = (0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class RagMetrics:
    """One finished RAG answer at a time, cache hits included: the series describe the answers
    clients received (``ragllm_cache_lookups_total`` tells how many came from the cache)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, LABELS, registry=registry)

        self.answers = counter("ragllm_rag_answers", "Finished RAG answers.")
        self.documents_received = counter(
            "ragllm_rag_documents_received", "Documents RAG requests carried."
        )
        self.documents_used = counter(
            "ragllm_rag_documents_used", "Documents packed into the model's context."
        )
        self.documents_dropped = counter(
            "ragllm_rag_documents_dropped",
            "Documents left out for want of room in the context, lowest-ranked first.",
        )
        self.context_tokens = Histogram(
            "ragllm_rag_context_tokens",
            "Tokens the packed documents took, per answer.",
            LABELS,
            buckets=CONTEXT_TOKEN_BUCKETS,
            registry=registry,
        )
        self.citations_valid = counter(
            "ragllm_rag_citations_valid", "Distinct supplied documents cited by answers."
        )
        self.citations_unknown = counter(
            "ragllm_rag_citations_unknown", "Distinct cited ids that were never supplied."
        )
        self.citations_missing = counter(
            "ragllm_rag_citations_missing",
            "Answers whose citations were checked that cite nothing at all and do not decline.",
        )
        self.declined = counter(
            "ragllm_rag_answers_declined", "Answers that are the template's decline sentence."
        )

    def observe(self, model_name: str, outcome: RagOutcome) -> None:
        """Count one finished answer. ``model_name``: the served model it was asked of."""
        labels = (model_name, outcome.template)
        self.answers.labels(*labels).inc()
        self.documents_received.labels(*labels).inc(outcome.documents_received)
        self.documents_used.labels(*labels).inc(outcome.documents_used)
        self.documents_dropped.labels(*labels).inc(outcome.documents_dropped)
        self.context_tokens.labels(*labels).observe(outcome.context_tokens)
        self.citations_valid.labels(*labels).inc(outcome.citations_valid)
        self.citations_unknown.labels(*labels).inc(outcome.citations_unknown)
        self.citations_missing.labels(*labels).inc(int(outcome.citations_missing))
        self.declined.labels(*labels).inc(int(outcome.declined))
