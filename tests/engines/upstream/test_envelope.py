"""Reading an upstream's error into OpenAI's envelope fields: vLLM's shapes, and anything at all."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from ragllm.engines.upstream.envelope import (
    MAX_FIELD_CHARS,
    MAX_MESSAGE_CHARS,
    error_fields,
    is_error_event,
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=40,
)
FIELD_NAMES = st.sampled_from(["message", "type", "param", "code", "detail", "object", "error"])
ENVELOPES = (
    JSON
    | st.dictionaries(FIELD_NAMES, JSON, max_size=6)
    | st.fixed_dictionaries({"error": st.dictionaries(FIELD_NAMES, JSON, max_size=6)})
)


def test_vllms_integer_code_becomes_a_string_in_either_shape():
    for envelope in (
        {"error": {"message": "too long", "type": "BadRequestError", "param": None, "code": 400}},
        {
            "object": "error",
            "message": "too long",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
    ):
        fields = error_fields(envelope)
        assert (fields.message, fields.type, fields.param, fields.code) == (
            "too long",
            "BadRequestError",
            None,
            "400",
        )


def test_openais_own_envelope_passes_unchanged():
    fields = error_fields(
        {
            "error": {
                "message": "m",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "invalid_value",
            }
        }
    )
    assert (fields.message, fields.type, fields.param, fields.code) == (
        "m",
        "invalid_request_error",
        "messages",
        "invalid_value",
    )


def test_error_events_are_told_from_answers():
    assert is_error_event({"object": "error", "message": "x"})
    assert is_error_event({"error": "boom"})
    assert not is_error_event({"object": "chat.completion.chunk", "choices": []})


def _deep(depth: int) -> object:
    value: object = "bottom"
    for _ in range(depth):
        value = {"error": value} if depth % 2 else [value]
    return value


@settings(max_examples=300, deadline=None)
@given(ENVELOPES)
@example(
    {"error": {"message": "x" * 1_000_000, "code": "c" * 10_000, "type": ["not", "a", "string"]}}
)
@example({"error": {"message": ["a", {"list": "message"}], "code": True, "param": 7}})
@example({"error": {"message": None, "code": 10**30}})
@example(_deep(3000))
@example(_deep(3001))
@example("")
def test_any_envelope_yields_schema_valid_bounded_fields(envelope):
    fields = error_fields(envelope)
    assert isinstance(fields.message, str) and 0 < len(fields.message) <= MAX_MESSAGE_CHARS
    for value in (fields.type, fields.param, fields.code):
        assert value is None or (isinstance(value, str) and 0 < len(value) <= MAX_FIELD_CHARS)
