"""The bounded JSON reader: depth and value counts as a plain recursive definition gives them, refusals
exactly past the limits, and no recursion of its own however deep the input."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragllm.bounded_json import (
    JsonLimits,
    JsonTooComplex,
    check_structure,
    loads_bounded,
    try_loads_bounded,
)
from ragllm.errors import InvalidRequest

PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=list(HealthCheck)
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=40,
)
UNBOUNDED = JsonLimits(max_depth=10**6, max_values=10**9)


def depth_of(value) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


def values_of(value) -> int:
    if isinstance(value, dict):
        return 1 + sum(values_of(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(values_of(v) for v in value)
    return 1


@PROPERTY_SETTINGS
@given(value=json_values, depth_room=st.integers(-2, 2), values_room=st.integers(-3, 3))
def test_refused_exactly_when_deeper_or_larger_than_the_limits(value, depth_room, values_room):
    depth, values = depth_of(value), values_of(value)
    limits = JsonLimits(
        max_depth=max(1, depth + depth_room), max_values=max(1, values + values_room)
    )
    try:
        counted = check_structure(value, limits, "field")
    except JsonTooComplex as refusal:
        assert depth > limits.max_depth or values > limits.max_values
        assert refusal.param == "field" and refusal.code in ("json_too_deep", "json_too_large")
        assert refusal.status_code == 400
    else:
        assert depth <= limits.max_depth and values <= limits.max_values
        assert counted == values


def test_a_body_refusal_names_the_top_level_field_that_holds_it():
    deep: list = []
    for _ in range(70):
        deep = [deep]
    with pytest.raises(JsonTooComplex) as refusal:
        check_structure(
            {"model": "m", "response_format": {"json_schema": deep}}, JsonLimits(64, 10_000)
        )
    assert refusal.value.param == "response_format" and refusal.value.code == "json_too_deep"
    with pytest.raises(JsonTooComplex) as refusal:
        check_structure(
            {"model": "m", "logit_bias": {str(i): 0 for i in range(2000)}}, JsonLimits(64, 1000)
        )
    assert refusal.value.param == "logit_bias" and refusal.value.code == "json_too_large"


@pytest.mark.parametrize("depth", [65, 1000, 100_000])
def test_deep_text_is_refused_without_recursion(depth):
    text = '{"a": ' * depth + "1" + "}" * depth
    with pytest.raises(JsonTooComplex) as refusal:
        loads_bounded(text, JsonLimits(64, 10_000), "guided_json")
    assert refusal.value.param == "guided_json" and refusal.value.code == "json_too_deep"
    assert try_loads_bounded(text, JsonLimits(64, 10_000)) is None


def test_a_value_as_deep_as_the_limit_is_read():
    text = "[" * 64 + "]" * 64
    assert depth_of(loads_bounded(text, JsonLimits(64, 100), "x")) == 64


@PROPERTY_SETTINGS
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_bytes_are_a_value_or_a_400(raw):
    try:
        value = loads_bounded(raw, UNBOUNDED, "x")
    except InvalidRequest as refusal:
        assert refusal.status_code == 400 and refusal.param == "x"
    else:
        assert orjson.loads(raw) == value
