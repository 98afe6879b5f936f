"""Property tests (Hypothesis) for the pure parts that face client input: wire models and bounds
(the admin routes' bodies among them), cache keys of versioned documents, the stop-string matcher,
the UTF-8-safe detokenizer, the think stripper and document packing."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.exceptions import HTTPException

from ragllm.api.body import parsed_body
from ragllm.cache.keys import cache_key
from ragllm.config import InputSettings
from ragllm.engines.inprocess.detokenizer import IncrementalDetokenizer, StopMatcher
from ragllm.errors import RagLLMError
from ragllm.generation import GenerationRequest, ModelCard, SamplingParams
from ragllm.protocol.admin import MAX_INVALIDATED_DOCUMENTS, CacheInvalidation
from ragllm.protocol.openai import ChatCompletionRequest, CompletionRequest
from ragllm.rag.contract import RagDocument, RagOptions
from ragllm.rag.packing import PackRequest, pack
from ragllm.rag.prompt import load_template, rank
from ragllm.serving.bounds import check_chat
from ragllm.thinking import ThinkStripper
from tests.support.rag_documents import document_lists
from tests.support.word_counting import WordCountingEngine

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])]


# -- wire models and bounds -----------------------------------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
chat_like = st.fixed_dictionaries(
    {
        "model": st.text(max_size=5),
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]),
                    "content": json_values,
                }
            ),
            max_size=3,
        ),
    },
    optional={
        "temperature": json_values,
        "stop": json_values,
        "max_tokens": json_values,
        "seed": json_values,
        "documents": json_values,
        "rag": json_values | st.fixed_dictionaries({"order": json_values}),
        "chat_template_kwargs": json_values,
        "top_k": json_values,
        "n": json_values,
    },
)


@PROPERTY_SETTINGS
@given(body=st.one_of(chat_like, json_values))
def test_any_json_body_is_either_a_request_or_a_clear_client_error(body):
    """Bodies become a request or one of the errors the handlers turn into a 4xx; never anything else."""
    raw = orjson.dumps(body)
    for model in (ChatCompletionRequest, CompletionRequest):
        try:
            request = asyncio.run(parsed_body(raw, model, InputSettings()))
        except (RequestValidationError, RagLLMError, HTTPException):
            continue
        if isinstance(request, ChatCompletionRequest):
            try:
                check_chat(request, InputSettings())
            except RagLLMError as error:
                assert 400 <= error.status_code < 500


@PROPERTY_SETTINGS
@given(raw=st.binary(max_size=200))
def test_any_bytes_are_a_request_or_a_clear_client_error(raw):
    try:
        asyncio.run(parsed_body(raw, ChatCompletionRequest, InputSettings()))
    except (RequestValidationError, RagLLMError, HTTPException):
        pass


@PROPERTY_SETTINGS
@given(
    version=json_values | st.text(min_size=100, max_size=300),
    documents=st.lists(json_values, max_size=3),
)
def test_a_document_version_is_a_bounded_string_or_a_clear_client_error(version, documents):
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "q"}],
        "documents": [{"id": "d", "text": "t", "version": version}, *documents],
    }
    try:
        request = asyncio.run(
            parsed_body(orjson.dumps(body), ChatCompletionRequest, InputSettings())
        )
    except (RequestValidationError, RagLLMError, HTTPException):
        assert not (version is None or (isinstance(version, str) and 1 <= len(version) <= 128)) or (
            documents
        )
        return
    assert request.documents[0].version == version


@PROPERTY_SETTINGS
@given(
    body=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"document_ids": json_values | st.lists(st.text(max_size=140), max_size=8)},
            optional={"cache_group": json_values, "extra": json_values},
        ),
    )
)
def test_any_invalidation_body_is_either_a_request_or_a_clear_client_error(body):
    try:
        request = asyncio.run(parsed_body(orjson.dumps(body), CacheInvalidation, InputSettings()))
    except (RequestValidationError, RagLLMError, HTTPException):
        return
    assert 1 <= len(request.document_ids) <= MAX_INVALIDATED_DOCUMENTS
    for id_ in request.document_ids:  # every id it takes is one a document can have
        assert RagDocument(id=id_, text="").id == id_
    assert set(body) <= {"document_ids", "cache_group"}


@PROPERTY_SETTINGS
@given(
    first=st.lists(st.tuples(st.sampled_from("abc"), st.none() | st.text(max_size=3)), max_size=3),
    second=st.lists(st.tuples(st.sampled_from("abc"), st.none() | st.text(max_size=3)), max_size=3),
)
def test_two_answers_share_a_cache_key_only_if_their_packed_documents_and_versions_match(
    first, second
):
    request = GenerationRequest("r", SamplingParams(temperature=0.0), messages=[])
    model = ModelCard("m", 100)
    same = cache_key(model, request, "t", tuple(first)) == cache_key(
        model, request, "t", tuple(second)
    )
    assert same == (first == second)


# -- stop strings ---------------------------------------------------------------------------------
ALPHABET = "abEN "


@PROPERTY_SETTINGS
@given(
    text=st.text(ALPHABET, max_size=40),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_streamed_stop_matching_equals_matching_the_whole_text(text, stops, cuts):
    matcher = StopMatcher(tuple(stops))
    released, hit = "", False
    for chunk in _chunked(text, cuts):
        out, hit = matcher.feed(chunk)
        released += out
        if hit:
            break
    if not hit:
        released += matcher.flush()
    assert (released, hit) == _stopped_one_character_at_a_time(text, stops)


def _stopped_one_character_at_a_time(text: str, stops: list[str]) -> tuple[str, bool]:
    """Reference: generation stops where a stop string first completes (the longest, if several do)."""
    for end in range(1, len(text) + 1):
        completed = [stop for stop in stops if text[:end].endswith(stop)]
        if completed:
            return text[: end - max(map(len, completed))], True
    return text, False


# -- detokenizing ---------------------------------------------------------------------------------
unicode_text = st.text(
    st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")), max_size=30
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=unicode_text)
def test_deltas_add_up_to_the_decoded_text_and_never_split_a_character(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer("Say:").input_ids)
    deltas = [detokenizer.push(token) for token in ids] + [detokenizer.flush()]
    assert "".join(deltas) == whole
    if "\ufffd" not in whole:
        assert not any("\ufffd" in delta for delta in deltas)


# -- thinking -------------------------------------------------------------------------------------
PIECES = ["<think>", "</think>", "<thi", "nk>", "</", "a", "b ", " ", "\n", "<", ">"]


def _reference_strip(text: str) -> str:
    return re.sub(r"<think>.*?(</think>|\Z)", "", text, flags=re.DOTALL).lstrip()


@PROPERTY_SETTINGS
@given(
    pieces=st.lists(st.sampled_from(PIECES), max_size=15),
    cuts=st.lists(st.integers(0, 60), max_size=8),
)
def test_streamed_think_stripping_equals_stripping_the_whole_text(pieces, cuts):
    text = "".join(pieces)
    stripper = ThinkStripper()
    streamed = "".join(stripper.feed(chunk) for chunk in _chunked(text, cuts)) + stripper.flush()
    assert streamed == _reference_strip(text)


# -- packing --------------------------------------------------------------------------------------
documents_strategy = document_lists(max_size=12, max_text=80)


@PROPERTY_SETTINGS
@given(
    documents=documents_strategy,
    window=st.integers(60, 400),
    max_tokens=st.integers(1, 50),
    cap=st.none() | st.integers(1, 200),
    max_token_bytes=st.none() | st.just(81),
)
def test_packing_keeps_the_longest_ranked_prefix_that_fits(
    documents, window, max_tokens, cap, max_token_bytes
):
    """With or without the byte bound (no word here is longer than 81 bytes, so it holds)."""
    engine = WordCountingEngine()
    ranked = rank(documents)
    model = ModelCard("m", window, max_token_bytes=max_token_bytes)
    request = PackRequest(
        model=model,
        template=load_template("default@1"),
        ranked=ranked,
        messages=[{"role": "user", "content": "What is it?"}],
        template_kwargs=None,
        max_tokens=max_tokens,
        options=RagOptions(max_context_tokens=cap),
        no_think=False,
    )
    try:
        messages, context = asyncio.run(pack(engine, request))
    except RagLLMError as error:
        assert error.code == "context_length_exceeded"
        return
    used = len(context.used)
    assert context.used == [d.id for d in ranked[:used]] and context.dropped == [
        d.id for d in ranked[used:]
    ]
    total = asyncio.run(_count(engine, messages))
    assert total <= window - max_tokens and (cap is None or context.context_tokens <= cap)
    if context.dropped:  # one more document would not have fitted
        _, fuller = asyncio.run(
            pack(engine, dataclasses.replace(request, ranked=ranked[: used + 1]))
        )
        assert len(fuller.used) == used


async def _count(engine: WordCountingEngine, messages: list[dict[str, Any]]) -> int:
    from ragllm.generation import GenerationRequest, SamplingParams

    return await engine.count_prompt_tokens(
        GenerationRequest("count", SamplingParams(), messages=messages)
    )
