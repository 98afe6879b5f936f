"""Closing structured answers before their budget ends, on real llguidance matchers over the packaged
model's tokenizer: the way out the search finds is accepted by the grammar and parses, a runaway
"model" is closed in time at any budget its grammar can be closed within, runaway strings end early,
and grammars or budgets with no short way out keep today's end instead of failing or stalling."""

from __future__ import annotations

import json
import time

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragllm.structured.closing import (
    MAX_CLOSING_TOKENS,
    Closer,
    ClosingSearch,
    ClosingSettings,
    NoWayOut,
    StringState,
    repeats,
)
from ragllm.structured.grammars import GrammarCompiler
from ragllm.structured.spec import StructuredOutput
from ragllm.tools.formats import call_constraint
from ragllm.tools.request import ToolUse

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "integer"},
    },
    "required": ["title", "tags", "score"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))


@pytest.fixture(scope="module")
def search(compiler):
    return ClosingSearch(compiler.tokenizer_index(), compiler.vocab_size)


def _schema(schema: dict) -> StructuredOutput:
    return StructuredOutput("json_schema", json.dumps(schema))


def _closed_text(compiler, search, tokenizer, spec: StructuredOutput, prefix: str) -> str:
    grammar = compiler.grammar(spec)
    assert grammar.matcher.consume_tokens(tokenizer.encode(prefix, add_special_tokens=False))
    strings = StringState()
    strings.feed(prefix.encode())
    before = grammar.matcher.deep_copy()
    path = search.path(grammar.matcher, strings)
    assert grammar.matcher.is_accepting() == before.is_accepting()  # the row's own is untouched
    for token in path:
        grammar.accept(token)
    assert grammar.matcher.is_accepting()
    return prefix + tokenizer.decode(path)


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "{",
        '{"title": "architecture-architecture-architecture',
        '{"title": "a \\"quoted',
        '{"title": "a", "tags": ["x", "y',
        '{"title": "a", "tags": [], "score": 12',
    ],
)
def test_the_way_out_of_a_schema_parses_and_validates(compiler, search, tokenizer, prefix):
    text = _closed_text(compiler, search, tokenizer, _schema(SCHEMA), prefix)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert text.startswith(prefix)


def test_the_way_out_fills_required_properties_minimally(compiler, search, tokenizer):
    text = _closed_text(compiler, search, tokenizer, _schema(SCHEMA), "{")
    assert json.loads(text) == {"title": "", "tags": [], "score": 0}


@pytest.mark.parametrize("prefix", ["", '{"a": [1, {"b": "cc', '{"a": {"b": [[["x'])
def test_the_way_out_of_json_object_parses(compiler, search, tokenizer, prefix):
    text = _closed_text(compiler, search, tokenizer, StructuredOutput("json_object"), prefix)
    assert isinstance(json.loads(text), dict)


def test_the_way_out_of_a_required_call_is_a_complete_call(compiler, search, tokenizer):
    spec = call_constraint("hermes", ToolUse([WEATHER], "required", None, None))
    prefix = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    text = _closed_text(compiler, search, tokenizer, spec, prefix)
    body = text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
    assert json.loads(body) == {"name": "get_weather", "arguments": {"city": "Par", "days": 0}}


def test_enums_patterns_and_minimums_are_met(compiler, search, tokenizer):
    schema = {
        "type": "object",
        "properties": {
            "grade": {"enum": ["relevant", "irrelevant"]},
            "phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"},
            "name": {"type": "string", "minLength": 3},
            "items": {"type": "array", "items": {"type": "boolean"}, "minItems": 2},
        },
        "required": ["grade", "phone", "name", "items"],
    }
    jsonschema.validate(
        json.loads(_closed_text(compiler, search, tokenizer, _schema(schema), "")), schema
    )


def test_a_grammar_with_no_short_way_out_is_said_so(compiler, search):
    grammar = compiler.grammar(StructuredOutput("regex", "[a-z]{400}"))
    with pytest.raises(NoWayOut):
        search.path(grammar.matcher, StringState())


def test_strings_are_tracked_through_escapes():
    strings = StringState()
    strings.feed(b'{"a": "x\\"y')
    assert strings.open
    strings.feed(b'\\\\"')
    assert not strings.open


