"""What a request constrains its answer to, read from OpenAI's ``response_format`` or vLLM's
``structured_outputs`` (and its older ``guided_*`` spellings).

Only the shape of the request is checked here, schemas as schemas (``schema_check``), with the bounds
that refuse before any compile what the grammar parser could not handle (``parser_limits``: choice
lists, property counts); whether a schema or grammar is one the engine can enforce is otherwise the
grammar compiler's verdict (a 400 naming what it could not compile).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ragllm.bounded_json import JsonLimits, loads_bounded
from ragllm.config import InputSettings
from ragllm.errors import InvalidRequest, Unsupported
from ragllm.structured.parser_limits import MAX_CHOICES, MAX_SCHEMA_PROPERTIES
from ragllm.structured.schema_check import check_schema, num_properties

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]

# vLLM's older top-level spellings, each the same as one key of ``structured_outputs``.
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_STRUCTURED_KEYS = {"json", "regex", "choice", "grammar", "json_object"}
DEFAULT_SCHEMA_LIMITS = JsonLimits.schema(InputSettings())


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """``source`` is canonical text: sorted JSON for a schema or a choice list, the pattern or grammar
    as sent otherwise; equal constraints compare (and cache) equal."""

    kind: Kind
    source: str = ""
    param: str = field(default="response_format", compare=False)  # the request field it came from

    def schema(self) -> dict[str, Any]:
        return json.loads(self.source) if self.kind == "json_schema" else {"type": "object"}

    def choices(self) -> list[str]:
        return json.loads(self.source)


def structured_output_of(
    fields: dict[str, Any], limits: JsonLimits = DEFAULT_SCHEMA_LIMITS
) -> StructuredOutput | None:
    """The one constraint a request's fields ask for (None: free text); 400 for two at once or a
    malformed one. ``fields`` holds ``response_format``, ``structured_outputs`` and ``guided_*`` as sent;
    ``limits`` bound each schema."""
    found: list[tuple[str, StructuredOutput]] = []
    response_format = fields.get("response_format")
    if response_format is not None:
        spec = _from_response_format(response_format, limits)
        if spec is not None:
            found.append(("response_format", spec))
    structured = fields.get("structured_outputs")
    if structured is not None:
        found += _from_structured_outputs(structured, limits)
    for name, key in GUIDED_FIELDS.items():
        if fields.get(name) is not None:
            found.append((name, _from_key(key, fields[name], name, limits)))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise InvalidRequest(
            f"ask for one structured output at a time, not several ({names})", param=found[1][0]
        )
    return found[0][1] if found else None


def _from_response_format(
    response_format: dict[str, Any], limits: JsonLimits
) -> StructuredOutput | None:
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        wrapper = response_format.get("json_schema")
        if not isinstance(wrapper, dict) or not isinstance(wrapper.get("schema"), dict):
            raise InvalidRequest(
                "response_format of type 'json_schema' needs json_schema.schema, a JSON Schema "
                "object",
                param="response_format.json_schema.schema",
            )
        return _schema(wrapper["schema"], "response_format.json_schema.schema", limits)
    raise Unsupported(
        f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
        "'json_schema'",
        param="response_format.type",
    )


def _from_structured_outputs(
    structured: Any, limits: JsonLimits
) -> list[tuple[str, StructuredOutput]]:
    if not isinstance(structured, dict):
        raise InvalidRequest("structured_outputs must be an object", param="structured_outputs")
    keys = [key for key, value in structured.items() if value is not None and value is not False]
    unknown = [key for key in keys if key not in _STRUCTURED_KEYS]
    if unknown:
        raise Unsupported(
            f"structured_outputs.{unknown[0]} is not supported; use one of "
            f"{', '.join(sorted(_STRUCTURED_KEYS))}",
            param=f"structured_outputs.{unknown[0]}",
        )
    return [
        (
            f"structured_outputs.{key}",
            _from_key(key, structured[key], f"structured_outputs.{key}", limits),
        )
        for key in keys
    ]


def _from_key(key: str, value: Any, param: str, limits: JsonLimits) -> StructuredOutput:
    if key == "json_object":
        return StructuredOutput("json_object", param=param)
    if key == "json":
        if isinstance(value, str):
            value = loads_bounded(value, limits, param)
        return _schema(value, param, limits)
    if key == "choice":
        if isinstance(value, list) and len(value) > MAX_CHOICES:
            raise InvalidRequest(
                f"{param} has {len(value)} choices; at most {MAX_CHOICES} can be enforced",
                param=param,
            )
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(c, str) and c for c in value)
        ):
            raise InvalidRequest(
                f"{param} must be a non-empty list of non-empty strings", param=param
            )
        return StructuredOutput("choice", json.dumps(value), param)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{param} must be a non-empty string", param=param)
    return StructuredOutput("regex" if key == "regex" else "grammar", value, param)


def _schema(schema: Any, param: str, limits: JsonLimits) -> StructuredOutput:
    check_schema(schema, param, limits)
    declared = num_properties(schema)
    if declared > MAX_SCHEMA_PROPERTIES:
        raise InvalidRequest(
            f"{param} declares {declared} properties; at most {MAX_SCHEMA_PROPERTIES} can be "
            "enforced",
            param=param,
        )
    return StructuredOutput("json_schema", _canonical(schema), param)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
