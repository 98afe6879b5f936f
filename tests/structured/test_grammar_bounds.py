"""Grammar work bounded, over the packaged model's real tokenizer: what the parser could not handle
is refused before compiling or by a bounded compile, fast; a row whose mask overruns its per-step
budget ends alone; the compiled-grammar cache stays within its bytes."""

from __future__ import annotations

import gc
import json
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragllm.engines.inprocess.sample.masks import TokenMasks
from ragllm.errors import InvalidRequest
from ragllm.structured.grammar_cache import GrammarCache
from ragllm.structured.grammars import GrammarCompiler, GrammarViolation, MaskOverBudget
from ragllm.structured.parser_limits import MAX_CHOICES, MAX_SCHEMA_PROPERTIES
from ragllm.structured.spec import structured_output_of

# Every parse of a string of 'a's is ambiguous in more ways each step: its mask costs grow with the answer.
AMBIGUOUS = 'start: s "."\ns: s s | s s s | "a" | "b" | "ab" | "ba" | "aa"\n'


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(
        tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}), mask_budget_s=0.5
    )


def _properties(n: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}}


def _refused_within(seconds: float, make) -> InvalidRequest:
    """The refusal's cost in this process's CPU time: other processes on a loaded machine do not
    count, nor does a collection of garbage that earlier tests left (collected first), while a
    compile or a quadratic check would still overrun the bound many times over. Wall time gets a
    loose bound too, which waiting (a lock, a timeout) would overrun without using the CPU."""
    gc.collect()
    started, wall = time.process_time(), time.perf_counter()
    with pytest.raises(InvalidRequest) as refused:
        make()
    assert time.process_time() - started < seconds
    assert time.perf_counter() - wall < 10 * seconds
    return refused.value


def test_a_schema_of_5000_properties_is_refused_before_compiling():
    schema = _properties(5000)
    error = _refused_within(0.5, lambda: structured_output_of({"guided_json": schema}))
    assert error.param == "guided_json" and "5000 properties" in error.message


def test_a_schema_past_the_lexer_fuel_is_refused_by_a_bounded_compile(compiler):
    spec = structured_output_of(
        {"guided_json": _properties(MAX_SCHEMA_PROPERTIES)}
    )  # within the count bound
    error = _refused_within(2.0, lambda: compiler.grammar(spec))
    assert error.param == "guided_json" and "too big" in error.message


@pytest.mark.parametrize("count", [MAX_CHOICES + 1, 100_000])
def test_a_choice_list_past_the_row_bound_is_refused_at_once(count):
    choices = [f"option {i}" for i in range(count)]
    error = _refused_within(0.5, lambda: structured_output_of({"guided_choice": choices}))
    assert error.param == "guided_choice" and f"{count} choices" in error.message


def test_the_largest_choice_list_allowed_compiles_and_masks(compiler, tokenizer):
    grammar = compiler.grammar(
        structured_output_of({"guided_choice": [f"w{i} x" for i in range(MAX_CHOICES)]})
    )
    masked, failures = TokenMasks(len(tokenizer), torch.device("cpu")).apply(
        torch.zeros(1, len(tokenizer)), [grammar]
    )
    assert failures == [None] and torch.isfinite(masked).any()


def test_a_rule_of_too_many_alternatives_ends_its_row_alone_with_the_parser_limit(
    compiler, tokenizer
):
    """A Lark rule is not counted up front: its row fills once the answer's first token leaves every
    alternative open, and that token ends the row with the parser's limit named, not a panic."""
    lark = "start: " + " | ".join(f'"w{i}"' for i in range(MAX_CHOICES + 2))
    grammar = compiler.grammar(structured_output_of({"guided_grammar": lark}))
    mate = compiler.grammar(structured_output_of({"guided_regex": "[a-z]+"}))
    masks = TokenMasks(len(tokenizer), torch.device("cpu"))
    assert masks.apply(torch.zeros(2, len(tokenizer)), [grammar, mate])[1] == [None, None]
    with pytest.raises(GrammarViolation) as violation:  # the scheduler ends this row alone on it
        grammar.accept(tokenizer.encode("w", add_special_tokens=False)[0])
    assert "max is 2000" in str(violation.value)
    error = grammar.unfollowable(violation.value)
    assert error.code == "structured_output_failed" and error.param == "guided_grammar"
    assert "panic" not in error.message.lower() and "\n" not in error.message
    assert masks.apply(torch.zeros(1, len(tokenizer)), [mate])[1] == [None]


def test_a_grammar_whose_first_mask_overruns_the_budget_is_refused(tokenizer):
    strict = GrammarCompiler(
        tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}), mask_budget_s=1e-7
    )
    error = _refused_within(
        2.0, lambda: strict.grammar(structured_output_of({"guided_regex": "[a-z]+"}))
    )
    assert error.param == "guided_regex" and "first token mask took" in error.message


