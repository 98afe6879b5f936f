"""Cache keys: any field that can change the output changes the key; stream and ids do not."""

from __future__ import annotations

import dataclasses

import pytest

from ragllm.cache.keys import cache_key, is_deterministic
from ragllm.generation import GenerationRequest, ModelCard, SamplingParams
from ragllm.structured.spec import StructuredOutput
from ragllm.structured.thinking_first import ThinkingFirst

MODEL = ModelCard(id="m", max_model_len=100, fingerprint="fp_1")
BASE = GenerationRequest(
    request_id="a",
    params=SamplingParams(temperature=0.0),
    messages=[{"role": "user", "content": "hi"}],
)

CHANGED_PARAMS = {
    "max_tokens": 5,
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 3,
    "min_p": 0.1,
    "repetition_penalty": 1.2,
    "seed": 1,
    "stop": ("x",),
    "ignore_eos": True,
    "logprobs": 2,
    "structured": StructuredOutput("regex", "[ab]+"),
    "n": 2,
    "thinking": ThinkingFirst(64),
}


def test_every_sampling_field_is_covered_by_this_test():
    assert set(CHANGED_PARAMS) == {f.name for f in dataclasses.fields(SamplingParams)}


@pytest.mark.parametrize("field, value", sorted(CHANGED_PARAMS.items()))
def test_each_sampling_field_changes_the_key(field, value):
    changed = dataclasses.replace(BASE, params=dataclasses.replace(BASE.params, **{field: value}))
    assert cache_key(MODEL, changed, "t") != cache_key(MODEL, BASE, "t")


@pytest.mark.parametrize(
    "changed",
    [
        dataclasses.replace(BASE, messages=[{"role": "user", "content": "hi!"}]),
        dataclasses.replace(BASE, messages=[{"role": "system", "content": "hi"}]),
        dataclasses.replace(BASE, messages=None, prompt="hi"),
        dataclasses.replace(BASE, messages=None, prompt_token_ids=[1, 2]),
        dataclasses.replace(BASE, passthrough={"structured_outputs": {"regex": "[ab]+"}}),
        dataclasses.replace(BASE, passthrough={"tool_choice": "required"}),
        dataclasses.replace(
            BASE, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]
        ),
        dataclasses.replace(
            BASE, sampling_set=frozenset({"top_p"})
        ),  # set, not left to the model's default
    ],
)
def test_prompt_content_changes_the_key(changed):
    assert cache_key(MODEL, changed, "t") != cache_key(MODEL, BASE, "t")


def test_model_identity_and_tenant_change_the_key():
    key = cache_key(MODEL, BASE, "t")
    assert cache_key(dataclasses.replace(MODEL, id="other"), BASE, "t") != key
    assert cache_key(dataclasses.replace(MODEL, fingerprint="fp_2"), BASE, "t") != key
    assert cache_key(MODEL, BASE, "other-tenant") != key


def test_a_cache_salt_changes_the_key_and_no_salt_keeps_the_unsalted_key():
    from ragllm.generation import CacheScope

    key = cache_key(MODEL, BASE, "t")
    salted = [
        cache_key(MODEL, dataclasses.replace(BASE, cache_scope=CacheScope("t", salt)), "t")
        for salt in "xy"
    ]
    assert key not in salted and salted[0] != salted[1]
    # The cache group alone adds nothing: the tenant argument already keys the entry per API key.
    assert cache_key(MODEL, dataclasses.replace(BASE, cache_scope=CacheScope("t")), "t") == key


def test_request_id_does_not_change_the_key():
    assert cache_key(MODEL, dataclasses.replace(BASE, request_id="b"), "t") == cache_key(
        MODEL, BASE, "t"
    )


def test_only_greedy_or_seeded_requests_are_deterministic():
    assert is_deterministic(BASE)
    sampled = dataclasses.replace(BASE, params=SamplingParams(temperature=0.7))
    assert not is_deterministic(sampled)
    assert is_deterministic(
        dataclasses.replace(BASE, params=SamplingParams(temperature=0.7, seed=3))
    )


def test_equal_constraints_share_a_key_and_different_ones_do_not():
    def keyed(spec):
        return cache_key(
            MODEL,
            dataclasses.replace(BASE, params=dataclasses.replace(BASE.params, structured=spec)),
            "t",
        )

    assert keyed(StructuredOutput("json_schema", '{"type":"object"}', "guided_json")) == keyed(
        StructuredOutput("json_schema", '{"type":"object"}', "guided_json")
    )
    assert keyed(StructuredOutput("regex", "a+")) != keyed(StructuredOutput("regex", "b+"))
    assert keyed(StructuredOutput("choice", '["a"]')) != keyed(StructuredOutput("grammar", '["a"]'))


def test_a_packed_documents_version_changes_the_key_and_the_documents_enter_it():
    key = cache_key(MODEL, BASE, "t", (("doc1", None),))
    assert cache_key(MODEL, BASE, "t", (("doc1", "v2"),)) != key
    assert cache_key(MODEL, BASE, "t", (("doc1", "v2"),)) != cache_key(
        MODEL, BASE, "t", (("doc1", "v3"),)
    )
    assert cache_key(MODEL, BASE, "t", (("doc1", "v2"),)) == cache_key(
        MODEL, BASE, "t", (("doc1", "v2"),)
    )
    assert cache_key(MODEL, BASE, "t", (("doc2", None),)) != key
    assert cache_key(MODEL, BASE, "t") != key  # no documents: a key of its own


def test_a_rag_context_packs_the_used_documents_versions_only():
    from ragllm.rag.contract import RagDocument
    from ragllm.rag.packing import RagContext

    documents = {
        "a": RagDocument(id="a", text="x", version="7"),
        "b": RagDocument(id="b", text="y"),
        "c": RagDocument(id="c", text="z", version="1"),
    }
    context = RagContext("default@1", documents, ["a", "b"], ["c"], 10, True)
    assert context.packed() == (("a", "7"), ("b", None))  # a dropped document shaped nothing
