"""``rag.order`` against a real server with the packaged model, through the official SDK: under
"stable" the same document set, retrieved for another question with other scores, renders the same
bytes (its second request finds the documents in the prefix cache); under "relevance" documents
render by score. Hostile values of the field are a 400 in OpenAI's envelope."""

from __future__ import annotations

import json
import random
import uuid

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragllm.config import load_settings
from tests.support.servers import MODEL

NO_RESPONSE_CACHE = {"Cache-Control": "no-cache, no-store"}


def _documents(scores: list[float]) -> list[dict]:
    """Six documents no other test sends (a first use cannot be a hit), each some 40 tokens."""
    words = uuid.uuid4().hex
    return [
        {
            "id": f"doc-{letter}",
            "title": f"Archive {letter.upper()}",
            "text": f"The {words[i : i + 5]} archive of region {letter} lists {100 + 7 * i} "
            "records, "
            f"kept since {1900 + 11 * i} in the {words[i + 5 : i + 9]} hall by {3 + i} clerks.",
            "score": score,
        }
        for i, (letter, score) in enumerate(zip("abcdef", scores))
    ]


def _rescored(documents: list[dict], scores: list[float], seed: int) -> list[dict]:
    """The same documents with other scores, in another order (as another question retrieves)."""
    rescored = [{**d, "score": s} for d, s in zip(documents, scores)]
    random.Random(seed).shuffle(rescored)
    return rescored


def _ask(client, documents, question: str, order: str | None):
    rag = {"order": order} if order is not None else {}
    return client.chat.completions.create(
        model=MODEL,
        max_tokens=4,
        temperature=0,
        messages=[{"role": "user", "content": question}],
        extra_body={"documents": documents, "rag": rag},
        extra_headers=NO_RESPONSE_CACHE,
    )


def _by_score(documents: list[dict]) -> list[str]:
    return [d["id"] for d in sorted(documents, key=lambda d: -d["score"])]