def test_a_row_whose_mask_overruns_the_budget_ends_alone(compiler, tokenizer):
    """An ambiguous grammar fed 'a' after 'a': its masks grow each step until one overruns the
    budget; that step fails its row, and only its row, and batch-mates keep their masks."""
    budget_s = 0.004
    a = tokenizer.encode("a", add_special_tokens=False)[0]
    pathological = compiler.grammar(structured_output_of({"guided_grammar": AMBIGUOUS}))
    mates = [
        compiler.grammar(structured_output_of({"guided_regex": "[a-z ]{0,1000}"})) for _ in range(3)
    ]
    masks = TokenMasks(len(tokenizer), torch.device("cpu"), budget_s=budget_s)
    for step in range(400):
        masked, failures = masks.apply(torch.zeros(4, len(tokenizer)), [pathological, *mates])
        if failures[0] is not None:
            break
        assert failures == [None] * 4
        for grammar in (pathological, *mates):
            grammar.accept(a)
    else:
        pytest.fail("the ambiguous grammar's masks never overran the budget")
    assert isinstance(failures[0], MaskOverBudget) and "token mask took" in str(failures[0])
    assert failures[1:] == [None] * 3 and masks.num_over_budget == 1
    assert all(
        masked[row, a] == 0 for row in (1, 2, 3)
    )  # the mates' masks are their own, not blanked
    error = pathological.unfollowable(failures[0])
    assert error.code == "structured_output_failed" and error.param == "guided_grammar"
    # Without a budget the same position keeps going (it is the budget that ended it).
    unbounded = TokenMasks(len(tokenizer), torch.device("cpu"))
    assert unbounded.apply(torch.zeros(1, len(tokenizer)), [pathological])[1] == [None]


def test_the_compiled_grammar_cache_stays_within_its_bytes(tokenizer):
    bound = 1024 * 1024
    cached = GrammarCompiler(
        tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}), cache_bytes=bound
    )
    for i in range(24):  # each ~0.2 MB of compiled text: 24 of them are ~5 MB
        schema = {"type": "string", "enum": [f"value {i} {j} " + "x" * 40 for j in range(1500)]}
        cached.grammar(structured_output_of({"guided_json": schema}))
        assert cached.cache.num_bytes <= bound
    assert 0 < len(cached.cache) < 24 and cached.num_compiled == 24
    newest = structured_output_of({"guided_json": schema})
    cached.grammar(newest)
    assert cached.num_compiled == 24  # the most recent stayed


def test_the_cache_drops_the_least_recently_used_first():
    cache = GrammarCache(max_bytes=30)
    cache.put("a", "a" * 10)
    cache.put("b", "b" * 10)
    cache.put("c", "c" * 10)
    assert cache.get("a") == "a" * 10  # a is now the most recent
    cache.put("d", "d" * 10)
    assert cache.get("b") is None and cache.get("a") and cache.get("c") and cache.get("d")
    assert cache.num_bytes == 30


def test_the_cache_counts_bytes_not_characters_and_keeps_nothing_heavier_than_itself():
    cache = GrammarCache(max_bytes=8)
    cache.put("wide", "é" * 5)  # 10 bytes
    assert cache.get("wide") is None and cache.num_bytes == 0
    cache.put("k", "abc")
    cache.put("k", "abcdef")  # replaced, not counted twice
    assert cache.num_bytes == 6 and len(cache) == 1


# Hostile values where a choice list or a schema's properties go: a 400 naming the field, never another error.
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    count=st.integers(0, 3 * MAX_CHOICES),
    filler=st.sampled_from(["", "x", 0, None, ["a"], {"a": 1}]),
    field=st.sampled_from(["guided_choice", "structured_outputs"]),
)
def test_choice_lists_of_any_size_and_type_are_accepted_or_a_400_naming_the_field(
    count, filler, field
):
    choices = [f"c{i}" for i in range(count)]
    if count and filler != "x":
        choices[count // 2] = filler
    fields = (
        {"guided_choice": choices}
        if field == "guided_choice"
        else {"structured_outputs": {"choice": choices}}
    )
    param = "guided_choice" if field == "guided_choice" else "structured_outputs.choice"
    try:
        spec = structured_output_of(fields)
    except InvalidRequest as exc:
        assert exc.param == param and exc.status_code == 400
        assert count == 0 or count > MAX_CHOICES or filler != "x"
    else:
        assert 0 < count <= MAX_CHOICES and spec.choices() == choices


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(widths=st.lists(st.integers(0, 700), min_size=1, max_size=4), junk=_values)
def test_property_counts_over_nested_schemas_are_bounded(widths, junk):
    """Properties spread over nested objects count together; junk property schemas are a 400 too."""
    schema: dict = {"type": "object", "properties": {}}
    for depth, width in enumerate(widths):
        schema["properties"].update({f"d{depth}_{i}": {"type": "string"} for i in range(width)})
        schema["properties"][f"nested{depth}"] = schema = (
            {"type": "object", "properties": {}} if depth == 0 else schema
        )
    root = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string"} for i in range(widths[0])},
        "$defs": {f"n{j}": _properties(w) for j, w in enumerate(widths[1:])},
        "x-junk": junk,
    }
    total = sum(widths)
    try:
        structured_output_of({"guided_json": json.dumps(root)})
    except InvalidRequest as exc:
        assert exc.param == "guided_json"
        assert (
            total > MAX_SCHEMA_PROPERTIES
            or "not a valid JSON Schema" in exc.message
            or "JSON" in exc.message
        ), exc.message
    else:
        assert total <= MAX_SCHEMA_PROPERTIES
