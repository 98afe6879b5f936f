"""How a model family writes a tool call, and the grammar that holds an answer to one.

- ``hermes``: each call a JSON object {"name", "arguments"} between ``<tool_call>`` and
  ``</tool_call>`` lines, as Qwen2.5 and Qwen3 write them (and as this service teaches models whose
  template has no tool support, see ``rendering``).
- ``llama3_json``: the whole answer one JSON object {"name", "parameters"}, as Llama 3.1-3.3 write
  them with JSON-based tool calling, optionally after ``<|python_tag|>``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from ragllm.structured.grammars import JSON_OPTIONS, bounded_schema
from ragllm.structured.spec import StructuredOutput
from ragllm.tools.request import ToolUse

HERMES = "hermes"
LLAMA3_JSON = "llama3_json"
FORMATS = (HERMES, LLAMA3_JSON)
# Calls one answer may make when parallel calls are allowed: a bound, so a model cannot call forever.
MAX_PARALLEL_CALLS = 8


@lru_cache(maxsize=16)  # asked for every chat prompt, of one or two templates
def format_of_template(chat_template: str | None) -> tuple[str, bool]:
    """(the tool-call format, whether the template itself renders tools) for a chat template. A
    template that renders tools in a format not served here is treated as one without tool support."""
    template = chat_template or ""
    renders_tools = "tools" in template
    if renders_tools and "<tool_call>" in template:
        return HERMES, True
    if renders_tools and ("<|python_tag|>" in template or "ipython" in template):
        return LLAMA3_JSON, True
    return HERMES, False


def call_constraint(tool_format: str, tools: ToolUse) -> StructuredOutput:
    """A grammar that admits only calls of the offered (or the named) functions, arguments valid
    under each one's schema: how tool_choice "required" or a named function is enforced."""
    names = [tools.named] if tools.named else tools.names()
    arguments_key = "parameters" if tool_format == LLAMA3_JSON else "arguments"
    schema = {
        "x-guidance": {**JSON_OPTIONS, "whitespace_flexible": False},
        "anyOf": [_call_schema(name, arguments_key, tools.parameters(name)) for name in names],
    }
    body = "%json " + json.dumps(schema)
    if tool_format == LLAMA3_JSON:
        source = f"start: call\ncall: {body}"
    else:
        repeat = f' ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if tools.several_when_forced else ""
        source = f'start: call{repeat}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: {body}'
    return StructuredOutput("grammar", source, "tools")


def _call_schema(name: str, arguments_key: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, arguments_key: bounded_schema(parameters)},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }
