"""The RAG dry run (/tokenize with documents) and /detokenize, against a real server with the packaged
model: the dry run packs what the chat completion then packs (same documents used and dropped, the
same prompt tokens as its usage), its token ids give the prompt back through /detokenize, and
``ragllm.client`` reaches both. The openai SDK has no call for these routes: httpx and the client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from ragllm.client import AsyncRagClient, Document, RagClient
from ragllm.rag.contract import RagOptions
from tests.support.servers import MODEL, ServerProcess

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
QUESTION = [{"role": "user", "content": "When was the bridge completed?"}]
DOCUMENTS = [
    {
        "id": "bridge",
        "text": "The Verdant Bridge in Oslund was completed in 1987. " * 8,
        "score": 0.9,
    },
    {
        "id": "ferry",
        "text": "Before the bridge, a ferry crossed the river every hour. " * 8,
        "score": 0.5,
    },
    {
        "id": "mayor",
        "title": "Opening",
        "text": "The mayor opened the bridge in May.",
        "score": 0.1,
    },
]
SMALL_WINDOW = 320
TIGHT_KEY = "tight-s3cret"
OPEN_KEY = "open-s3cret"
OPEN = {"Authorization": f"Bearer {OPEN_KEY}"}


@pytest.fixture(scope="module")
def small_window(tmp_path_factory):
    """A 320-token context: a long answer's room leaves too little for every document. Keys on: one
    with a limit of 3 requests a minute, one unlimited (the key every other request here sends; a
    server without keys ignores it)."""
    log_dir = tmp_path_factory.mktemp("dry-run")
    keys_file = log_dir / "keys.json"
    keys_file.write_text(
        json.dumps([{"id": "tight", "key": TIGHT_KEY, "rpm": 3}, {"id": "open", "key": OPEN_KEY}])
    )
    server = ServerProcess(
        "--max-model-len",
        str(SMALL_WINDOW),
        log_dir=log_dir,
        env={"RAGLLM_AUTH__KEYS_FILE": str(keys_file)},
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _tokenize(url: str, **fields) -> httpx.Response:
    return httpx.post(f"{url}/tokenize", json={"model": MODEL, **fields}, headers=OPEN, timeout=60)


def _chat(url: str, **fields) -> dict:
    body = {"model": MODEL, "temperature": 0, **fields}
    response = httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={**NO_CACHE, **OPEN}, timeout=120
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize(
    "budget",
    [
        {"rag": {"max_context_tokens": 150}, "max_tokens": 4},  # the documents' own cap
        {"max_tokens": 4, "rag": {"max_context_tokens": 200, "citations": False}},
    ],
    ids=["cap-150", "cap-200"],
)
def test_the_dry_run_packs_what_the_completion_then_packs(server, budget):
    planned = _tokenize(server.url, messages=QUESTION, documents=DOCUMENTS, **budget)
    assert planned.status_code == 200, planned.text
    plan = planned.json()
    report = plan["rag"]
    completion = _chat(server.url, messages=QUESTION, documents=DOCUMENTS, **budget)
    packed = completion["rag"]
    assert [d["id"] for d in report["used_documents"]] == packed["used_documents"]
    assert [d["id"] for d in report["dropped_documents"]] == packed["dropped_documents"]
    assert report["dropped_documents"], "the budget should have dropped a document"
    assert report["context_tokens"] == packed["context_tokens"]
    assert plan["count"] == report["prompt_tokens"] == completion["usage"]["prompt_tokens"]
    assert report["budget"] == {
        "max_model_len": plan["max_model_len"],
        "reserved_for_answer": 4,
        "max_context_tokens": budget["rag"]["max_context_tokens"],
    }
    # Each document's own count: what packing measured, give or take a few tokens at the joins.
    used_alone = sum(d["tokens"] for d in report["used_documents"])
    assert abs(used_alone - report["context_tokens"]) <= 4 * len(report["used_documents"]) + 4
    assert all(d["tokens"] > 0 for d in report["used_documents"] + report["dropped_documents"])


def test_the_answer_room_drops_documents_in_a_small_window(small_window):
    """No cap: the window less max_tokens is the budget, and a larger answer leaves room for fewer."""
    reports = {}
    for max_tokens in (8, 150):
        fields = {"messages": QUESTION, "documents": DOCUMENTS, "max_tokens": max_tokens}
        plan = _tokenize(small_window.url, **fields).json()
        reports[max_tokens] = plan["rag"]
        assert plan["rag"]["budget"] == {
            "max_model_len": SMALL_WINDOW,
            "reserved_for_answer": max_tokens,
            "max_context_tokens": None,
        }
        assert plan["count"] + max_tokens <= SMALL_WINDOW
    completion = _chat(small_window.url, messages=QUESTION, documents=DOCUMENTS, max_tokens=8)
    assert [d["id"] for d in reports[8]["used_documents"]] == completion["rag"]["used_documents"]
    assert reports[8]["prompt_tokens"] == completion["usage"]["prompt_tokens"]
    assert reports[8]["dropped_documents"]
    assert len(reports[150]["used_documents"]) < len(reports[8]["used_documents"])


def test_token_ids_round_trip_through_detokenize(server):
    plan = _tokenize(
        server.url,
        messages=QUESTION,
        documents=DOCUMENTS,
        rag={"max_context_tokens": 150},
        return_token_ids=True,
        return_token_strs=True,
    ).json()
    ids = plan["tokens"]
    assert len(ids) == plan["count"] == plan["rag"]["prompt_tokens"]
    assert len(plan["token_strs"]) == len(ids) and all(
        isinstance(s, str) for s in plan["token_strs"]
    )
    text = httpx.post(
        f"{server.url}/detokenize", json={"model": MODEL, "tokens": ids}, timeout=60
    ).json()["prompt"]
    assert "The Verdant Bridge in Oslund was completed in 1987." in text  # used
    assert "ferry" not in text  # dropped
    assert text.rstrip().endswith("assistant")  # the generation prompt
    again = _tokenize(server.url, prompt=text, return_token_ids=True).json()
    assert again["tokens"] == ids


def test_a_plain_tokenize_answer_is_as_before(server):
    answer = _tokenize(server.url, messages=QUESTION).json()
    assert set(answer) == {"count", "max_model_len"} and answer["count"] > 0
    with_ids = _tokenize(server.url, prompt="Hello there", return_token_ids=True).json()
    assert set(with_ids) == {"count", "max_model_len", "tokens"}
    assert (
        len(with_ids["tokens"])
        == with_ids["count"]
        == _tokenize(server.url, prompt="Hello there").json()["count"]
    )


def test_the_client_dry_runs_and_detokenizes(server):
    documents = [Document(**d) for d in DOCUMENTS]
    options = RagOptions(max_context_tokens=150)
    client = RagClient(f"{server.url}/v1", model=MODEL, max_retries=0)
    try:
        plan = client.dry_run(
            QUESTION[0]["content"], documents, options=options, max_tokens=4, return_token_ids=True
        )
        answer = client.answer(
            QUESTION[0]["content"],
            documents,
            options=options,
            max_tokens=4,
            temperature=0,
            extra_headers=NO_CACHE,
        )
        assert [d.id for d in plan.used_documents] == answer.used_documents
        assert [d.id for d in plan.dropped_documents] == answer.dropped_documents
        assert plan.prompt_tokens == answer.prompt_tokens == len(plan.tokens)
        assert plan.budget.reserved_for_answer == 4 and plan.budget.max_context_tokens == 150
        assert "Verdant Bridge" in client.detokenize(plan.tokens)
        with pytest.raises(openai.BadRequestError) as refused:
            client.detokenize([10**9])
        assert refused.value.body["param"] == "tokens"
    finally:
        client.close()

    async def run_async() -> None:
        async_client = AsyncRagClient(f"{server.url}/v1", model=MODEL, max_retries=0)
        try:
            async_plan = await async_client.dry_run(
                QUESTION[0]["content"], documents, options=options, max_tokens=4
            )
            assert async_plan.dropped_documents == plan.dropped_documents
            assert async_plan.tokens is None
            assert await async_client.detokenize(plan.tokens[:3]) == client_text
        finally:
            await async_client.close()

    client_text = httpx.post(
        f"{server.url}/detokenize", json={"model": MODEL, "tokens": plan.tokens[:3]}
    ).json()["prompt"]
    asyncio.run(run_async())


@pytest.mark.parametrize(
    ("tokens", "code"),
    [
        ([10**9], "invalid_value"),  # outside the vocabulary
        ([-1], "invalid_value"),
        ([1.5], "invalid_value"),
        ([True], "invalid_value"),
        (["1"], "invalid_value"),
        ([[1]], "invalid_value"),
        ("1 2 3", "invalid_value"),
        ([2**40], "invalid_value"),
        (list(range(8193)), "array_above_max_length"),  # past the 8,192-token context
        ([0] * (2**20 + 1), "json_too_large"),  # past any context: refused as it is decoded
    ],
    ids=lambda value: repr(value)[:24],
)
def test_detokenize_refuses_ids_it_cannot_decode_with_a_400(server, tokens, code):
    response = httpx.post(
        f"{server.url}/detokenize", json={"model": MODEL, "tokens": tokens}, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"].startswith("tokens"), error


def test_detokenize_of_nothing_is_empty_and_an_unknown_model_is_a_404(server):
    empty = httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": []})
    assert empty.status_code == 200 and empty.json() == {"prompt": ""}
    unknown = httpx.post(f"{server.url}/detokenize", json={"model": "nope", "tokens": [1]})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_documents_go_with_messages_and_an_unfittable_dry_run_is_refused(small_window):
    with_prompt = _tokenize(small_window.url, prompt="Hi", documents=DOCUMENTS)
    assert with_prompt.status_code == 400
    assert with_prompt.json()["error"]["param"] == "documents"
    no_room = _tokenize(
        small_window.url, messages=QUESTION, documents=DOCUMENTS, max_tokens=SMALL_WINDOW
    )
    assert no_room.status_code == 400
    assert no_room.json()["error"]["code"] == "context_length_exceeded"


def test_detokenize_is_admitted_and_rate_limited_as_tokenize_is(small_window):
    headers = {"Authorization": f"Bearer {TIGHT_KEY}"}
    statuses = [
        httpx.post(f"{small_window.url}{path}", json=body, headers=headers, timeout=30).status_code
        for path, body in [
            ("/detokenize", {"model": MODEL, "tokens": [1, 2]}),
            ("/tokenize", {"model": MODEL, "prompt": "Hi"}),
            ("/detokenize", {"model": MODEL, "tokens": [3]}),
            ("/detokenize", {"model": MODEL, "tokens": [4]}),
            ("/tokenize", {"model": MODEL, "prompt": "Hi", "documents": DOCUMENTS}),
        ]
    ]
    assert statuses == [200, 200, 200, 429, 429]
    wrong = httpx.post(
        f"{small_window.url}/detokenize",
        content=b"{not json",
        headers={"Authorization": "Bearer wrong"},
    )
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