def test_repetition_is_a_unit_repeated_back_to_back_over_the_span():
    assert repeats([7, 8] * 8, 16)
    assert repeats([1, 2, 3, 4, 5, 6] * 3, 16)
    assert repeats([5] * 16, 16)
    assert not repeats([5] * 15, 16)
    assert not repeats(list(range(40)), 16)
    assert not repeats([1, 2, 3] * 5 + [4], 16)


def _runaway_choice(grammar, search, preference: list[int]) -> int:
    """What a model that never wants to stop writes: more of a string, more structure, else the
    first token its grammar allows."""
    for token in preference:
        probe = grammar.matcher.deep_copy()
        if probe.try_consume_tokens([token]) == 1:
            return token
    mask = np.frombuffer(grammar.matcher.compute_bitmask(), dtype=np.uint32).view(np.uint8)
    allowed = np.flatnonzero(np.unpackbits(mask, bitorder="little")[: search.vocab_size])
    return int(next(token for token in allowed if search.token_bytes[token]))


def _run(compiler, tokenizer, search, spec, max_tokens, settings_=ClosingSettings()):
    """A runaway model under ``spec`` for ``max_tokens``, closed by a Closer; the tokens written,
    the closer, and the slowest look for a way out."""
    preference = [
        tokenizer.encode(text, add_special_tokens=False)[0]
        for text in ("architecture", "-", ' "', '"', "{", "[", ", ", ": ", "1", "x", "}", "]")
    ]
    grammar = compiler.grammar(spec)
    closer = Closer(grammar.matcher, search, settings_)
    tokens: list[int] = []
    slowest = 0.0
    while len(tokens) < max_tokens and not grammar.finished and not closer.closed:
        started = time.perf_counter()
        forced = closer.forced(max_tokens - len(tokens))
        slowest = max(slowest, time.perf_counter() - started)
        if forced is None:
            chosen = _runaway_choice(grammar, search, preference)
            forced = closer.vetted(chosen, max_tokens - len(tokens))
        token = forced
        grammar.accept(token)
        closer.accepted(token)
        tokens.append(token)
    return tokens, closer, slowest


NO_REPEATS = ClosingSettings(repeat_tokens=0)


@pytest.mark.parametrize("max_tokens", [24, 40, 80, 120])
def test_a_runaway_answer_is_closed_within_its_budget(compiler, tokenizer, search, max_tokens):
    tokens, closer, _ = _run(compiler, tokenizer, search, _schema(SCHEMA), max_tokens, NO_REPEATS)
    assert closer.closed and len(tokens) <= max_tokens
    jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMA)


def test_a_runaway_string_is_closed_and_the_answer_goes_on(compiler, tokenizer, search):
    tokens, closer, _ = _run(
        compiler, tokenizer, search, _schema(SCHEMA), 400, ClosingSettings(window=8)
    )
    text = tokenizer.decode(tokens)
    answer = json.loads(text)
    jsonschema.validate(answer, SCHEMA)
    # Each string ended after its repetition span rather than running to the budget.
    assert len(answer["title"]) < 200 and len(tokens) < 400


def test_repetition_off_leaves_the_string_to_the_budget(compiler, tokenizer, search):
    off = ClosingSettings(repeat_tokens=0)
    tokens, closer, _ = _run(compiler, tokenizer, search, _schema(SCHEMA), 120, off)
    answer = json.loads(tokenizer.decode(tokens))
    assert closer.closed and len(answer["title"]) > 200


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5])
def test_a_budget_too_small_for_any_answer_keeps_todays_end(
    compiler, tokenizer, search, max_tokens
):
    tokens, closer, _ = _run(compiler, tokenizer, search, _schema(SCHEMA), max_tokens)
    assert len(tokens) == max_tokens and not closer.closed and closer.hopeless


