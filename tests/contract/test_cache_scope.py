"""Tenants isolated in the prefix cache, through real servers with API keys and the official SDK.

A cache hit shows (``usage.prompt_tokens_details.cached_tokens``, a faster first token), so a cache
shared across tenants tells one what another sent. Here: another tenant finds nothing cached for a
tenant's prompt while the tenant's own repeats hit; keys of one ``cache_group`` share; a different
``cache_salt`` misses; and a gateway sends upstream a ``cache_salt`` that keeps tenants apart there too
(``MisbehavingUpstream`` stands in for the upstream where what it receives is the point; a real
in-process server behind a gateway shows the isolation end to end).
"""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.misbehaving_upstream import MisbehavingUpstream
from tests.support.servers import MODEL, ServerProcess

NO_RESPONSE_CACHE = {"Cache-Control": "no-cache, no-store"}
KEYS = [
    {"id": "alpha-1", "key": "key-alpha-1", "cache_group": "alpha"},
    {"id": "alpha-2", "key": "key-alpha-2", "cache_group": "alpha"},
    {"id": "beta", "key": "key-beta"},
]
MIN_DOCUMENT_HIT = 200  # tokens: the documents' whole blocks (the prompt is ~300 tokens)


def _documents() -> str:
    """A system prompt no other test sends (so its first use cannot be a hit), some 300 tokens long."""
    words = uuid.uuid4().hex  # first, so that not even the prompt's first block was seen before
    return f"{words} Answer from these documents only.\n" + "\n".join(
        f"[doc{i}] The {words[i % 32]}-series archive lists {100 + 7 * i} records for region {words[i : i + 6]}."
        for i in range(20)
    )


def _cached(client: openai.OpenAI, system: str, question: str, **extra_body) -> int:
    answer = client.chat.completions.create(
        model=MODEL,
        max_tokens=2,
        temperature=0,
        extra_headers=NO_RESPONSE_CACHE,
        extra_body=extra_body or None,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
    )
    return answer.usage.prompt_tokens_details.cached_tokens


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("keyed")
    keys_file = log_dir / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    server = ServerProcess(log_dir=log_dir, env={"RAGLLM_AUTH__KEYS_FILE": str(keys_file)})
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tenants(keyed) -> dict[str, openai.OpenAI]:
    return {key["id"]: _client(keyed.url, key["key"]) for key in KEYS}


def test_another_tenant_finds_nothing_cached_and_the_owner_still_hits(tenants):
    system = _documents()
    assert _cached(tenants["alpha-1"], system, "Which region has the most records?") == 0
    assert _cached(tenants["beta"], system, "Which region has the most records?") == 0
    assert (
        _cached(tenants["alpha-1"], system, "How many records does doc3 list?") >= MIN_DOCUMENT_HIT
    )
    assert (
        _cached(tenants["beta"], system, "How many records does doc3 list?") >= MIN_DOCUMENT_HIT
    )  # its own


def test_keys_of_one_cache_group_share_their_prefixes(tenants):
    system = _documents()
    assert _cached(tenants["alpha-1"], system, "Summarise doc1.") == 0
    assert _cached(tenants["alpha-2"], system, "Summarise doc2.") >= MIN_DOCUMENT_HIT


def test_a_different_cache_salt_misses_and_the_same_one_hits(tenants):
    system = _documents()
    alpha, beta = tenants["alpha-1"], tenants["beta"]
    assert _cached(alpha, system, "Which doc lists 107 records?", cache_salt="project-x") == 0
    assert _cached(alpha, system, "Which doc lists 114 records?") == 0  # unsalted: another scope
    assert _cached(alpha, system, "Which doc lists 121 records?", cache_salt="project-y") == 0
    assert (
        _cached(alpha, system, "Which doc lists 128 records?", cache_salt="project-x")
        >= MIN_DOCUMENT_HIT
    )
    # Another tenant naming the same salt stays in its own group's scope.
    assert _cached(beta, system, "Which doc lists 135 records?", cache_salt="project-x") == 0


def test_text_completions_are_scoped_too(keyed):
    prompt = _documents() + "\nQuestion: which region has the most records?\nAnswer:"

    def cached(key: str, **extra) -> int:
        response = httpx.post(
            f"{keyed.url}/v1/completions",
            headers={**NO_RESPONSE_CACHE, "Authorization": f"Bearer {key}"},
            json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0, **extra},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("key-alpha-1") == 0
    assert cached("key-beta") == 0 and cached("key-alpha-1", cache_salt="s") == 0
    assert cached("key-alpha-2") >= MIN_DOCUMENT_HIT and cached("key-beta") >= MIN_DOCUMENT_HIT


