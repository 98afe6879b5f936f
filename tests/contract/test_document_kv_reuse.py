"""``rag.kv_reuse`` against a real server with the packaged model: documents seen before, in another
order, are reused (cached_tokens, /health, /metrics); off, nothing is; hostile values get a 400."""

from __future__ import annotations

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.servers import MODEL

DOCUMENTS = [
    {"id": f"kv-{i}", "title": f"Record {i}", "text": f"Record {i} of the Tamsk archive. " * 12}
    for i in range(3)
]
QUESTION = [{"role": "user", "content": "Which record mentions the archive?"}]
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


def _ask(client, documents, rag):
    return client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=4,
        extra_body={"documents": documents, "rag": rag},
        extra_headers=NO_CACHE,
    )


def _store(server) -> dict:
    return httpx.get(f"{server.url}/health").json()["kv_cache"]["document_store"]


def test_documents_in_another_order_are_reused_and_counted(server, client):
    before = _store(server)
    first = _ask(client, DOCUMENTS, {"kv_reuse": True})
    reordered = _ask(client, DOCUMENTS[::-1], {"kv_reuse": True})
    after = _store(server)
    assert after["misses"] - before["misses"] >= 3
    assert after["hits"] - before["hits"] == 3
    assert after["blocks"] > 0 and after["tokens_reused"] > before["tokens_reused"]
    cached = reordered.usage.prompt_tokens_details.cached_tokens
    assert cached >= after["tokens_reused"] - before["tokens_reused"] > 0  # reused, as cached
    assert first.usage.prompt_tokens == reordered.usage.prompt_tokens
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "ragllm_document_kv_hits_total" in metrics and "ragllm_document_kv_blocks" in metrics


def test_off_by_default_and_when_asked_off(server, client):
    before = _store(server)
    _ask(client, DOCUMENTS[1:] + DOCUMENTS[:1], {})
    _ask(client, DOCUMENTS[:1] + DOCUMENTS[2:] + DOCUMENTS[1:2], {"kv_reuse": False})
    after = _store(server)
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=st.one_of(
        st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=3),
        st.lists(st.booleans(), min_size=1, max_size=3),
        st.text(max_size=40).filter(
            lambda t: (
                t.strip().lower()
                not in {"true", "false", "1", "0", "yes", "no", "on", "off", "t", "f", "y", "n"}
            )
        ),
        # Finite: the client cannot write NaN or infinity as JSON (raw bodies: test_hostile_json).
        st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f not in (0.0, 1.0)),
        st.integers().filter(lambda i: i not in (0, 1)),
        st.just("x" * 100_000),
    )
)
def test_a_wrongly_typed_switch_is_a_clear_400(client, value):
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(client, DOCUMENTS, {"kv_reuse": value})
    error = refused.value.body
    assert error["type"] == "invalid_request_error" and "kv_reuse" in str(error)
