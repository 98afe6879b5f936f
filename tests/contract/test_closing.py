"""Structured answers that reach their budget still parse: the packaged model, which runs away inside
strings, is closed early under its grammar (JSON modes, required tool calls through the SDK and
LangChain) at max_tokens 40, 80 and 120, with finish_reason "length" and the closed-early signal."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.support.openai_schema import validate
from tests.support.sse import parse

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
BUDGETS = [40, 80, 120]
QUESTION = "Describe the architecture of a retrieval-augmented generation system in detail."
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "summary": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "summary", "tags"],
    "additionalProperties": False,
}
# The shortest call of it the grammar allows takes 34 tokens, so it fits the smallest budget.
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_documents",
        "description": "Search the document store for passages about a topic.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "top_k": {"type": "integer"},
            },
            "required": ["query", "top_k"],
        },
    },
}


def _post(server, body: dict, **extra) -> httpx.Response:
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"temperature": 0, "messages": [{"role": "user", "content": QUESTION}], **body},
        headers=NO_CACHE,
        timeout=120,
        **extra,
    )
    assert response.status_code == 200, response.text
    return response


def _assert_signalled(response: httpx.Response, choice: dict) -> None:
    """The closed-early signal says exactly what finish_reason "length" and a complete answer say."""
    closed = response.json().get("structured", {}).get("closed_early", [])
    if choice["finish_reason"] == "length":
        assert closed == [0]
        assert response.headers["x-ragllm-closed-early"] == "1"
    else:
        assert closed == [] and "x-ragllm-closed-early" not in response.headers


@pytest.mark.parametrize("max_tokens", BUDGETS)
def test_a_strict_json_schema_parses_and_validates_at_every_budget(server, model, max_tokens):
    response = _post(
        server,
        {
            "model": model,
            "max_tokens": max_tokens,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "overview", "strict": True, "schema": SCHEMA},
            },
        },
    )
    choice = response.json()["choices"][0]
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    _assert_signalled(response, choice)
    assert response.json()["usage"]["completion_tokens"] <= max_tokens
    if max_tokens == 40:  # three strings of a detailed description cannot fit 40 tokens
        assert choice["finish_reason"] == "length"
    validate(response.json(), "CreateChatCompletionResponse")  # the extension breaks no client


@pytest.mark.parametrize("max_tokens", BUDGETS)
def test_json_object_parses_at_every_budget(server, model, max_tokens):
    response = _post(
        server,
        {"model": model, "max_tokens": max_tokens, "response_format": {"type": "json_object"}},
    )
    choice = response.json()["choices"][0]
    assert isinstance(json.loads(choice["message"]["content"]), dict)
    _assert_signalled(response, choice)


@pytest.mark.parametrize("max_tokens", BUDGETS)
def test_a_required_tool_call_parses_and_validates_at_every_budget(client, model, max_tokens):
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=max_tokens,
        tools=[SEARCH],
        tool_choice="required",
        extra_headers=NO_CACHE,
    )
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.message.tool_calls, choice.message.content
    for call in choice.message.tool_calls:
        assert call.function.name == "search_documents"
        jsonschema.validate(json.loads(call.function.arguments), SEARCH["function"]["parameters"])
    closed = (completion.model_extra or {}).get("structured", {}).get("closed_early", [])
    assert (choice.finish_reason == "length") == (closed == [0])
    assert (raw.headers.get("x-ragllm-closed-early") == "1") == (closed == [0])
    if max_tokens == 40:
        assert choice.finish_reason == "length"


@pytest.mark.parametrize("max_tokens", BUDGETS)
def test_langchain_bind_tools_required_returns_a_call_at_every_budget(server, model, max_tokens):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def search_documents(query: str, top_k: int) -> str:
        """Search the document store for passages about a topic."""
        return query

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key="x",
        model=model,
        temperature=0,
        max_tokens=max_tokens,
        default_headers=NO_CACHE,
    )
    message = llm.bind_tools([search_documents], tool_choice="required").invoke(QUESTION)
    assert not message.invalid_tool_calls, message.invalid_tool_calls
    assert len(message.tool_calls) >= 1, message.content
    args = message.tool_calls[0]["args"]
    assert isinstance(args["query"], str) and isinstance(args["top_k"], int)
    assert message.response_metadata["finish_reason"] in ("length", "tool_calls", "stop")


def test_a_stream_says_it_was_closed_early_in_its_last_finish_event(server, model):
    body = {
        "model": model,
        "max_tokens": 40,
        "stream": True,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "overview", "strict": True, "schema": SCHEMA},
        },
    }
    response = _post(server, body)
    assert "x-ragllm-closed-early" not in response.headers  # sent before the answer ended
    result = parse(response.status_code, response.content)
    assert result.ends_with_done and result.error is None
    jsonschema.validate(json.loads(result.text), SCHEMA)
    finish = [e for e in result.events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert [e["choices"][0]["finish_reason"] for e in finish] == ["length"]
    assert finish[0]["structured"] == {"closed_early": [0]}
    for event in result.events:
        validate(event, "CreateChatCompletionStreamResponse")
    assert not any("structured" in e for e in result.events if e is not finish[0])


def test_a_cached_answer_replays_its_closed_early_signal(server, model):
    body = {
        "model": model,
        "max_tokens": 40,
        "temperature": 0,
        "seed": 11,
        "messages": [{"role": "user", "content": QUESTION}],
        "response_format": {"type": "json_object"},
    }
    first = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    again = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert again.headers["x-ragllm-cache"] == "hit"
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    assert again.json().get("structured") == first.json().get("structured")
    assert again.headers.get("x-ragllm-closed-early") == first.headers.get("x-ragllm-closed-early")


def test_openapi_documents_the_closed_early_extension(server):
    schemas = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    for response in ("ChatCompletion", "Completion"):
        assert "Extension" in schemas[response]["properties"]["structured"]["description"]
    assert "closed_early" in schemas["StructuredReport"]["properties"]


def _nested(depth: int, width: int) -> dict:
    """An object ``depth`` levels deep with ``width`` required properties at each level."""
    if depth == 0:
        return {"type": "string", "minLength": 3}
    props = {f"p{i}": _nested(depth - 1, width) for i in range(width)}
    return {"type": "object", "properties": props, "required": list(props)}


@pytest.mark.parametrize(
    ("schema", "max_tokens"),
    [
        (SCHEMA, 1),
        (SCHEMA, 3),
        (SCHEMA, 5),
        (_nested(4, 3), 40),  # the shortest answer needs far more than the budget
        (_nested(2, 12), 60),
    ],
    ids=["1-token", "3-tokens", "5-tokens", "deep", "wide"],
)
def test_a_budget_no_answer_fits_ends_at_length_without_the_signal(
    server, model, schema, max_tokens
):
    response = _post(
        server,
        {
            "model": model,
            "max_tokens": max_tokens,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema},
            },
        },
    )
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == max_tokens
    _assert_signalled_only_if_complete(response, choice, schema)


def _assert_signalled_only_if_complete(response: httpx.Response, choice: dict, schema: dict):
    closed = response.json().get("structured", {}).get("closed_early", [])
    if closed:
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    else:
        assert "x-ragllm-closed-early" not in response.headers
