"""Tool calls read out of answers, whole and in every split a stream could bring."""

from __future__ import annotations

import json

import pytest

from ragllm.tools.calls import merge_tool_call_deltas
from ragllm.tools.formats import HERMES, LLAMA3_JSON
from ragllm.tools.parsing import ToolCallParser

NAMES = ["get_weather", "search"]


def _parse(tool_format: str, pieces: list[str], parallel: bool = True) -> tuple[str, list[dict]]:
    parser = ToolCallParser(tool_format, NAMES, parallel)
    content, calls = [], []
    for piece in pieces:
        text, found = parser.feed(piece)
        content.append(text)
        calls += found
    text, found = parser.finish()
    merged: list[dict] = []
    merge_tool_call_deltas(merged, calls + found)
    return "".join(content) + text, [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in merged
    ]


def _splits(text: str) -> list[list[str]]:
    """The text whole, character by character, and in pieces of 3."""
    return [[text], list(text), [text[i : i + 3] for i in range(0, len(text), 3)]]


HERMES_CASES = [
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        'Let me look.\n<tool_call>\n{"name": "search", "arguments": {"q": "a<b"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>',
        "Let me look.",
        [("search", {"q": "a<b"}), ("get_weather", {})],
    ),
    ("Paris is sunny <tool today.", "Paris is sunny <tool today.", []),
    (
        '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
        [],
    ),
    (
        '<tool_call>\n{"name": "search", "arguments": {"q": "cut',
        '<tool_call>\n{"name": "search", "arguments": {"q": "cut',
        [],
    ),
    ("  plain answer with a trailing blank ", "  plain answer with a trailing blank ", []),
]


def test_without_parallel_calls_a_second_call_stays_text():
    answer = (
        '<tool_call>\n{"name": "search", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>'
    )
    content, calls = _parse(HERMES, [answer], parallel=False)
    assert calls == [("search", {})] and '"q": "x"' in content


LLAMA_CASES = [
    (
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
        "",
        [("get_weather", {"city": "Oslo"})],
    ),
    (
        '<|python_tag|>{"name": "search", "parameters": {"q": "x"}}; {"name": "search", "parameters": {"q": "y"}}',
        "",
        [("search", {"q": "x"}), ("search", {"q": "y"})],
    ),
    ("The weather is fine.", "The weather is fine.", []),
    ('{"answer": 42}', '{"answer": 42}', []),
]


@pytest.mark.parametrize(
    "tool_format, answer, content, calls",
    [(HERMES, *case) for case in HERMES_CASES] + [(LLAMA3_JSON, *case) for case in LLAMA_CASES],
)
def test_calls_are_read_in_any_split_and_nothing_else_is_lost(tool_format, answer, content, calls):
    """Hermes calls anywhere in the answer; a Llama answer is all calls or all content."""
    for pieces in _splits(answer):
        assert _parse(tool_format, pieces) == (content, calls), pieces


def test_streamed_fragments_of_one_call_merge_as_a_client_would():
    calls: list[dict] = []
    merge_tool_call_deltas(
        calls,
        [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "search", "arguments": ""},
            }
        ],
    )
    merge_tool_call_deltas(calls, [{"index": 0, "function": {"arguments": '{"q": '}}])
    merge_tool_call_deltas(
        calls,
        [
            {"index": 0, "function": {"arguments": '"x"}'}},
            {"index": 1, "id": "call_2", "function": {"name": "get_weather", "arguments": "{}"}},
        ],
    )
    assert calls == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "search", "arguments": '{"q": "x"}'},
        },
        {
            "id": "call_2",
            "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"},
        },
    ]