def test_the_response_cache_answers_a_salted_request_from_its_own_salt_only(keyed):
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "temperature": 0,
        "messages": [{"role": "user", "content": f"Say hello to {uuid.uuid4().hex}."}],
    }

    def cache_result(**extra) -> str:
        response = httpx.post(
            f"{keyed.url}/v1/chat/completions",
            json={**body, **extra},
            timeout=120,
            headers={"Authorization": "Bearer key-alpha-1"},
        )
        assert response.status_code == 200, response.text
        return response.headers["x-ragllm-cache"]

    assert cache_result() == "miss" and cache_result() == "hit"
    assert cache_result(cache_salt="s") == "miss" and cache_result(cache_salt="s") == "hit"
    assert cache_result(cache_salt="t") == "miss"


def _chat_status(url: str, cache_salt, key: str = "key-beta") -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        timeout=120,
        headers={**NO_RESPONSE_CACHE, "Authorization": f"Bearer {key}"},
        json={
            "model": MODEL,
            "max_tokens": 1,
            "temperature": 0,
            "cache_salt": cache_salt,
            "messages": [{"role": "user", "content": "Hi"}],
        },
    )


def _assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "cache_salt" and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "value",
    ["", " ", "\t\n", "x" * 257, "é" * 257, 7, 1.5, True, ["a"], {"salt": "a"}, [[["deep"]]]],
)
def test_a_bad_cache_salt_is_a_400_naming_it(keyed, value):
    _assert_refused(_chat_status(keyed.url, value))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=300),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=40,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(value=json_values | st.text(min_size=250, max_size=2000) | st.text(max_size=4))
def test_any_cache_salt_is_answered_or_refused_with_a_400_never_a_500(keyed, value):
    response = _chat_status(keyed.url, value)
    if value is None or (isinstance(value, str) and 1 <= len(value) <= 256 and value.strip()):
        assert response.status_code == 200, response.text
    else:
        _assert_refused(response)


# -- a gateway in front of an upstream --------------------------------------------------------------
def _gateway(
    upstream_url: str, log_dir, mode: str | None = None, upstream_key: str | None = None
) -> ServerProcess:
    env = {
        "RAGLLM_UPSTREAM__URLS": upstream_url,
        "RAGLLM_AUTH__KEYS": "gamma:key-gamma,delta:key-delta",
        "RAGLLM_UPSTREAM__PROBE_INTERVAL_S": "0.3",
    }
    if mode is not None:
        env["RAGLLM_UPSTREAM__CACHE_SALT"] = mode
    if upstream_key is not None:
        env["RAGLLM_UPSTREAM__API_KEY"] = upstream_key
    return ServerProcess("--engine", "upstream", log_dir=log_dir, env=env)


def _salts_sent(tmp_path, mode: str | None) -> list[str | None]:
    """What the upstream received as cache_salt for: gamma, gamma salted "s", delta salted "s", gamma
    salted "s" again, gamma salted "t"."""
    upstream = MisbehavingUpstream().start()
    gateway = _gateway(upstream.url, tmp_path, mode)
    try:
        gateway.wait_ready()
        for key, salt in [
            ("key-gamma", None),
            ("key-gamma", "s"),
            ("key-delta", "s"),
            ("key-gamma", "s"),
            ("key-gamma", "t"),
        ]:
            extra = {} if salt is None else {"cache_salt": salt}
            response = httpx.post(
                f"{gateway.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": MODEL, "messages": [{"role": "user", "content": "good"}], **extra},
                timeout=30,
            )
            assert response.status_code == 200, response.text
        return [body.get("cache_salt") for body in upstream.received]
    finally:
        gateway.stop()
        upstream.stop()


def test_a_gateway_sends_each_tenant_and_salt_its_own_derived_cache_salt(tmp_path):
    gamma, gamma_s, delta_s, gamma_s_again, gamma_t = _salts_sent(
        tmp_path, None
    )  # the default: tenant
    assert all(
        isinstance(salt, str) and len(salt) == 64 for salt in (gamma, gamma_s, delta_s, gamma_t)
    )
    assert len({gamma, gamma_s, delta_s, gamma_t}) == 4 and gamma_s_again == gamma_s
    assert "s" not in (gamma_s, delta_s)  # never the client's own: it could name another tenant's


@pytest.mark.parametrize(
    "mode, expected", [("client", [None, "s", "s", "s", "t"]), ("off", [None] * 5)]
)
def test_a_gateway_can_forward_the_clients_cache_salt_as_sent_or_none(tmp_path, mode, expected):
    assert _salts_sent(tmp_path, mode) == expected


def test_tenants_behind_a_gateway_are_isolated_in_the_upstreams_prefix_cache(keyed, tmp_path):
    # The in-process server is the upstream; the gateway holds one of its keys, as a deployment would.
    gateway = _gateway(keyed.url, tmp_path, upstream_key="key-beta")
    try:
        gateway.wait_ready()
        gamma, delta = _client(gateway.url, "key-gamma"), _client(gateway.url, "key-delta")
        system = _documents()
        # Questions all different: the upstream's own response cache (all one key there) must not answer.
        assert _cached(gamma, system, "Which region has the most records?") == 0
        assert _cached(delta, system, "Which region has the fewest records?") == 0
        assert _cached(gamma, system, "How many records does doc3 list?") >= MIN_DOCUMENT_HIT
    finally:
        gateway.stop()
