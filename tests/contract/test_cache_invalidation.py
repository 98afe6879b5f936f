"""Invalidation by document, through real servers with the packaged model and the official SDK: once
a document is invalidated, the cached answers that used it miss and every other answer still hits,
with the in-memory cache and with a real Redis; per cache group when one is named; a document's new
version misses; a dropped document is not one an answer used. Only an admin key opens the route, and
any body a client can send is answered with a 200 or a 4xx in OpenAI's envelope, never a 500.
"""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.servers import MODEL, ServerProcess

KEYS = [
    {"id": "alpha-1", "key": "key-alpha-1", "cache_group": "alpha"},
    {"id": "alpha-2", "key": "key-alpha-2", "cache_group": "alpha"},
    {"id": "beta", "key": "key-beta"},
]
ADMIN = {"Authorization": "Bearer admin-secret"}
INVALIDATE = "/admin/cache/invalidate"


@pytest.fixture(scope="module", params=["memory", "redis"])
def served(request, tmp_path_factory, shared_redis_url):
    """A server with tenants' keys and an admin key, its response cache in memory or in Redis."""
    log_dir = tmp_path_factory.mktemp(f"invalidation-{request.param}")
    keys_file = log_dir / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    env = {"RAGLLM_AUTH__KEYS_FILE": str(keys_file), "RAGLLM_AUTH__ADMIN_KEYS": "ops:admin-secret"}
    if request.param == "redis":
        env |= {
            "REDIS_URL": shared_redis_url,
            "RAGLLM_REDIS__PREFIX": f"invalidation-{uuid.uuid4().hex[:12]}",
        }
    server = ServerProcess(log_dir=log_dir, env=env)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _client(server: ServerProcess, key: str = "key-alpha-1") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def _document(id_: str, text: str = "", **fields) -> dict:
    return {"id": id_, "text": text or f"Record {id_} lists the archive's opening hours.", **fields}


