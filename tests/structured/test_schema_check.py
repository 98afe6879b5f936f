"""JSON Schemas checked as schemas: every real schema a client library writes passes; wrong keyword
types, foreign dialects, self-referring cycles and oversized schemas are 400s naming the field; and
nothing a schema holds makes the check raise anything else."""

from __future__ import annotations

import enum
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field

from ragllm.bounded_json import JsonLimits
from ragllm.config import InputSettings
from ragllm.errors import InvalidRequest
from ragllm.structured.schema_check import check_schema
from ragllm.structured.spec import structured_output_of
from ragllm.tools.request import tool_use_of

LIMITS = JsonLimits.schema(InputSettings())
PARAM = "response_format.json_schema.schema"


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    street: str
    city: str = Field(description="The city", max_length=80)
    postcode: str | None = Field(None, pattern=r"^\p{L}?[0-9]{4,6}$")


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=150)
    colour: Colour
    kind: Literal["a", "b"]
    addresses: list[Address]
    manager: Person | None = None  # recursive through a property: fine
    scores: dict[str, float] = {}
    tags: set[str] = set()


class Grade(BaseModel):
    relevant: Literal["yes", "no"]
    reason: str


def search_documents(
    query: str, top_k: int = 5, filters: dict[str, str] | None = None
) -> list[str]:
    """Search the knowledge base.

    Args:
        query: what to look for
        top_k: how many documents to return
        filters: metadata that must match
    """
    return []


REAL_SCHEMAS = [
    Person.model_json_schema(),
    Grade.model_json_schema(),
    Person.model_json_schema(mode="serialization"),
    convert_to_openai_tool(search_documents)["function"]["parameters"],
    convert_to_openai_tool(Person)["function"]["parameters"],
    {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "definitions": {"a": {"type": "string"}},
        "properties": {"x": {"$ref": "#/definitions/a"}},
    },
    {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "array",
        "prefixItems": [{"type": "integer"}],
    },
    {
        "type": "object",
        "properties": {"next": {"$ref": "#"}, "value": {"type": "integer"}},
    },  # a linked list
    {
        "type": "object",
        "properties": {"not": {"type": "string"}, "$ref": {"type": "string"}},
    },  # keywords as names
    {
        "anyOf": [{"type": "string"}, {"$ref": "#"}]
    },  # any string satisfies it: a way out of the cycle
]


@pytest.mark.parametrize("schema", REAL_SCHEMAS, ids=range(len(REAL_SCHEMAS)))
def test_schemas_that_client_libraries_write_pass(schema):
    check_schema(schema, PARAM, LIMITS)


@pytest.mark.parametrize(
    "schema, where",
    [
        (
            {"type": "object", "properties": {"e": {"type": "string", "format": ["email"]}}},
            "/properties/e/format",
        ),
        ({"type": "string", "format": {}}, "/format"),
        ({"type": "strin"}, "/type"),
        ({"required": "a"}, "/required"),
        ({"properties": []}, "/properties"),
        ({"$ref": 5}, "/$ref"),
        ({"minLength": -1}, "/minLength"),
        ({"enum": 1}, "/enum"),
    ],
)
def test_a_keyword_of_the_wrong_kind_is_a_400_saying_where(schema, where):
    with pytest.raises(InvalidRequest) as refusal:
        check_schema(schema, PARAM, LIMITS)
    assert refusal.value.param == PARAM and f"at {where}," in refusal.value.message


@pytest.mark.parametrize(
    "dialect", ["http://127.0.0.1:9/schema", "file:///etc/passwd", 7, "draft-07"]
)
def test_a_dialect_other_than_a_published_draft_is_refused_without_being_fetched(dialect):
    with pytest.raises(InvalidRequest) as refusal:
        check_schema({"$schema": dialect, "type": "string"}, PARAM, LIMITS)
    assert "$schema" in refusal.value.message


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},
        {"allOf": [{"type": "object"}, {"$ref": "#"}]},
        {
            "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}]}},
            "$ref": "#/$defs/a",
        },
        {"type": "object", "properties": {"x": {"$ref": "#/properties/x"}}},
    ],
)
def test_a_ref_that_leads_back_without_a_value_in_between_is_refused(schema):
    with pytest.raises(InvalidRequest) as refusal:
        check_schema(schema, PARAM, LIMITS)
    assert "refers back to itself" in refusal.value.message


def test_a_schema_over_the_size_limit_is_refused():
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}
    check_schema(wide, PARAM, LIMITS)  # OpenAI's own limit: 5,000 properties
    wider = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(12_000)}}
    with pytest.raises(InvalidRequest) as refusal:
        check_schema(wider, PARAM, LIMITS)
    assert refusal.value.code == "json_too_large"


def test_every_carrier_of_a_schema_checks_it():
    bad = {"type": "object", "properties": {"e": {"type": "string", "format": ["email"]}}}
    for fields, param in [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": bad}}}, PARAM),
        ({"guided_json": bad}, "guided_json"),
        ({"guided_json": '{"type": "string", "format": {}}'}, "guided_json"),
        ({"structured_outputs": {"json": bad}}, "structured_outputs.json"),
    ]:
        with pytest.raises(InvalidRequest) as refusal:
            structured_output_of(fields, LIMITS)
        assert refusal.value.param == param
    tool = {"type": "function", "function": {"name": "f", "parameters": {**bad}}}
    with pytest.raises(InvalidRequest) as refusal:
        tool_use_of([tool], "auto", None, LIMITS)
    assert refusal.value.param == "tools[0].function.parameters"


schemas = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=8)
    | st.sampled_from(["#", "#/$defs/a", "#/properties/x", "string", "object", "email"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "properties",
                    "items",
                    "$ref",
                    "$defs",
                    "a",
                    "x",
                    "anyOf",
                    "allOf",
                    "not",
                    "if",
                    "format",
                    "required",
                    "enum",
                    "$schema",
                    "minLength",
                    "pattern",
                    "additionalProperties",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=schemas)
def test_any_value_as_a_schema_passes_or_is_a_400(schema):
    try:
        check_schema(schema, PARAM, LIMITS)
    except InvalidRequest as refusal:
        assert refusal.status_code == 400 and refusal.param == PARAM
