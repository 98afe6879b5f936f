"""/tokenize and /detokenize through a gateway (`ragllm serve --engine upstream`): token ids come from
the upstream's own /tokenize and text from its /detokenize, the dry run packs with the upstream's
counts; an upstream without ids (an older server) makes the gateway refuse plainly with a 501 in
OpenAI's envelope, while plain counts still work. The upstream is ``WordUpstream``, a double whose
tokenizer makes a token of each word."""

from __future__ import annotations

import httpx
import pytest

from tests.support.servers import MODEL, ServerProcess
from tests.support.word_upstream import MAX_MODEL_LEN, WordUpstream

QUESTION = [{"role": "user", "content": "When did the bridge open?"}]
DOCUMENTS = [
    {"id": "bridge", "text": "The bridge opened in 1987. " * 10, "score": 0.9},
    {"id": "ferry", "text": "A ferry crossed the river every hour. " * 10, "score": 0.5},
]


def _gateway(tmp_path_factory, with_ids: bool):
    upstream = WordUpstream(with_ids=with_ids).start()
    server = ServerProcess(
        "--engine",
        "upstream",
        log_dir=tmp_path_factory.mktemp("gateway-tokenizer"),
        env={"RAGLLM_UPSTREAM__URLS": upstream.url},
    )
    server.upstream = upstream
    return server


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    server = _gateway(tmp_path_factory, with_ids=True)
    try:
        yield server.wait_ready()
    finally:
        server.stop()
        server.upstream.stop()


@pytest.fixture(scope="module")
def gateway_without_ids(tmp_path_factory):
    server = _gateway(tmp_path_factory, with_ids=False)
    try:
        yield server.wait_ready()
    finally:
        server.stop()
        server.upstream.stop()


def _post(server: ServerProcess, path: str, **fields) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"model": MODEL, **fields}, timeout=30)


def test_token_ids_and_strings_come_from_the_upstreams_tokenizer(gateway):
    answer = _post(
        gateway, "/tokenize", messages=QUESTION, return_token_ids=True, return_token_strs=True
    ).json()
    words = "user: When did the bridge open?\nassistant:".split()
    assert answer["token_strs"] == words
    assert answer["tokens"] == [gateway.upstream.vocabulary.ids[w] for w in words]
    assert answer["count"] == len(words) and answer["max_model_len"] == MAX_MODEL_LEN
    path, sent = gateway.upstream.received[-1]
    assert path == "/tokenize" and sent["return_token_ids"] and sent["messages"] == QUESTION
    text = _post(gateway, "/detokenize", tokens=answer["tokens"]).json()["prompt"]
    assert text == " ".join(words)


def test_the_dry_run_packs_with_the_upstreams_counts(gateway):
    answer = _post(
        gateway,
        "/tokenize",
        messages=QUESTION,
        documents=DOCUMENTS,
        rag={"max_context_tokens": 80},
        max_tokens=16,
    )
    assert answer.status_code == 200, answer.text
    report = answer.json()["rag"]
    assert [d["id"] for d in report["used_documents"]] == ["bridge"]
    assert [d["id"] for d in report["dropped_documents"]] == ["ferry"]
    # One token a word: the document alone as the template renders it ("[bridge]" and its text).
    assert report["used_documents"][0]["tokens"] == 1 + 5 * 10
    assert report["dropped_documents"][0]["tokens"] == 1 + 7 * 10
    assert report["prompt_tokens"] == answer.json()["count"]
    assert report["budget"] == {
        "max_model_len": MAX_MODEL_LEN,
        "reserved_for_answer": 16,
        "max_context_tokens": 80,
    }


def test_the_upstreams_refusal_of_an_id_is_passed_on(gateway):
    refused = _post(gateway, "/detokenize", tokens=[10**6])
    assert refused.status_code == 400
    assert "out of vocabulary" in refused.json()["error"]["message"]
    past_window = _post(gateway, "/detokenize", tokens=[0] * (MAX_MODEL_LEN + 1))
    assert past_window.status_code == 400
    assert past_window.json()["error"]["code"] == "array_above_max_length"


def test_an_upstream_without_ids_is_a_plain_501(gateway_without_ids):
    counted = _post(gateway_without_ids, "/tokenize", messages=QUESTION)
    assert counted.status_code == 200 and counted.json()["count"] == 7
    for path, fields, param in [
        ("/tokenize", {"messages": QUESTION, "return_token_ids": True}, "return_token_ids"),
        ("/detokenize", {"tokens": [0, 1]}, "tokens"),
    ]:
        refused = _post(gateway_without_ids, path, **fields)
        assert refused.status_code == 501, refused.text
        error = refused.json()["error"]
        assert error["code"] == "not_supported_by_engine" and error["param"] == param, error
