"""What one RAG answer did with its documents, in counts: the facts metrics, the request log and the
request's trace carry (the response's ``rag`` report names the documents; telemetry only counts them,
so no client-chosen id ever reaches a metric label or a log field)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RagOutcome:
    template: str  # a template of the server's registry (an unknown one is refused before packing)
    citation_mode: str  # parsed, constrained or off, as in the report
    documents_received: int
    documents_used: int  # packed into the context
    documents_dropped: int  # left out for want of room, lowest-ranked first
    context_tokens: int  # tokens the packed documents took
    citations_valid: int  # distinct supplied documents the answer cites
    citations_unknown: int  # distinct cited ids that were never supplied
    declined: bool  # the answer is the template's decline sentence

    @property
    def citations_missing(self) -> bool:
        """Citations were checked and the answer cites nothing at all, valid or not, without
        declining: a decline is the one answer that rightly cites nothing."""
        return (
            self.citation_mode != "off"
            and not self.declined
            and not (self.citations_valid or self.citations_unknown)
        )

    def fields(self) -> dict[str, Any]:
        """The request log's fields (flat, as a Redis Stream entry takes them)."""
        return {
            "rag_template": self.template,
            "rag_citation_mode": self.citation_mode,
            "rag_documents_received": self.documents_received,
            "rag_documents_used": self.documents_used,
            "rag_documents_dropped": self.documents_dropped,
            "rag_context_tokens": self.context_tokens,
            "rag_citations_valid": self.citations_valid,
            "rag_citations_unknown": self.citations_unknown,
            "rag_citations_missing": self.citations_missing,
            "rag_declined": self.declined,
        }

    def span_attributes(self) -> dict[str, Any]:
        """The same facts as attributes of the request's span: ``ragllm.rag.documents_dropped``, ..."""
        return {
            f"ragllm.rag.{key.removeprefix('rag_')}": value for key, value in self.fields().items()
        }
