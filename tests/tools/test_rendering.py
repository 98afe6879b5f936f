"""Tools and tool turns in the prompt: handed to templates that render them, written out for those
that do not (the packaged model's)."""

from __future__ import annotations

import json

import pytest

from ragllm.errors import InvalidRequest
from ragllm.tools.formats import HERMES, LLAMA3_JSON, format_of_template
from ragllm.tools.rendering import template_inputs

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
}
TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Snow."},
    {"role": "tool", "tool_call_id": "call_2", "content": "Wind."},
]
# A template in the style of those that render tools (written for this test, not any model's own).
TOOL_TEMPLATE = (
    "{% if tools %}{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}"
    "{% for call in m.tool_calls or [] %}<tool_call>{{ call.function.arguments | tojson }}</tool_call>{% endfor %}"
    "{% endfor %}"
)


@pytest.mark.parametrize(
    "template, expected",
    [
        (TOOL_TEMPLATE, (HERMES, True)),
        ("{% if tools %}<|python_tag|>{% endif %}", (LLAMA3_JSON, True)),
        ("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}", (HERMES, False)),
        (None, (HERMES, False)),
    ],
)
def test_the_format_is_read_from_the_template(template, expected):
    assert format_of_template(template) == expected


def test_a_template_that_renders_tools_gets_them_and_argument_objects():
    from jinja2 import Template

    messages, tools = template_inputs(TURNS, [WEATHER], renders_tools=True)
    assert tools == [WEATHER]
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert (
        TURNS[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    )  # the request is untouched
    rendered = Template(TOOL_TEMPLATE).render(messages=messages, tools=tools)
    assert (
        '"name": "get_weather"' in rendered
        and '<tool_call>{"city": "Oslo"}</tool_call>' in rendered
    )


def test_without_template_support_tools_and_turns_are_written_out():
    messages, tools = template_inputs(TURNS, [WEATHER], renders_tools=False)
    assert tools is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert (
        messages[0]["content"].startswith("Be brief.\n\n")
        and json.dumps(WEATHER["function"]) in messages[0]["content"]
    )
    assert (
        messages[2]["content"]
        == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    assert (
        messages[3]["content"]
        == "<tool_response>\nSnow.\n</tool_response>\n<tool_response>\nWind.\n</tool_response>"
    )
    assert all(set(m) == {"role", "content"} for m in messages)


def test_a_plain_conversation_is_left_as_it_is():
    plain = [{"role": "user", "content": "hi"}]
    assert template_inputs(plain, None, renders_tools=False) == (plain, None)


def test_arguments_that_are_not_a_json_object_are_a_400_naming_them():
    broken = [
        {"role": "system", "content": "x"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{**CALL, "function": {**CALL["function"], "arguments": "[1]"}}],
        },
    ]
    for renders_tools in (True, False):
        with pytest.raises(InvalidRequest) as caught:
            template_inputs(broken, [WEATHER], renders_tools)
        assert caught.value.param == "messages[1].tool_calls[0].function.arguments"
