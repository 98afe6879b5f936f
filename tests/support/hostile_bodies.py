"""Request bodies a hostile client sends: each is refused with a 400 naming a field."""

from __future__ import annotations

from tests.support.servers import MODEL


def nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def ask(content: str = "Say hello.", **fields) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        **fields,
    }


TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
# Each is refused with a 400 naming a field; together they are what once answered 500s, stalled the
# loop or were billed nothing.
HOSTILE_BODIES = {
    "schema 300 deep": ask(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": nested_schema(300)},
        }
    ),
    "tool parameters 300 deep": ask(
        tools=[{"type": "function", "function": {"name": "deep", "parameters": nested_schema(300)}}]
    ),
    "guided_json string 5,000 deep": ask(guided_json="[" * 5000 + "]" * 5000),
    "format as a list": ask(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "string", "format": ["email"]}},
        }
    ),
    "tool_choice function as a string": ask(
        tools=[TOOL], tool_choice={"type": "function", "function": "f"}
    ),
    "call arguments 5,000 deep": {
        "model": MODEL,
        "max_tokens": 8,
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {
                            "name": "lookup",
                            "arguments": '{"a":' * 5000 + "1" + "}" * 5000,
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ],
    },
    "stop of 20,000 integers": ask(stop=list(range(20_000))),
    "logit_bias": ask(logit_bias={"1": 100}),
    "2,500 choices": ask(guided_choice=[f"c{i}" for i in range(2500)]),
    "a document that is a number": ask(documents=[{"id": "a", "text": "x"}, 7]),
    "chat_template_kwargs.tokenize": ask(chat_template_kwargs={"tokenize": True}),
    "stream_options as a list": ask(stream=True, stream_options=[1]),
    "cache_salt blank": ask(cache_salt="   "),
}