def _asked(
    client: openai.OpenAI, question: str, documents: list[dict], **extra
) -> tuple[str, dict]:
    """What the response cache did for a deterministic RAG request, and the answer's rag report."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        max_tokens=3,
        temperature=0,
        messages=[{"role": "user", "content": question}],
        extra_body={"documents": documents, **extra},
    )
    return raw.headers["x-ragllm-cache"], raw.parse().to_dict()["rag"]


def _cache(client: openai.OpenAI, question: str, documents: list[dict], **extra) -> str:
    return _asked(client, question, documents, **extra)[0]


def _invalidate(server: ServerProcess, headers: dict | None = ADMIN, **body) -> httpx.Response:
    return httpx.post(f"{server.url}{INVALIDATE}", json=body, headers=headers, timeout=30)


def _ids(count: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"doc-{run}-{index}" for index in range(count)]


def test_invalidating_a_document_evicts_exactly_the_answers_that_used_it(served):
    client = _client(served)
    edited, kept, other = _ids(3)
    asked = [
        ("Which hours does the archive open?", [_document(edited), _document(kept)]),
        ("When does the archive close?", [_document(edited)]),
        ("Is the archive open on Sunday?", [_document(kept), _document(other)]),
    ]
    for question, documents in asked:
        assert _cache(client, question, documents) == "miss"
        assert _cache(client, question, documents) == "hit"
    response = _invalidate(served, document_ids=[edited])
    assert response.status_code == 200, response.text
    assert response.json() == {
        "object": "cache.invalidation",
        "evicted": 2,
        "document_ids": 1,
        "cache_groups": 2,
    }
    assert [_cache(client, q, d) for q, d in asked] == ["miss", "miss", "hit"]
    assert [_cache(client, q, d) for q, d in asked] == ["hit", "hit", "hit"]  # cached anew
    assert _invalidate(served, document_ids=[edited]).json()["evicted"] == 2
    assert _invalidate(served, document_ids=[edited]).json()["evicted"] == 0


def test_an_invalidation_named_for_one_cache_group_leaves_the_others_answers(served):
    (shared,) = _ids(1)
    question, documents = "What does the record list?", [_document(shared)]
    alpha_1, alpha_2, beta = (_client(served, key["key"]) for key in KEYS)
    for client in (alpha_1, alpha_2, beta):  # the response cache is per key
        assert _cache(client, question, documents) == "miss"
    response = _invalidate(served, document_ids=[shared], cache_group="beta")
    assert response.json()["evicted"] == 1 and response.json()["cache_groups"] == 1
    assert _cache(beta, question, documents) == "miss"
    assert _cache(alpha_1, question, documents) == "hit"
    # The group's every key: alpha's two entries go together.
    assert _invalidate(served, document_ids=[shared], cache_group="alpha").json()["evicted"] == 2
    assert _cache(alpha_2, question, documents) == "miss"
    unknown = _invalidate(served, document_ids=[shared], cache_group="gamma")
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "cache_group"


def test_a_changed_version_misses_and_the_old_version_keeps_its_answer(served):
    client = _client(served)
    (doc,) = _ids(1)
    question = "How long is the archive open?"

    def cache(version: str | None) -> str:
        fields = {} if version is None else {"version": version}
        return _cache(client, question, [_document(doc, **fields)])

    assert cache("v1") == "miss" and cache("v1") == "hit"
    assert cache("v2") == "miss" and cache("v2") == "hit"
    assert cache(None) == "miss"
    assert cache("v1") == "hit"
    assert _invalidate(served, document_ids=[doc]).json()["evicted"] == 3  # every version's


def test_a_dropped_document_is_not_one_the_answer_used(served):
    client = _client(served)
    packed, dropped = _ids(2)
    documents = [
        _document(packed, "The archive opens at nine.", score=0.9),
        _document(dropped, "The archive's history, at length. " * 60, score=0.1),
    ]
    question, cap = "When does the archive open?", {"rag": {"max_context_tokens": 48}}
    cache, report = _asked(client, question, documents, **cap)
    assert cache == "miss" and report["dropped_documents"] == [dropped]
    assert _invalidate(served, document_ids=[dropped]).json()["evicted"] == 0
    assert _asked(client, question, documents, **cap)[0] == "hit"
    assert _invalidate(served, document_ids=[packed]).json()["evicted"] == 1


REFUSED = [
    ({"Authorization": "Bearer key-alpha-1"}, 403, "admin_key_required"),  # a tenant's key
    ({"Authorization": "Bearer key-beta"}, 403, "admin_key_required"),
    ({}, 401, "invalid_api_key"),
    ({"Authorization": "Bearer not-a-key"}, 401, "invalid_api_key"),
    ({"Authorization": "Basic admin-secret"}, 401, "invalid_api_key"),
]


def test_only_an_admin_key_opens_the_route(served):
    client = _client(served)
    (doc,) = _ids(1)
    assert _cache(client, "What does it list?", [_document(doc)]) == "miss"
    for headers, status, code in REFUSED:
        response = _invalidate(served, headers, document_ids=[doc])
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert _cache(client, "What does it list?", [_document(doc)]) == "hit"  # nothing evicted


def test_an_admin_key_cannot_generate(served):
    with pytest.raises(openai.AuthenticationError):
        _client(served, "admin-secret").chat.completions.create(
            model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "Hi"}]
        )


def test_with_no_admin_key_configured_the_route_is_refused_and_says_why(server):
    response = httpx.post(
        f"{server.url}{INVALIDATE}",
        json={"document_ids": ["a"]},
        headers={"Authorization": "Bearer anything"},
        timeout=30,
    )
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "admin_disabled" and "RAGLLM_AUTH__ADMIN_KEYS" in error["message"]


# -- hostile bodies ---------------------------------------------------------------------------
def _raw(server: ServerProcess, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{server.url}{INVALIDATE}",
        content=body,
        headers={**ADMIN, "Content-Type": "application/json"},
        timeout=60,
    )


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"document_ids": ["x" * 129]}, 400, "document_ids.0"),
        ({"document_ids": ["a b"]}, 400, "document_ids.0"),
        ({"document_ids": ["[a]"]}, 400, "document_ids.0"),
        ({"document_ids": [f"d{i}" for i in range(1025)]}, 400, "document_ids"),
        ({"document_ids": []}, 400, "document_ids"),
        ({"document_ids": "a"}, 400, "document_ids"),
        ({"document_ids": [7]}, 400, "document_ids.0"),
        ({}, 400, "document_ids"),
        ({"document_ids": ["a"], "cache_group": ""}, 400, "cache_group"),
        ({"document_ids": ["a"], "cache_group": ["alpha"]}, 400, "cache_group"),
        ({"document_ids": ["a"], "documents_ids": ["b"]}, 400, "documents_ids"),
        ({"document_ids": ["a"] * 20_000}, 400, "document_ids"),
        ({"document_ids": ["x" * 300_000]}, 413, None),
    ],
)
def test_a_bad_body_is_a_4xx_naming_the_field(served, body, status, param):
    response = _raw(served, json.dumps(body).encode())
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=140),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)
hostile_text = st.one_of(
    st.integers(1, 6000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(1, 6000).map(lambda depth: '{"a": ' * depth + "1" + "}" * depth),
    st.integers(0, 40_000).map(lambda width: json.dumps(["d"] * width)),
    st.sampled_from([1 << 10, 1 << 18, 1 << 20]).map(lambda size: json.dumps("x" * size)),
    json_values.map(json.dumps),
)
PLACES = ["{}", '{"document_ids": {}}', '{"document_ids": ["a"], "cache_group": {}}']


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@example(place='{"document_ids": {}}', value='["a", "b"]')
@example(place="{}", value="not json")
@given(place=st.sampled_from(PLACES), value=hostile_text | st.text(max_size=50))
def test_any_body_is_answered_or_refused_with_a_4xx_never_a_500(served, place, value):
    body = place.replace("{}", value, 1) if place != "{}" else value
    response = _raw(served, body.encode())
    assert response.status_code in (200, 400, 413), response.text
    payload = response.json()
    if response.status_code == 200:
        assert payload["object"] == "cache.invalidation" and payload["evicted"] >= 0
    else:
        assert set(payload["error"]) == {"message", "type", "param", "code"}