def test_stable_renders_a_set_the_same_whatever_the_question_and_scores(client):
    first_docs = _documents([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    second_docs = _rescored(first_docs, [0.1, 0.3, 0.95, 0.2, 0.6, 0.5], seed=1)
    assert _by_score(first_docs) != _by_score(second_docs)
    first = _ask(client, first_docs, "Which region has the most records?", "stable")
    second = _ask(client, second_docs, "How many clerks work in region c?", "stable")
    ids = sorted(d["id"] for d in first_docs)
    assert first.model_extra["rag"]["used_documents"] == ids
    assert second.model_extra["rag"]["used_documents"] == ids
    assert first.usage.prompt_tokens_details.cached_tokens < 100  # the shared instruction at most
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Every document is in the reused prefix: the system message rendered byte for byte the same.
    assert cached >= second.model_extra["rag"]["context_tokens"] > 200
    assert cached < second.usage.prompt_tokens and cached % 16 == 0


def test_relevance_renders_by_score_so_other_scores_miss_the_documents(client):
    first_docs = _documents([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    shuffled = _rescored(first_docs, [d["score"] for d in first_docs], seed=2)  # same scores
    other_scores = _rescored(first_docs, [0.1, 0.3, 0.95, 0.2, 0.6, 0.5], seed=3)
    first = _ask(client, first_docs, "Which region has the most records?", "relevance")
    same_ranking = _ask(client, shuffled, "How many clerks work in region c?", "relevance")
    reranked = _ask(client, other_scores, "When was archive F started?", "relevance")
    assert first.model_extra["rag"]["used_documents"] == _by_score(first_docs)
    assert same_ranking.model_extra["rag"]["used_documents"] == _by_score(first_docs)
    assert reranked.model_extra["rag"]["used_documents"] == _by_score(other_scores)
    context = first.model_extra["rag"]["context_tokens"]
    # The same scores in another input order render the same bytes (the score decides)...
    assert same_ranking.usage.prompt_tokens_details.cached_tokens >= context
    # ...other scores put another document first: only the instruction before it is reused.
    assert reranked.usage.prompt_tokens_details.cached_tokens < context // 2


def test_budget_drops_the_lowest_scored_first_under_stable(client):
    documents = _documents([0.2, 0.9, 0.1, 0.8, 0.7, 0.3])
    everything = _ask(client, documents, "Which region?", "stable").model_extra["rag"]
    capped = client.chat.completions.create(
        model=MODEL,
        max_tokens=4,
        temperature=0,
        messages=[{"role": "user", "content": "Which region?"}],
        extra_body={
            "documents": documents,
            "rag": {"order": "stable", "max_context_tokens": everything["context_tokens"] // 2},
        },
        extra_headers=NO_RESPONSE_CACHE,
    ).model_extra["rag"]
    kept = len(capped["used_documents"])
    assert 1 <= kept < len(documents)
    assert capped["used_documents"] == sorted(_by_score(documents)[:kept])
    assert capped["dropped_documents"] == _by_score(documents)[kept:]


def test_a_request_without_an_order_takes_the_profiles_default(client):
    default = load_settings().rag.order
    documents = _documents([0.2, 0.9, 0.1, 0.8, 0.7, 0.3])
    used = _ask(client, documents, "Which region?", None).model_extra["rag"]["used_documents"]
    assert used == (sorted(_by_score(documents)) if default == "stable" else _by_score(documents))


def test_the_schema_documents_the_order(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    order = schema["RagOptions"]["properties"]["order"]
    values = {v for branch in order["anyOf"] for v in branch.get("enum", [])}
    assert values == {"relevance", "stable"} and "stable" in order["description"]


def test_a_wrong_order_is_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(client, _documents([0.5] * 6), "Which region?", "by-id")
    assert caught.value.param == "rag.order" and caught.value.code == "invalid_value"


hostile_orders = st.one_of(
    st.text(max_size=40).filter(lambda s: s not in ("relevance", "stable")),
    st.sampled_from(["RELEVANCE", "Stable", " stable", "stable\x00", "relevance,stable"]),
    st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans(),
    st.lists(st.sampled_from(["relevance", "stable"]), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    st.sampled_from([5, 64, 1000]).map(lambda d: json.loads("[" * d + "]" * d)),
    st.sampled_from([1 << 10, 1 << 20]).map(lambda n: "s" * n),
)


def test_hostile_orders_are_a_400_in_the_openai_envelope(server):
    @given(order=hostile_orders)
    @settings(
        max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def one(http, order):
        body = {
            "model": MODEL,
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "Hi"}],
            "documents": [{"id": "d1", "text": "x"}],
            "rag": {"order": order},
        }
        response = http.post("/v1/chat/completions", json=body, headers=NO_RESPONSE_CACHE)
        assert response.status_code == 400, (repr(order)[:200], response.text[:300])
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["message"]
        # The bounded reader refuses values nested past its depth before the field is looked at.
        assert error["param"] == "rag.order" or error["code"] == "json_too_deep", error

    with httpx.Client(base_url=server.url, timeout=60) as http:
        one(http)
        assert http.get("/health").status_code == 200


def test_the_dry_run_lays_documents_out_as_the_completion_does(server, client):
    documents = _documents([0.2, 0.9, 0.1, 0.8, 0.7, 0.3])
    for order in ("stable", "relevance"):
        dry = httpx.post(
            f"{server.url}/tokenize",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "Which region?"}],
                "documents": documents,
                "rag": {"order": order},
                "max_tokens": 4,
            },
            timeout=60,
        ).json()
        completion = _ask(client, documents, "Which region?", order)
        used = [d["id"] for d in dry["rag"]["used_documents"]]
        assert used == completion.model_extra["rag"]["used_documents"]
        assert dry["count"] == completion.usage.prompt_tokens
        expected = sorted(_by_score(documents)) if order == "stable" else _by_score(documents)
        assert used == expected
