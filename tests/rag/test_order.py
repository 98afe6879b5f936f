"""``rag.order``: how packed documents are laid out, and what stays a relevance decision under
"stable" (which documents fit); the document set's key that upstream affinity follows."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ragllm.errors import RagLLMError
from ragllm.generation import ModelCard
from ragllm.rag.contract import RagDocument, RagOptions
from ragllm.rag.document_set import document_set_key
from ragllm.rag.packing import PackRequest, pack
from ragllm.rag.prompt import arrange, load_template, rank
from tests.support.rag_documents import document_lists
from tests.support.word_counting import WordCountingEngine

PROPERTIES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUESTION = [{"role": "user", "content": "What is it?"}]
# Ids in the reverse of their scores' order, so "stable" and "relevance" disagree everywhere.
DOCUMENTS = [
    RagDocument(id="a", text="alpha " * 10, score=0.1),
    RagDocument(id="b", text="beta " * 10, score=0.5),
    RagDocument(id="c", text="gamma " * 10, score=0.9),
]


def _pack(documents, order, cap=None, window=4096):
    request = PackRequest(
        model=ModelCard("m", window),
        template=load_template("default@1"),
        ranked=rank(documents),
        messages=QUESTION,
        template_kwargs=None,
        max_tokens=16,
        options=RagOptions(max_context_tokens=cap),
        no_think=False,
        order=order,
    )
    return asyncio.run(pack(WordCountingEngine(), request))


def _system(messages) -> str:
    return messages[0]["content"]


def test_relevance_lays_out_by_score_and_stable_by_id():
    assert [d.id for d in arrange(rank(DOCUMENTS), "relevance")] == ["c", "b", "a"]
    assert [d.id for d in arrange(rank(DOCUMENTS), "stable")] == ["a", "b", "c"]
    relevance, report = _pack(DOCUMENTS, "relevance")
    assert report.used == ["c", "b", "a"]
    assert _system(relevance).index("[c]") < _system(relevance).index("[b]")
    stable, report = _pack(DOCUMENTS, "stable")
    assert report.used == ["a", "b", "c"]
    assert (
        _system(stable).index("[a]") < _system(stable).index("[b]") < _system(stable).index("[c]")
    )


def test_stable_renders_the_same_bytes_whatever_the_scores_and_the_input_order():
    rescored = [
        d.model_copy(update={"score": s}) for d, s in zip(reversed(DOCUMENTS), (0.3, 0.2, 0.7))
    ]
    first, _ = _pack(DOCUMENTS, "stable")
    second, _ = _pack(rescored, "stable")
    assert _system(first) == _system(second)
    assert _system(_pack(DOCUMENTS, "relevance")[0]) != _system(_pack(rescored, "relevance")[0])


def test_the_budget_drops_the_lowest_relevance_documents_first_under_stable():
    everything = _pack(DOCUMENTS, "stable")[1].context_tokens
    # Room for two of the three: the two best-scored stay, though "a" comes first by id.
    _, capped = _pack(DOCUMENTS, "stable", cap=everything - 5)
    assert capped.used == ["b", "c"] and capped.dropped == ["a"]
    _, tight = _pack(DOCUMENTS, "stable", cap=everything // 2)
    assert tight.used == ["c"] and tight.dropped == ["b", "a"]  # dropped: lowest-ranked last
    _, relevance = _pack(DOCUMENTS, "relevance", cap=everything - 5)
    assert relevance.used == ["c", "b"] and relevance.dropped == ["a"]


def test_the_order_is_a_closed_choice():
    assert RagOptions().order is None  # the server's default applies
    assert RagOptions(order="stable").order == "stable"
    for wrong in ("STABLE", "score", "", 1, True, ["stable"], {"by": "id"}):
        with pytest.raises(ValidationError):
            RagOptions(order=wrong)


documents_strategy = document_lists(max_size=10, max_text=60)


@PROPERTIES
@given(
    documents=documents_strategy,
    cap=st.none() | st.integers(1, 150),
    window=st.integers(60, 300),
    seed=st.integers(0, 2**16),
)
def test_stable_keeps_what_relevance_keeps_and_renders_independently_of_input_order(
    documents, cap, window, seed
):
    try:
        relevance_messages, relevance = _pack(documents, "relevance", cap, window)
    except RagLLMError as error:  # the question alone does not fit: the same refusal either way
        assert error.code == "context_length_exceeded"
        with pytest.raises(RagLLMError):
            _pack(documents, "stable", cap, window)
        return
    stable_messages, stable = _pack(documents, "stable", cap, window)
    assert sorted(stable.used) == sorted(relevance.used) and stable.dropped == relevance.dropped
    assert stable.used == sorted(stable.used)
    assert stable.document_set == relevance.document_set
    shuffled = list(documents)
    random.Random(seed).shuffle(shuffled)
    assert _pack(shuffled, "stable", cap, window)[0] == stable_messages


# -- the document set's key -----------------------------------------------------------------------
def test_the_key_follows_the_set_not_its_order_or_scores():
    key = document_set_key("default@1", DOCUMENTS)
    rescored = [d.model_copy(update={"score": None}) for d in reversed(DOCUMENTS)]
    assert document_set_key("default@1", rescored) == key
    assert document_set_key("default@1", []) is None
    changed = [
        [*DOCUMENTS[:2], DOCUMENTS[2].model_copy(update={"text": "gamma"})],
        [*DOCUMENTS[:2], DOCUMENTS[2].model_copy(update={"title": "Gamma"})],
        [*DOCUMENTS[:2], DOCUMENTS[2].model_copy(update={"source": "https://example.org/c"})],
        [*DOCUMENTS[:2], DOCUMENTS[2].model_copy(update={"id": "d"})],
        DOCUMENTS[:2],
    ]
    keys = {document_set_key("default@1", documents) for documents in changed}
    assert key not in keys and len(keys) == len(changed)
    assert document_set_key("other@1", DOCUMENTS) != key


@PROPERTIES
@given(
    texts=st.lists(st.text(max_size=30), min_size=2, max_size=2),
    titles=st.lists(st.none() | st.text(max_size=10), min_size=2, max_size=2),
)
def test_no_choice_of_fields_spells_another_documents_key(texts, titles):
    """Fields are encoded apart: text moved into the title (or across documents) changes the key."""
    one = [
        RagDocument(id="x", text=texts[0], title=titles[0]),
        RagDocument(id="y", text=texts[1], title=titles[1]),
    ]
    swapped = [
        RagDocument(id="x", text=texts[1], title=titles[1]),
        RagDocument(id="y", text=texts[0], title=titles[0]),
    ]
    same = (texts[0], titles[0]) == (texts[1], titles[1])
    assert (document_set_key("default@1", one) == document_set_key("default@1", swapped)) is same
