"""A RAG prompt's documents found in its rendered text, each tokenized on its own.

Document KV reuse (``kv/document_store``) needs a document's tokens to be the same wherever it lands:
tokenized with the whole prompt, its first and last tokens could merge with its neighbours'. So the
rendered prompt is cut at each document's text, and every piece is tokenized alone; a document's
token span is then its own ids, whatever surrounds it. The ids differ from whole-prompt tokenization
only at those cuts (a few tokens per document), and are the same for the same prompt.

A document is looked for where the previous one ended, as the service renders it (``rag.prompt``),
escaped as the template saw it. One not found as it is (its escaped form differs at its edges) is
left inside the text around it: never reused, never wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DocumentTokens:
    """A prompt's ids and, for each document found, its span of them: ``[start, end)``."""

    ids: list[int]
    spans: list[tuple[int, int]]


def tokenize_with_documents(
    text: str,
    documents: tuple[str, ...],
    encode: Callable[[str], list[int]],
    escape: Callable[[str], str] = lambda document: document,
    encode_document: Callable[[str], list[int]] | None = None,
) -> DocumentTokens:
    """``text`` cut at each of ``documents`` (as ``escape`` writes it into the prompt), the pieces
    tokenized one by one: the documents by ``encode_document`` (one that keeps their ids: they come
    back), the text between them by ``encode``."""
    encode_document = encode_document or encode
    cuts: list[tuple[int, int]] = []
    cursor = 0
    for document in documents:
        needle = escape(document)
        if not needle:
            continue
        found = text.find(needle, cursor)
        if found < 0:
            continue
        cuts.append((found, found + len(needle)))
        cursor = found + len(needle)
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    cursor = 0
    for begin, end in cuts:
        if begin > cursor:
            ids += encode(text[cursor:begin])
        start = len(ids)
        ids += encode_document(text[begin:end])
        if len(ids) > start:
            spans.append((start, len(ids)))
        cursor = end
    if cursor < len(text):
        ids += encode(text[cursor:])
    return DocumentTokens(ids, spans)
