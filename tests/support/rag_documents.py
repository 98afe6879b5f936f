"""Hypothesis strategy for RAG document lists: short ids, texts of words a word-counting engine
counts, scores or none, ids unique within a request as the contract requires."""

from __future__ import annotations

from hypothesis import strategies as st

from ragllm.rag.contract import RagDocument


def document_lists(max_size: int, max_text: int) -> st.SearchStrategy[list[RagDocument]]:
    return st.lists(
        st.builds(
            RagDocument,
            id=st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True),
            text=st.text("xy ", min_size=1, max_size=max_text),
            score=st.none() | st.floats(0, 1),
        ),
        max_size=max_size,
        unique_by=lambda d: d.id,
    )
