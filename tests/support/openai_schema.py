"""OpenAI's published response schemas (the objects of its OpenAPI description, in tests/data) and
what checks an answer against them, whole or streamed."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

SCHEMAS = json.loads(
    (Path(__file__).parents[1] / "data" / "openai_response_schemas.json").read_text()
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
        },
    },
}


def validate(instance: dict, definition: str) -> None:
    jsonschema.validate(instance, {**SCHEMAS, "$ref": f"#/$defs/{definition}"})


def sse_events(body: str) -> list[dict]:
    """The data of a finished SSE body's events, which must end with ``[DONE]``."""
    data = [line[5:].strip() for line in body.splitlines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]
