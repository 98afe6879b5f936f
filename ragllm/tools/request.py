"""What a chat request asks of tools: the functions offered, whether and which one must be called.

Validated here once, so every later step (rendering, constraining, parsing, passing upstream) works
on a consistent description and every mistake is a 400 naming its field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ragllm.bounded_json import JsonLimits, loads_bounded
from ragllm.errors import InvalidRequest
from ragllm.structured.schema_check import check_schema
from ragllm.structured.spec import DEFAULT_SCHEMA_LIMITS

MAX_TOOLS = 128  # OpenAI's own limit on tools per request


@dataclass(frozen=True, slots=True)
class ToolUse:
    """``functions``: each offered function as chat templates take it ({"type": "function",
    "function": {name, description, parameters}}); ``choice``: "auto", "required" or "named";
    ``named``: the function that must be called when ``choice`` is "named"."""

    functions: tuple[dict[str, Any], ...]
    choice: str
    named: str | None = None
    parallel_tool_calls: bool | None = None  # as sent

    @property
    def must_call(self) -> bool:
        return self.choice in ("required", "named")

    @property
    def parallel(self) -> bool:
        """Several calls in one answer are read as calls (OpenAI's default) unless the request said no."""
        return self.parallel_tool_calls is not False

    @property
    def several_when_forced(self) -> bool:
        """An answer held to calls may hold several only where the request asked for parallel calls
        outright (as llama.cpp's server does): held to the call grammar, a small model given the
        choice repeats its call until max_tokens."""
        return self.parallel_tool_calls is True and self.named is None

    def names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.functions]

    def parameters(self, name: str) -> dict[str, Any]:
        """The JSON Schema of ``name``'s arguments (an object with no properties when none was given)."""
        for tool in self.functions:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters") or {"type": "object", "properties": {}}
        raise KeyError(name)


def tool_use_of(
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    limits: JsonLimits = DEFAULT_SCHEMA_LIMITS,
) -> ToolUse | None:
    """The request's tool use, or None where no tool can be called (no tools, or tool_choice "none");
    ``limits`` bound each function's parameters schema."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(
            f"at most {MAX_TOOLS} tools are allowed, got {len(tools)}", param="tools"
        )
    functions = tuple(_function(tool, index, limits) for index, tool in enumerate(tools))
    names = [tool["function"]["name"] for tool in functions]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise InvalidRequest(f"the function name {duplicate!r} is offered twice", param="tools")
    choice, named = _choice(tool_choice, names)
    if choice == "none":
        return None
    return ToolUse(functions, choice, named, parallel_tool_calls)


def _function(tool: Any, index: int, limits: JsonLimits) -> dict[str, Any]:
    param = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise InvalidRequest("only tools of type 'function' are supported", param=f"{param}.type")
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest("a tool needs function.name", param=f"{param}.function.name")
    name = function["name"]
    if (
        not name
        or len(name) > 64
        or not all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
    ):
        raise InvalidRequest(
            "a function name is 1 to 64 letters, digits, '_' or '-'", param=f"{param}.function.name"
        )
    parameters = function.get("parameters")
    if parameters is not None and (
        not isinstance(parameters, dict) or parameters.get("type", "object") != "object"
    ):
        raise InvalidRequest(
            "function.parameters must be a JSON Schema of type 'object'",
            param=f"{param}.function.parameters",
        )
    if parameters is not None:
        check_schema(parameters, f"{param}.function.parameters", limits)
    described = {"name": name}
    if function.get("description") is not None:
        described["description"] = str(function["description"])
    described["parameters"] = (
        parameters if parameters is not None else {"type": "object", "properties": {}}
    )
    return {"type": "function", "function": described}


def _choice(tool_choice: Any, names: list[str]) -> tuple[str, str | None]:
    if tool_choice is None:
        return "auto", None
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise InvalidRequest(
                "tool_choice.function must be an object with the name of a function",
                param="tool_choice.function",
            )
        if name not in names:
            raise InvalidRequest(
                f"tool_choice names {name!r}, which is not among the tools", param="tool_choice"
            )
        return "named", name
    raise InvalidRequest(
        "tool_choice is 'none', 'auto', 'required' or {'type': 'function', 'function': "
        "{'name': ...}}",
        param="tool_choice",
    )


def arguments_object(
    arguments: Any, param: str, limits: JsonLimits = DEFAULT_SCHEMA_LIMITS
) -> dict[str, Any]:
    """A call's arguments, sent as OpenAI sends them (a JSON string), as the object templates render."""
    if isinstance(arguments, dict):
        return arguments
    value = (
        loads_bounded(arguments, limits, param)
        if isinstance(arguments, str) and arguments.strip()
        else {}
    )
    if not isinstance(value, dict):
        raise InvalidRequest("function.arguments must be a JSON object", param=param)
    return value
