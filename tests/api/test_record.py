"""A request record's log entry has the documented fields, a RAG answer's counts after them."""

from __future__ import annotations

from ragllm.api.record import RequestRecord
from ragllm.rag.contract import RagDocument
from ragllm.rag.packing import RagContext
from ragllm.telemetry.request_log import FIELDS, RAG_FIELDS


def test_an_entry_has_the_documented_fields_and_a_rag_answer_adds_its_own():
    record = RequestRecord(endpoint="/v1/chat/completions")
    assert tuple(record.entry()) == FIELDS
    documents = {"a": RagDocument(id="a", text="x"), "b": RagDocument(id="b", text="y")}
    context = RagContext("default@1", documents, ["a"], ["b"], 12, True, "No.")
    _, record.rag = context.answered("Yes. [a] [secret-id]")
    entry = record.entry()
    assert tuple(entry) == FIELDS + RAG_FIELDS
    assert {key: entry[key] for key in RAG_FIELDS} == {
        "rag_template": "default@1",
        "rag_citation_mode": "parsed",
        "rag_documents_received": 2,
        "rag_documents_used": 1,
        "rag_documents_dropped": 1,
        "rag_context_tokens": 12,
        "rag_citations_valid": 1,
        "rag_citations_unknown": 1,
        "rag_citations_missing": False,
        "rag_declined": False,
    }
    assert "secret-id" not in str(entry)