def _objects(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.dictionaries(
        st.sampled_from(["a", "bb", "title", "summary", "k9", "zz_top", "x"]),
        inner,
        min_size=1,
        max_size=6,
    ).map(lambda props: {"type": "object", "properties": props, "required": sorted(props)})


def _schemas(depth: int) -> st.SearchStrategy:
    leaf = st.sampled_from(
        [
            {"type": "string"},
            {"type": "integer"},
            {"type": "boolean"},
            {"type": "number"},
            {"enum": ["alpha", "beta"]},
            {"type": "string", "minLength": 2},
            {"type": "array", "items": {"type": "string"}},
        ]
    )
    if depth == 0:
        return leaf
    inner = _schemas(depth - 1)
    objects = _objects(inner)
    arrays = inner.map(lambda items: {"type": "array", "items": items, "minItems": 1})
    return st.one_of(leaf, objects, arrays)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schema=_objects(_schemas(3)),
    max_tokens=st.integers(1, 90),
)
def test_any_schema_and_budget_ends_parsed_or_as_today_never_stalled(
    compiler, tokenizer, search, schema, max_tokens
):
    """Deep nesting, many required properties, tiny budgets: either the answer closes and
    validates, or nothing is forced and it ends at its budget as before; each look is bounded."""
    spec = _schema(schema)
    tokens, closer, slowest = _run(compiler, tokenizer, search, spec, max_tokens)
    assert len(tokens) <= max_tokens
    assert slowest < 0.25  # a look is at most MAX_CLOSING_TOKENS bounded steps
    complete = closer.matcher.is_accepting()  # closed early, or ended by itself
    if complete:
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)
    assert complete or not closer.closed
    try:
        shortest = len(search.path(compiler.grammar(spec).matcher, StringState()))
    except NoWayOut:
        shortest = MAX_CLOSING_TOKENS + 1
    if shortest + ClosingSettings().margin <= min(max_tokens, ClosingSettings().window):
        assert complete, (schema, max_tokens, shortest, tokenizer.decode(tokens))


def test_the_setting_turns_closing_off():
    from ragllm.config import EngineSettings
    from ragllm.engines.inprocess.engine import closing_settings

    assert closing_settings(EngineSettings(grammar_close_early=False)) is None
    tuned = EngineSettings(grammar_close_window_tokens=64, grammar_string_repeat_tokens=0)
    assert closing_settings(tuned) == ClosingSettings(window=64, margin=2, repeat_tokens=0)


def test_a_look_that_overruns_its_cpu_budget_finds_no_way_out(compiler, search):
    grammar = compiler.grammar(_schema(SCHEMA))
    with pytest.raises(NoWayOut):
        search.path(grammar.matcher, StringState(), budget_s=0.0)
    assert len(search.path(grammar.matcher, StringState())) > 0  # the same look within budget


def test_a_slow_grammar_costs_one_bounded_look_then_none(compiler, tokenizer, search):
    ambiguous = 'start: s "\\u2603"\ns: s s | s s s | "a" | "b" | "ab" | "ba" | "aa"\n'
    grammar = compiler.grammar(StructuredOutput("grammar", ambiguous))
    closer = Closer(grammar.matcher, search, ClosingSettings())
    a = tokenizer.encode("a", add_special_tokens=False)[0]
    looks = []
    for remaining in range(48, 20, -1):
        started = time.thread_time()
        forced = closer.forced(remaining)
        looks.append(time.thread_time() - started)
        grammar.accept(forced if forced is not None else a)
        closer.accepted(forced if forced is not None else a)
    assert max(looks) < 0.05
    assert closer.hopeless or closer.closing


def test_strings_are_read_only_after_the_thinking(compiler, search, tokenizer):
    grammar = compiler.grammar(_schema(SCHEMA))
    # The packaged tokenizer has no </think> token: any id stands for it here.
    end = tokenizer.encode("X", add_special_tokens=False)[0]
    closer = Closer(grammar.matcher, search, ClosingSettings(), thinking_end=end)
    quote, word = (tokenizer.encode(t, add_special_tokens=False)[0] for t in ('"', "architecture"))
    for token in [quote] + [word] * 20:  # a quote in the thinking, then a repeated word
        closer.accepted(token)
    assert not closer.strings.open and closer.forced(400) is None  # no runaway string seen
    closer.accepted(end)
    closer.accepted(quote)
    assert closer.strings.open
