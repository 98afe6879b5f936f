"""The RAG contract's pure parts: rendering (golden file), ranking, citations, thinking."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragllm.errors import InvalidRequest
from ragllm.prompting import (
    ThinkStripper,
    load_template,
    parse_citations,
    rank,
    render_messages,
    strip_thinking,
    with_no_think,
)
from ragllm.protocol.rag import RagDocument

GOLDEN = Path(__file__).parent / "golden" / "rag_default@1.txt"
DOCUMENTS = [
    RagDocument(id="weather", title="Oslund weather", text="Oslund has mild summers.", score=0.2),
    RagDocument(id="bridge", title="Verdant Bridge", source="https://example.org/bridge",
                text="The Verdant Bridge in Oslund was completed in 1987.\n", score=0.9),
    RagDocument(id="mayor", text="The mayor of Oslund is Ida Brenn."),
    RagDocument(id="ferry", title="Ferry", text="A ferry crossed the river before the bridge.", score=0.9),
]
QUESTION = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "When was the Verdant Bridge completed?"}]


def _prompt(tokenizer, documents) -> str:
    messages = render_messages(load_template("default@1"), rank(documents), QUESTION)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_rendered_prompt_matches_the_golden_file(tokenizer):
    assert _prompt(tokenizer, DOCUMENTS) == GOLDEN.read_text()


def test_rendering_is_byte_identical_whatever_the_input_order(tokenizer):
    assert _prompt(tokenizer, list(reversed(DOCUMENTS))) == _prompt(tokenizer, DOCUMENTS)


def test_canonical_order_is_score_then_id():
    assert [d.id for d in rank(DOCUMENTS)] == ["bridge", "ferry", "weather", "mayor"]
    with pytest.raises(InvalidRequest, match="more than once"):
        rank([DOCUMENTS[0], DOCUMENTS[0]])


def test_question_must_come_last_and_templates_must_exist():
    with pytest.raises(InvalidRequest):
        render_messages(load_template("default@1"), [], [{"role": "assistant", "content": "hi"}])
    for name in ("default@9", "../../etc@1", "nope"):
        with pytest.raises(InvalidRequest, match="unknown RAG template"):
            load_template(name)


def test_no_think_goes_on_the_last_user_turn_only():
    messages = with_no_think([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}])
    assert [m["content"] for m in messages] == ["a", "b", "c /no_think"]


def test_citations_valid_unknown_and_missing():
    documents = {d.id: d for d in DOCUMENTS}
    citations, unknown = parse_citations(
        "Built in 1987 [bridge]; ferries came first [ferry, bridge]. See [nowhere] and [note: not an id].",
        documents)
    assert [(c.id, c.title, c.source) for c in citations] == [
        ("bridge", "Verdant Bridge", "https://example.org/bridge"), ("ferry", "Ferry", None)]
    assert unknown == ["nowhere"]
    assert parse_citations("No citation here.", documents) == ([], [])


@pytest.mark.parametrize("chunks", [
    ["<think>\nLet me think.</think>\n\nThe answer [bridge]."],
    ["<th", "ink>\nLet me", " think.</thi", "nk>", "\n\nThe answer", " [bridge]."],
    ["<think></think>", "The answer [bridge]."],
])
def test_thinking_is_stripped_across_chunk_boundaries(chunks):
    stripper = ThinkStripper()
    assert "".join(stripper.feed(c) for c in chunks) + stripper.flush() == "The answer [bridge]."


def test_text_that_only_looks_like_a_tag_is_kept():
    assert strip_thinking("a < b and <thin> ice") == "a < b and <thin> ice"
    assert strip_thinking("unfinished <think>thoughts") == "unfinished "
