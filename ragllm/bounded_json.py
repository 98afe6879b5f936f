"""JSON with bounded structure: the request body, and every JSON a request carries inside a string.

orjson parses (in C, refusing more than 1,024 levels itself); the decoded value is then walked with an
explicit stack, never by recursion, and refused once it is deeper or has more values than the limits
allow. Everything downstream (pydantic, the cache key's ``orjson.dumps`` with its 254-level limit,
schema checks, grammar compilers, chat templates) may then recurse over it safely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ragllm.config import InputSettings
from ragllm.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class JsonLimits:
    """``max_depth``: containers inside containers (``{}`` is 1, ``{"a": []}`` is 2); ``max_values``:
    every object, array, string, number, boolean and null counted once."""

    max_depth: int
    max_values: int
    values_setting: str = (
        "RAGLLM_INPUT__MAX_JSON_VALUES"  # named in the refusal, so an operator knows what to raise
    )

    @classmethod
    def body(cls, bounds: InputSettings) -> JsonLimits:
        return cls(bounds.max_json_depth, bounds.max_json_values)

    @classmethod
    def schema(cls, bounds: InputSettings) -> JsonLimits:
        """One schema, tool's parameters or tool-call arguments."""
        return cls(
            bounds.max_json_depth, bounds.max_schema_values, "RAGLLM_INPUT__MAX_SCHEMA_VALUES"
        )


class JsonTooComplex(InvalidRequest):
    """A JSON value deeper or larger than its limits (400, naming the field)."""


def check_structure(value: Any, limits: JsonLimits, param: str | None = None) -> int:
    """The number of values in ``value``; raises JsonTooComplex past the limits. ``param`` names
    ``value`` in the error; without it (a whole body), the top-level field that holds the offence."""
    if not isinstance(value, dict | list):
        return 1
    count = 1
    # (container, its depth, the field it is in): each value is counted when its container is opened.
    stack: list[tuple[dict | list, int, str | None]] = [(value, 1, param)]
    while stack:
        container, depth, field = stack.pop()
        if depth > limits.max_depth:
            raise JsonTooComplex(
                f"{field or 'the request body'} is nested more than {limits.max_depth} levels "
                "deep (RAGLLM_INPUT__MAX_JSON_DEPTH)",
                param=field,
                code="json_too_deep",
            )
        count += len(container)
        if count > limits.max_values:
            raise JsonTooComplex(
                f"{field or 'the request body'} holds more than {limits.max_values} JSON values "
                f"({limits.values_setting})",
                param=field,
                code="json_too_large",
            )
        if isinstance(container, list):
            stack += [(item, depth + 1, field) for item in container if type(item) in _CONTAINERS]
        elif field is None:  # the body's own fields: each names what it holds
            stack += [
                (item, depth + 1, key)
                for key, item in container.items()
                if type(item) in _CONTAINERS
            ]
        else:
            stack += [
                (item, depth + 1, field) for item in container.values() if type(item) in _CONTAINERS
            ]
    return count


_CONTAINERS = (
    dict,
    list,
)  # what orjson decodes objects and arrays to (exact types: nothing else is built)


def loads_bounded(text: str | bytes, limits: JsonLimits, param: str) -> Any:
    """``text`` decoded, its structure within ``limits``; a 400 naming ``param`` otherwise."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc):  # orjson's own limit, far past ours
            raise JsonTooComplex(
                f"{param} is nested more than {limits.max_depth} levels deep "
                "(RAGLLM_INPUT__MAX_JSON_DEPTH)",
                param=param,
                code="json_too_deep",
            ) from None
        raise InvalidRequest(f"{param} is not valid JSON ({exc})", param=param) from None
    check_structure(value, limits, param)
    return value


def try_loads_bounded(text: str, limits: JsonLimits) -> Any | None:
    """``text`` decoded within ``limits``, or None where it is not JSON or too complex (text a model
    wrote, which stays text then)."""
    try:
        value = orjson.loads(text)
        check_structure(value, limits)
    except (orjson.JSONDecodeError, JsonTooComplex):
        return None
    return value
