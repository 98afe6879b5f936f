"""Tool calling against the packaged model, with the clients agentic RAG uses: the official SDK and
LangChain's ``bind_tools``. The packaged model's template has no tool support, so the service writes
the tools into the prompt and reads ``<tool_call>`` blocks back; a required or named call is held to
the offered functions' schemas, so its arguments always validate."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_documents",
        "description": "Search the knowledge base.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 80},
                "top_k": {"type": "integer", "minimum": 1, "maximum": 20},
            },
            "required": ["query", "top_k"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def _ask(client, model, messages=QUESTION, max_tokens=80, **kwargs):
    return client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=max_tokens,
        extra_headers=NO_CACHE,
        **kwargs,
    )


def _validated(call, tools=(WEATHER, SEARCH)) -> dict:
    schema = next(
        t["function"]["parameters"] for t in tools if t["function"]["name"] == call.function.name
    )
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schema)
    return arguments


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "search_documents"}}]
)
def test_a_required_or_named_call_is_made_with_valid_arguments(client, model, tool_choice):
    response = _ask(client, model, tools=[WEATHER, SEARCH], tool_choice=tool_choice)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(tool_choice, dict):
        assert call.function.name == "search_documents"
    _validated(call)


def test_a_streamed_call_arrives_as_tool_call_deltas_equal_to_the_whole_answer(client, model):
    whole = (
        _ask(client, model, tools=[WEATHER], tool_choice="required")
        .choices[0]
        .message.tool_calls[0]
    )
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=QUESTION,
            temperature=0,
            max_tokens=80,
            tools=[WEATHER],
            tool_choice="required",
            stream=True,
            extra_headers=NO_CACHE,
        )
    )
    entries = [
        entry
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for entry in c.choices[0].delta.tool_calls
    ]
    assert [e.index for e in entries] == [0]
    assert (entries[0].function.name, entries[0].function.arguments) == (
        whole.function.name,
        whole.function.arguments,
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_parallel_calls_are_allowed_only_when_asked_for(client, model):
    for parallel, fewest, most in ((None, 1, 1), (False, 1, 1), (True, 2, 8)):
        extra = {} if parallel is None else {"parallel_tool_calls": parallel}
        calls = (
            _ask(
                client,
                model,
                tools=[WEATHER, SEARCH],
                tool_choice="required",
                max_tokens=100,
                **extra,
            )
            .choices[0]
            .message.tool_calls
        )
        assert fewest <= len(calls) <= most, (
            parallel,
            calls,
        )  # greedy: this model calls again when it may
        for call in calls:
            _validated(call)


def test_auto_leaves_the_model_free_to_answer_in_text(client, model):
    choice = _ask(client, model, tools=[WEATHER], tool_choice="auto").choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")


def test_a_second_turn_with_the_tools_result_is_answered(client, model):
    call = (
        _ask(client, model, tools=[WEATHER], tool_choice="required")
        .choices[0]
        .message.tool_calls[0]
    )
    messages = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny."},
    ]
    choice = _ask(client, model, messages=messages, tools=[WEATHER]).choices[0]
    assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_langchain_bind_tools_calls_then_answers_with_the_result(server, model):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"21 degrees and sunny in {city}."

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key="x",
        model=model,
        temperature=0,
        max_tokens=80,
        default_headers=NO_CACHE,
    )
    messages = [HumanMessage("What is the weather in Paris?")]
    asked = llm.bind_tools([get_weather], tool_choice="any").invoke(messages)
    assert len(asked.tool_calls) == 1 and asked.tool_calls[0]["name"] == "get_weather"
    assert isinstance(asked.tool_calls[0]["args"]["city"], str)
    messages += [
        asked,
        ToolMessage(
            get_weather.invoke(asked.tool_calls[0]["args"]), tool_call_id=asked.tool_calls[0]["id"]
        ),
    ]
    answered = llm.bind_tools([get_weather]).invoke(messages)
    assert answered.content and answered.response_metadata["finish_reason"] in ("stop", "length")


def test_a_cached_call_is_replayed_with_its_tool_calls(server, model):
    body = {
        "model": model,
        "messages": QUESTION,
        "temperature": 0,
        "max_tokens": 80,
        "tools": [WEATHER],
        "tool_choice": "required",
        "seed": 7,
    }
    first = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    again = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert again.headers["x-ragllm-cache"] == "hit"
    message = again.json()["choices"][0]["message"]
    assert message["tool_calls"] == first.json()["choices"][0]["message"]["tool_calls"]
    assert again.json()["choices"][0]["finish_reason"] == "tool_calls"
    streamed = httpx.post(
        f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ).text
    assert '"tool_calls":[{"index":0' in streamed and '"finish_reason":"tool_calls"' in streamed


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0].function.name",
        ),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"messages": QUESTION + [{"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
        (
            {
                "messages": QUESTION
                + [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "{not json"},
                            }
                        ],
                    }
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
    ],
)
def test_tool_mistakes_are_a_clear_400(server, model, extra, param):
    body = {"model": model, "messages": QUESTION, "max_tokens": 5, "tools": [WEATHER], **extra}
    body = {k: v for k, v in body.items() if v is not None}
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json=body, timeout=60, headers=NO_CACHE
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_call_the_model_writes_deeper_than_the_bounds_stays_text(client, model):
    """A tenant can force any answer with a regular expression, a tool call nested past the JSON depth
    bound included: it is read as text (not a call, not a failure), so it cannot reach what recurses."""
    depth = 66
    arguments = '{"a": ' + "[" * depth + "]" * depth + "}"
    regex = (
        r'<tool_call>\{"name": "get_weather", "arguments": \{"a": \[{%d}\]{%d}\}\}</tool_call>'
        % (depth, depth)
    )
    response = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        temperature=0,
        max_tokens=200,
        tools=[WEATHER],
        extra_headers=NO_CACHE,
        extra_body={"guided_regex": regex},
    )
    choice = response.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert arguments in choice.message.content
    shallow = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}</tool_call>'
    called = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        temperature=0,
        max_tokens=60,
        tools=[WEATHER],
        extra_headers=NO_CACHE,
        extra_body={"guided_regex": shallow},
    ).choices[0]
    assert (
        called.finish_reason == "tool_calls"
        and called.message.tool_calls[0].function.arguments == '{"city": "Paris"}'
    )
