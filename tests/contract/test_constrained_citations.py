"""rag.citations "constrained": every answer of the packaged model (which never cites on its own)
cites only supplied documents, each sentence followed by a citation, or declines in the template's
words; the report says which mode applied."""

from __future__ import annotations

import re

import httpx
import pytest

from ragllm.rag.citations import citation_pattern
from ragllm.rag.prompt import load_template

DOCUMENTS = [
    {
        "id": "bridge",
        "title": "Verdant Bridge",
        "text": "The Verdant Bridge in Oslund was completed in 1987.",
    },
    {
        "id": "ferry",
        "title": "Ferry",
        "text": "Before the bridge, a ferry crossed the river every hour.",
    },
]
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


def _ask(server, model, question, citations, **extra):
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=120,
        headers=NO_CACHE,
        json={
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "documents": DOCUMENTS,
            "rag": {"citations": citations},
            "temperature": 0,
            "max_tokens": 80,
            **extra,
        },
    )
    return response


@pytest.mark.parametrize(
    "question", ["When was the Verdant Bridge completed?", "How often did the ferry cross?"]
)
def test_constrained_answers_cite_only_supplied_documents(server, model, question):
    body = _ask(server, model, question, "constrained").json()
    choice, report = body["choices"][0], body["rag"]
    assert choice["finish_reason"] == "stop"
    assert report["citation_mode"] == "constrained"
    pattern = citation_pattern(["bridge", "ferry"], load_template("default@1").decline)
    assert re.fullmatch(pattern, choice["message"]["content"]), choice["message"]["content"]
    assert report["unknown_citations"] == []
    assert report["cited"] or choice["message"]["content"] == load_template("default@1").decline


def test_an_answer_cut_by_max_tokens_still_cites_only_supplied_documents(server, model):
    """A question the documents do not answer: the small model writes on, and max_tokens ends it
    ("length"), but every citation it made names a supplied document."""
    body = _ask(server, model, "What colour is the Oslund town hall?", "constrained").json()
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["rag"]["unknown_citations"] == []
    cited = re.findall(r"\[([^\]]*)\]", body["choices"][0]["message"]["content"])
    assert all(part.strip() in ("bridge", "ferry") for group in cited for part in group.split(","))


def test_the_same_question_unconstrained_reports_parsed_citations(server, model):
    body = _ask(server, model, "When was the Verdant Bridge completed?", True).json()
    assert body["rag"]["citation_mode"] == "parsed"
    assert (
        _ask(server, model, "When was the Verdant Bridge completed?", False).json()["rag"][
            "citation_mode"
        ]
        == "off"
    )


@pytest.mark.parametrize(
    "extra", [{"response_format": {"type": "json_object"}}, {"guided_regex": "a+"}]
)
def test_constrained_citations_do_not_combine_with_another_constraint(server, model, extra):
    response = _ask(server, model, "When?", "constrained", **extra)
    assert response.status_code == 400 and response.json()["error"]["param"] == "rag.citations"
