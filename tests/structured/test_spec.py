"""Reading what a request constrains its answer to, from OpenAI's and vLLM's spellings."""

from __future__ import annotations

import json

import pytest

from ragllm.errors import InvalidRequest, Unsupported
from ragllm.structured.grammars import MAX_SAFE_INTEGER, bounded_schema
from ragllm.structured.spec import structured_output_of

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}


def test_free_text_asks_for_nothing():
    assert structured_output_of({}) is None
    assert structured_output_of({"response_format": {"type": "text"}}) is None


def test_openai_json_schema_is_kept_canonically():
    spec = structured_output_of(
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": SCHEMA, "strict": True},
            }
        }
    )
    assert spec.kind == "json_schema"
    assert spec.schema() == SCHEMA
    assert spec.source == json.dumps(SCHEMA, sort_keys=True, separators=(",", ":"))
    assert spec.param == "response_format.json_schema.schema"


@pytest.mark.parametrize(
    "fields, kind",
    [
        ({"response_format": {"type": "json_object"}}, "json_object"),
        ({"structured_outputs": {"json": SCHEMA}}, "json_schema"),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, "json_schema"),
        ({"structured_outputs": {"json_object": True}}, "json_object"),
        ({"structured_outputs": {"regex": "[0-9]+"}}, "regex"),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice"),
        ({"structured_outputs": {"grammar": 'start: "a"+'}}, "grammar"),
        ({"guided_json": SCHEMA}, "json_schema"),
        ({"guided_regex": "[0-9]+"}, "regex"),
        ({"guided_choice": ["yes", "no"]}, "choice"),
        ({"guided_grammar": 'root ::= "a"+'}, "grammar"),
    ],
)
def test_every_spelling_is_understood(fields, kind):
    assert structured_output_of(fields).kind == kind


def test_the_same_schema_in_two_spellings_is_one_constraint():
    openai = structured_output_of(
        {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}
    )
    vllm = structured_output_of({"guided_json": dict(reversed(list(SCHEMA.items())))})
    assert openai == vllm and hash(openai) == hash(vllm)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": "no"}}},
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": "json"}, "structured_outputs"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": [1]}}, "structured_outputs.json"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["a", 1]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs.regex",
        ),
    ],
)
def test_malformed_or_conflicting_requests_are_400s_naming_the_field(fields, param):
    with pytest.raises(InvalidRequest) as caught:
        structured_output_of(fields)
    assert caught.value.param == param


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ],
)
def test_unknown_kinds_are_unsupported(fields, param):
    with pytest.raises(Unsupported) as caught:
        structured_output_of(fields)
    assert caught.value.param == param


def test_objects_that_list_properties_are_closed_everywhere_and_nothing_else_changes():
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"x": {"type": "string"}}},
            "free": {"type": "object"},
            "list": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
            "open": {"type": "object", "properties": {"y": {}}, "additionalProperties": True},
        },
        "$defs": {
            "Item": {
                "anyOf": [
                    {"type": "object", "properties": {"z": {"type": "integer"}}},
                    {"type": "null"},
                ]
            }
        },
        "enum_like": {"properties": "not a schema"},
    }
    closed = bounded_schema(schema)
    assert closed["additionalProperties"] is False
    # A property named "properties" is a property, not a keyword: closed as an object, not given a
    # property called additionalProperties.
    assert set(closed["properties"]) == {"properties", "free", "list", "open"}
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["free"]
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["$defs"]["Item"]["anyOf"][0]["additionalProperties"] is False
    assert closed["enum_like"] == {"properties": "not a schema"}
    assert (
        schema["properties"]["properties"].get("additionalProperties") is None
    )  # the input is untouched


def test_numbers_and_addresses_get_interoperable_bounds_only_where_the_schema_sets_none():
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "small": {"type": "integer", "minimum": 0, "exclusiveMaximum": 10},
            "x": {"type": "number"},
            "p": {"type": "number", "multipleOf": 0.5, "maximum": 1},
            "mail": {"type": "string", "format": "email"},
            "short": {"type": "string", "format": "email", "maxLength": 40},
            "text": {"type": "string"},
        },
    }
    bounded = bounded_schema(schema)["properties"]
    assert bounded["n"] == {
        "type": "integer",
        "minimum": -MAX_SAFE_INTEGER,
        "maximum": MAX_SAFE_INTEGER,
    }
    assert bounded["small"] == schema["properties"]["small"]
    assert bounded["x"]["multipleOf"] == 1e-10 and bounded["x"]["maximum"] == 1e15
    assert bounded["p"] == {"type": "number", "multipleOf": 0.5, "maximum": 1, "minimum": -1e15}
    assert bounded["mail"]["maxLength"] == 254
    assert bounded["short"]["maxLength"] == 40
    assert bounded["text"] == {"type": "string"}  # free text stays free


def test_keys_of_a_typed_map_are_bounded_and_its_values_keep_their_schema():
    bounded = bounded_schema(
        {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3}
    )
    assert bounded["additionalProperties"] is False
    assert bounded["maxProperties"] == 3
    [(pattern, values)] = bounded["patternProperties"].items()
    assert pattern == "^.{0,128}$" and values["type"] == "integer" and "maximum" in values
    assert bounded_schema({"type": "object"}) == {"type": "object"}  # any object stays any object
