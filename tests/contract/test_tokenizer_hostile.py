"""Hostile bodies for /tokenize's dry run (documents, rag, the answer's room, return_token_ids) and
for /detokenize, against a real server with the packaged model: deep, wide, wrongly typed, oversized
values and token lists. Every answer is a success of the documented shape or a 4xx in OpenAI's
envelope, never a 5xx, and /health answers quickly after each.

Bodies are written as text (a value 5,000 levels deep is past what any JSON encoder writes), the
hostile value spliced into an otherwise valid request.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import httpx
import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.servers import MODEL

EXAMPLES = 120
HEALTH_BOUND_S = 1.0  # /health after each request: the loop was not left stalled


def _deep(kind: str, depth: int) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a": ' * depth + "1" + "}" * depth


def _wide(kind: str, width: int) -> str:
    if kind == "list":
        return "[" + ",".join(str(i % 50_000) for i in range(width)) + "]"
    return "{" + ",".join(f'"k{i}": {i}' for i in range(width)) + "}"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
hostile_values = st.one_of(
    st.builds(
        _deep,
        st.sampled_from(["list", "object"]),
        st.sampled_from([2, 63, 64, 65, 250, 1025, 5000]) | st.integers(1, 6000),
    ),
    st.builds(
        _wide,
        st.sampled_from(["list", "object"]),
        st.sampled_from([10, 8192, 8193, 100_000, 260_000]) | st.integers(0, 20_000),
    ),
    st.sampled_from([1 << 10, 1 << 20, 9 << 20]).map(
        lambda size: orjson.dumps("x" * size).decode()
    ),
    json_values.map(json.dumps),
)
# Token lists a client may send: ids of every size and sign, floats, booleans, strings, nesting.
hostile_token_lists = st.one_of(
    st.lists(st.integers(-(2**70), 2**70), max_size=50).map(json.dumps),
    st.lists(st.integers(0, 49_151), max_size=300).map(json.dumps),  # the vocabulary's own ids
    st.lists(
        st.integers(0, 60_000) | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=3),
        max_size=20,
    ).map(json.dumps),
    hostile_values,
)

DOCUMENT = {"id": "d1", "text": "The bridge opened in 1987.", "score": 0.5}
QUESTION = [{"role": "user", "content": "When did the bridge open?"}]
# field → how a hostile value sits in a dry-run request (``{}`` marks the spot)
DRY_RUN_PLACEMENTS = {
    "documents": '"documents": {}',
    "documents[].text": '"documents": [{"id": "d1", "text": {}}]',
    "documents[].id": '"documents": [{"id": {}, "text": "t"}]',
    "documents[].score": '"documents": [{"id": "d1", "text": "t", "score": {}}]',
    "documents[] (many)": '"documents": [' + ",".join([json.dumps(DOCUMENT)] * 3) + ", {}]",
    "rag": '"documents": [' + json.dumps(DOCUMENT) + '], "rag": {}',
    "rag.max_context_tokens": '"documents": [' + json.dumps(DOCUMENT) + '], "rag": '
    '{"max_context_tokens": {}}',
    "rag.template": '"documents": [' + json.dumps(DOCUMENT) + '], "rag": {"template": {}}',
    "max_tokens": '"documents": [' + json.dumps(DOCUMENT) + '], "max_tokens": {}',
    "max_completion_tokens": '"documents": [' + json.dumps(DOCUMENT) + "], "
    '"max_completion_tokens": {}',
    "return_token_ids": '"documents": [' + json.dumps(DOCUMENT) + '], "return_token_ids": {}',
    "return_token_strs": '"return_token_strs": {}',
    "messages": '"documents": [' + json.dumps(DOCUMENT) + '], "messages": {}',
}


def _dry_run_body(field: str, value: str) -> str:
    spliced = DRY_RUN_PLACEMENTS[field].replace("{}", value, 1)
    base = {"model": MODEL} if field == "messages" else {"model": MODEL, "messages": QUESTION}
    return orjson.dumps(base).decode()[:-1] + ", " + spliced + "}"


def _detokenize_body(shape: str, value: str) -> str:
    if shape == "tokens":
        return '{"model": %s, "tokens": %s}' % (json.dumps(MODEL), value)
    if shape == "model":
        return '{"model": %s, "tokens": [1, 2]}' % value
    return value  # the whole body


def _check(client: httpx.Client, url: str, response: httpx.Response, label: str) -> None:
    assert response.status_code < 500, (label, response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, (label, error)
        assert isinstance(error["message"], str) and error["message"], (label, error)
        assert error["code"] is None or isinstance(error["code"], str), (label, error)
    started = time.perf_counter()
    assert client.get(f"{url}/health").status_code == 200
    assert time.perf_counter() - started < HEALTH_BOUND_S, label


def test_hostile_dry_run_bodies_are_a_4xx_never_a_5xx(server):
    statuses: Counter[tuple[str, int]] = Counter()

    @given(field=st.sampled_from(sorted(DRY_RUN_PLACEMENTS)), value=hostile_values)
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def one_request(client, field, value):
        body = _dry_run_body(field, value)
        label = f"{field} ({len(body)} bytes): {body[:200]}"
        response = client.post(f"{server.url}/tokenize", content=body.encode())
        _check(client, server.url, response, label)
        if response.status_code == 200:
            answer = response.json()
            assert isinstance(answer["count"], int) and answer["count"] > 0, label
            if "rag" in answer:
                assert answer["rag"]["prompt_tokens"] == answer["count"], label
        statuses[(field, response.status_code)] += 1

    for field, value in [
        ("documents[] (many)", json.dumps(DOCUMENT)),  # a duplicate id
        ("rag.max_context_tokens", "0"),
        ("max_tokens", str(2**31)),
        ("documents[].score", "1e308"),
        ("documents", _wide("list", 100_000)),
        ("return_token_ids", '"yes"'),
    ]:
        one_request = example(field=field, value=value)(one_request)
    with httpx.Client(timeout=120) as client:
        one_request(client)
    print("\n" + ", ".join(f"{f} {s}: {n}" for (f, s), n in sorted(statuses.items())))
    assert any(status == 200 for _, status in statuses), "no dry run was ever answered"


def test_hostile_detokenize_bodies_are_a_4xx_never_a_5xx(server):
    statuses: Counter[tuple[str, int]] = Counter()

    @given(
        shape=st.sampled_from(["tokens"] * 4 + ["model", "body"]),
        value=hostile_token_lists,
    )
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def one_request(client, shape, value):
        body = _detokenize_body(shape, value)
        label = f"{shape} ({len(body)} bytes): {body[:200]}"
        response = client.post(f"{server.url}/detokenize", content=body.encode())
        _check(client, server.url, response, label)
        if response.status_code == 200:
            assert isinstance(response.json()["prompt"], str), label
        statuses[(shape, response.status_code)] += 1

    for value in [
        "[49151, 0, 1]",
        "[49152]",
        "[-1]",
        str([2**63]),
        str([2**64]),
        "[1e400]",
        "[1.0]",
        "[true]",
        '["1"]',
        "[null]",
        _wide("list", 8193),
        _wide("list", 260_000),
    ]:
        one_request = example(shape="tokens", value=value)(one_request)
    with httpx.Client(timeout=120) as client:
        one_request(client)
    print("\n" + ", ".join(f"{f} {s}: {n}" for (f, s), n in sorted(statuses.items())))
    assert statuses[("tokens", 200)] >= 1 and statuses[("tokens", 400)] >= 1


def test_token_ids_are_only_returned_for_a_prompt_that_fits_the_context(server):
    """Counting any prompt stays vLLM's /tokenize, but its ids and token strings come back only for a
    prompt the model could run: 8 MiB of text once cost 13 s of CPU, 1.7 GB of memory and a 43 MB
    answer, unbilled. Past the context it is a 400, refused from the bytes alone where it can be."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        max_model_len = client.post("/tokenize", json={"model": MODEL, "prompt": "hi"}).json()[
            "max_model_len"
        ]
        huge = "x " * 4_000_000
        for flag in ("return_token_ids", "return_token_strs"):
            started = time.perf_counter()
            response = client.post("/tokenize", json={"model": MODEL, "prompt": huge, flag: True})
            assert response.status_code == 400, response.text[:300]
            assert response.json()["error"]["code"] == "context_length_exceeded"
            assert time.perf_counter() - started < 2.0
        # Past the context by tokens but not by bytes: counted, then refused before any string.
        over = "x " * (max_model_len + 100)
        counted = client.post("/tokenize", json={"model": MODEL, "prompt": over})
        assert counted.status_code == 200 and counted.json()["count"] > max_model_len
        for messages in (None, [{"role": "user", "content": over}]):
            body = {"model": MODEL, "return_token_strs": True}
            body |= {"messages": messages} if messages else {"prompt": over}
            response = client.post("/tokenize", json=body)
            assert response.status_code == 400, response.text[:300]
            error = response.json()["error"]
            assert error["code"] == "context_length_exceeded"
            assert error["param"] == ("messages" if messages else "prompt")
        fits = client.post(
            "/tokenize", json={"model": MODEL, "prompt": "x " * 100, "return_token_strs": True}
        ).json()
        assert fits["count"] == len(fits["tokens"]) == len(fits["token_strs"]) > 100


def test_a_dry_run_does_not_count_megabytes_of_documents_no_prompt_could_hold(server):
    """8 MB of documents past the context once cost the dry run 14 s of CPU and half a gigabyte on
    the tokenizer, where the completion's packing never reads them: now they are reported uncounted."""
    documents = [{"id": f"d{i:04}", "text": "x " * 4000} for i in range(1000)]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "documents": documents}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        started = time.perf_counter()
        response = client.post("/tokenize", json=body)
        elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text[:300]
    report = response.json()["rag"]
    assert len(report["used_documents"]) + len(report["dropped_documents"]) == 1000
    assert all(isinstance(d["tokens"], int) for d in report["used_documents"])
    uncounted = [d for d in report["dropped_documents"] if d["tokens"] is None]
    assert len(uncounted) > 900
    assert elapsed < 6.0, elapsed
