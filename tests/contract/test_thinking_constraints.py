"""Structured answers of a thinking model, through the official SDK against a real server: a tiny
random-weight Qwen3 with Qwen3's thinking markers and template (tests/support/thinking_model.py).
Its thinking is free, then the answer follows the constraint: constrained citations with
rag.reasoning, a JSON Schema, a required tool call; the thinking ends within its budget even though
a random model never chooses to end it; hostile budgets are a 400 in OpenAI's envelope."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
import regex
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ragllm.rag.citations import citation_pattern
from ragllm.rag.prompt import load_template
from ragllm.thinking import answer_after_thinking
from tests.support.servers import ServerProcess
from tests.support.thinking_model import OPENED_TEMPLATE, build_thinking_model

MODEL = "thinker"
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
DOCUMENTS = [
    {"id": "bridge", "text": "The Verdant Bridge in Oslund was completed in 1987."},
    {"id": "ferry", "text": "Before the bridge, a ferry crossed the river every hour."},
]
SCHEMA = {
    "type": "object",
    "properties": {"open": {"type": "boolean"}, "year": {"enum": [1987, 1990]}},
    "required": ["open", "year"],
}
QUESTION = [{"role": "user", "content": "When was the Verdant Bridge completed?"}]


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    model_dir = build_thinking_model(tmp_path_factory.mktemp("thinker") / "model")
    server = ServerProcess(
        "--model",
        str(model_dir),
        "--served-model-name",
        MODEL,
        log_dir=tmp_path_factory.mktemp("thinker-log"),
        env={"RAGLLM_INPUT__ALLOW_REQUEST_CHAT_TEMPLATE": "true"},
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(thinker) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{thinker.url}/v1", api_key="x", max_retries=0, timeout=120)


def _ask(client, **body):
    extra = {key: body.pop(key) for key in list(body) if key not in ("max_tokens", "temperature")}
    return client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=body.get("temperature", 0),
        max_tokens=body.get("max_tokens", 200),
        logprobs=True,
        extra_body=extra,
        extra_headers=NO_CACHE,
    )


def _thinking_tokens(completion) -> int:
    """Tokens the model thought, counted as generated (between the markers, or from the start where
    the prompt opened the block)."""
    tokens = [entry.token for entry in completion.choices[0].logprobs.content]
    opened = tokens.index("<think>") + 1 if "<think>" in tokens else 0
    return tokens.index("</think>") - opened


def _thinking(content: str) -> str:
    """The thinking of an answer, without its markers."""
    assert "</think>" in content, content
    return content.split("</think>", 1)[0].removeprefix("<think>")


def test_constrained_citations_follow_free_thinking(client):
    completion = _ask(
        client,
        documents=DOCUMENTS,
        rag={"citations": "constrained", "reasoning": True},
        thinking_token_budget=24,
    )
    choice, report = completion.choices[0], completion.model_extra["rag"]
    content = choice.message.content
    assert choice.finish_reason == "stop"
    assert content.startswith("<think>")
    pattern = citation_pattern(["bridge", "ferry"], load_template("default@1").decline)
    thinking, answer = _thinking(content), answer_after_thinking(content)
    # The thinking was free: not even the start of an answer the pattern allows...
    assert regex.fullmatch(pattern, thinking, partial=True) is None, thinking
    # ...and the random model never ends it by choice: the budget did.
    assert _thinking_tokens(completion) == 24
    assert re.fullmatch(pattern, answer), answer
    assert report["citation_mode"] == "constrained" and report["unknown_citations"] == []
    assert report["cited"] and {c["id"] for c in report["citations"]} <= {"bridge", "ferry"}


def test_json_schema_follows_the_thinking_and_validates(client):
    completion = _ask(
        client,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
    )
    content = completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert content.startswith("<think>")
    # No budget asked: the default allows at most half of max_tokens.
    assert _thinking_tokens(completion) == 100
    jsonschema.validate(json.loads(answer_after_thinking(content)), SCHEMA)


def test_a_template_that_opens_the_block_starts_the_answer_inside_it(client):
    completion = _ask(
        client,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
        chat_template_kwargs={"chat_template": OPENED_TEMPLATE},
        thinking_token_budget=8,
    )
    content = completion.choices[0].message.content
    assert not content.startswith("<think>") and "</think>" in content
    assert _thinking_tokens(completion) == 8
    jsonschema.validate(json.loads(answer_after_thinking(content)), SCHEMA)


def test_thinking_switched_off_constrains_from_the_first_token(client):
    completion = _ask(
        client,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
        chat_template_kwargs={"enable_thinking": False},
    )
    content = completion.choices[0].message.content
    assert "think>" not in content
    jsonschema.validate(json.loads(content), SCHEMA)


def test_a_required_tool_call_follows_the_thinking(client):
    tool = {
        "type": "function",
        "function": {"name": "lookup", "parameters": SCHEMA},
    }
    completion = _ask(client, tools=[tool], tool_choice="required", thinking_token_budget=16)
    calls = completion.choices[0].message.tool_calls
    assert completion.choices[0].finish_reason == "tool_calls"
    assert calls and calls[0].function.name == "lookup"
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMA)


def test_a_budget_alone_bounds_free_thinking(client):
    completion = _ask(client, thinking_token_budget=5, max_tokens=40)
    content = completion.choices[0].message.content
    assert content.startswith("<think>")
    assert _thinking_tokens(completion) == 5
    assert completion.choices[0].finish_reason == "stop"  # the answer after it is free to end


def test_a_streamed_answer_is_the_same_answer(client):
    body = dict(documents=DOCUMENTS, rag={"citations": "constrained", "reasoning": True})
    whole = _ask(client, thinking_token_budget=12, **body).choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=200,
        stream=True,
        extra_body={"thinking_token_budget": 12, **body},
        extra_headers=NO_CACHE,
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == whole


@pytest.mark.parametrize(
    ("budget", "max_tokens"),
    [(-1, 50), ("many", 50), (1.5, 50), (2**40, 50), ([], 50), ({"a": 1}, 50), (50, 50)],
)
def test_hostile_budgets_are_a_400_naming_the_field(thinker, budget, max_tokens):
    response = httpx.post(
        f"{thinker.url}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": QUESTION,
            "max_tokens": max_tokens,
            "thinking_token_budget": budget,
        },
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "thinking_token_budget" in (error["param"] or "") + error["message"]


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@example(budget=_nested(400), max_tokens=4, thinking=True)  # deep
@example(budget=list(range(20_000)), max_tokens=4, thinking=None)  # wide
@example(budget="9" * 100_000, max_tokens=4, thinking=True)  # oversized
@example(budget=3, max_tokens=4, thinking=True)  # the largest budget max_tokens leaves room for
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    budget=st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True),
        st.text(max_size=40),
        st.booleans(),
        st.none(),
        st.lists(st.integers(), max_size=5),
        st.recursive(st.none(), lambda inner: st.lists(inner, max_size=3), max_leaves=20),
    ),
    max_tokens=st.integers(min_value=1, max_value=8),
    thinking=st.sampled_from([True, False, None, "yes"]),
)
def test_any_budget_is_an_answer_or_a_400_never_a_500(thinker, budget, max_tokens, thinking):
    """Hypothesis: wrongly typed, negative, huge and boundary budgets, with every switch."""
    kwargs = {} if thinking is None else {"chat_template_kwargs": {"enable_thinking": thinking}}
    response = httpx.post(
        f"{thinker.url}/v1/chat/completions",
        content=json.dumps(
            {
                "model": MODEL,
                "messages": QUESTION,
                "max_tokens": max_tokens,
                "thinking_token_budget": budget,
                "response_format": {"type": "json_object"},
                **kwargs,
            },
            allow_nan=True,
        ),
        headers={"Content-Type": "application/json", **NO_CACHE},
        timeout=60,
    )
    assert response.status_code in (200, 400, 413), response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif isinstance(budget, int) and not isinstance(budget, bool):
        assert 0 <= budget < max_tokens  # anything else is refused
