"""Citations read out of answers, and the constrained-citation pattern in Python's regex engine and in
the engine's grammar library."""

from __future__ import annotations

import re

import pytest

from ragllm.rag.citations import citation_pattern, parse_citations
from ragllm.rag.contract import RagDocument

IDS = ["doc-1", "a.b", "x+y", "doc-10"]
DECLINE = "The documents do not contain the answer."
DOCUMENTS = [
    RagDocument(
        id="bridge",
        title="Verdant Bridge",
        source="https://example.org/bridge",
        text="The Verdant Bridge in Oslund was completed in 1987.\n",
        score=0.9,
    ),
    RagDocument(
        id="ferry", title="Ferry", text="A ferry crossed the river before the bridge.", score=0.9
    ),
]


@pytest.mark.parametrize(
    "answer, allowed",
    [
        ("Paris is the capital. [doc-1]", True),
        ("It opened in 1987.[doc-10] It closed in 2001! [a.b, x+y]", True),
        ("It opened in 1987. [doc-1]\n- Then it closed. [x+y]", True),
        (DECLINE, True),
        ("No citation at all.", False),
        ("Cites a document never supplied. [doc-2]", False),
        ("A sentence. [doc-1] Another without one.", False),
        ("A sentence. [doc-1] and then a word after the citation. [doc-1]", False),
        ("Unclosed. [doc-1", False),
        ("Empty brackets. []", False),
        ("Nested. [[doc-1]]", False),
        ("A citation inside [doc-1] a sentence. [doc-1]", False),
        ("The documents do not contain the answer. Really.", False),
        (
            "Revenue grew 7.2 percent to 3.45 million in 2024. [doc-1] Version 2.1.4 followed. [a.b]",
            True,
        ),
        ("It grew 7. [doc-1]", True),
        ("It grew 7.2 and then. more. [doc-1]", False),
    ],
)
def test_every_sentence_is_followed_by_a_citation_of_a_packed_document(answer, allowed):
    assert bool(re.fullmatch(citation_pattern(IDS, DECLINE), answer)) is allowed


def test_without_documents_only_the_decline_is_allowed():
    assert re.fullmatch(citation_pattern([], DECLINE), DECLINE)
    assert not re.fullmatch(citation_pattern([], DECLINE), "Anything else [x].")


def test_the_grammar_library_accepts_the_pattern():
    import llguidance

    pattern = citation_pattern(IDS, DECLINE)
    assert (
        llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_regex(pattern))
        == ""
    )


def test_citations_valid_unknown_and_missing():
    documents = {d.id: d for d in DOCUMENTS}
    citations, unknown = parse_citations(
        "Built in 1987 [bridge]; ferries came first [ferry, bridge]. See [nowhere] and [note: not an id].",
        documents,
    )
    assert [(c.id, c.title, c.source) for c in citations] == [
        ("bridge", "Verdant Bridge", "https://example.org/bridge"),
        ("ferry", "Ferry", None),
    ]
    assert unknown == ["nowhere"]
    assert parse_citations("No citation here.", documents) == ([], [])
