"""The RAG prompt: rendering (golden file), ranking, templates, the no-think suffix."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragllm.errors import InvalidRequest
from ragllm.rag.contract import RagDocument
from ragllm.rag.prompt import load_template, rank, render_messages, with_no_think

GOLDEN = Path(__file__).parents[1] / "golden" / "rag_default@1.txt"
DOCUMENTS = [
    RagDocument(id="weather", title="Oslund weather", text="Oslund has mild summers.", score=0.2),
    RagDocument(
        id="bridge",
        title="Verdant Bridge",
        source="https://example.org/bridge",
        text="The Verdant Bridge in Oslund was completed in 1987.\n",
        score=0.9,
    ),
    RagDocument(id="mayor", text="The mayor of Oslund is Ida Brenn."),
    RagDocument(
        id="ferry", title="Ferry", text="A ferry crossed the river before the bridge.", score=0.9
    ),
]
QUESTION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "When was the Verdant Bridge completed?"},
]


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
    messages = with_no_think(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ]
    )
    assert [m["content"] for m in messages] == ["a", "b", "c /no_think"]
