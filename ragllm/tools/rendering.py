"""Tools and tool turns in the prompt.

A template that renders tools itself (Qwen2.5, Qwen3, Llama 3.1+) gets them as it expects: the
function list as ``tools``, each earlier call's arguments as an object. A template without tool
support (the packaged SmolLM2's) gets them written into the conversation in the ``hermes`` form the
answer is then read in: the functions in the system turn, earlier calls in the assistant's text,
results as ``<tool_response>`` blocks in a user turn.
"""

from __future__ import annotations

import json
from typing import Any

from ragllm.tools.request import arguments_object

TOOLS_PREAMBLE = (
    "You can call functions to help answer. Their signatures, one JSON object per line:\n<tools>\n{signatures}\n"
    "</tools>\nTo call one, answer with a JSON object holding its name and arguments between tags, "
    'like this:\n<tool_call>\n{{"name": "function_name", "arguments": {{"argument": "value"}}}}\n'
    "</tool_call>\nA function's result comes back between <tool_response> tags."
)


def template_inputs(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, renders_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to hand the chat template."""
    if renders_tools:
        return [
            _with_argument_objects(message, index) for index, message in enumerate(messages)
        ], tools or None
    if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return messages, None
    return _written_out(messages, tools or []), None


def _with_argument_objects(message: dict[str, Any], index: int) -> dict[str, Any]:
    if not message.get("tool_calls"):
        return message
    calls = [
        {
            **call,
            "function": {
                **call["function"],
                "arguments": arguments_object(
                    call["function"].get("arguments"),
                    f"messages[{index}].tool_calls[{number}].function.arguments",
                ),
            },
        }
        for number, call in enumerate(message["tool_calls"])
    ]
    return {**message, "tool_calls": calls}


def _written_out(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    written: list[dict[str, Any]] = []
    first = 0
    if tools:
        signatures = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
        preamble = TOOLS_PREAMBLE.format(signatures=signatures)
        if messages and messages[0]["role"] == "system":
            written.append({"role": "system", "content": f"{messages[0]['content']}\n\n{preamble}"})
            first = 1
        else:
            written.append({"role": "system", "content": preamble})
    for index, message in enumerate(messages[first:], start=first):
        if message["role"] == "tool":
            response = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if written and written[-1].get("tool_responses"):  # consecutive results share one turn
                written[-1]["content"] += "\n" + response
            else:
                written.append({"role": "user", "content": response, "tool_responses": True})
        elif message.get("tool_calls"):
            calls = [
                _call_text(call, index, number) for number, call in enumerate(message["tool_calls"])
            ]
            text = "\n".join(([message["content"]] if message.get("content") else []) + calls)
            written.append({"role": "assistant", "content": text})
        else:
            written.append(message)
    return [{k: v for k, v in m.items() if k != "tool_responses"} for m in written]


def _call_text(call: dict[str, Any], index: int, number: int) -> str:
    function = call["function"]
    arguments = arguments_object(
        function.get("arguments"), f"messages[{index}].tool_calls[{number}].function.arguments"
    )
    return (
        "<tool_call>\n"
        + json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
        + "\n</tool_call>"
    )
