"""Constraints held after the thinking, on real llguidance matchers over a tokenizer with Qwen3's
thinking markers: any thinking text passes, then only the constraint; the budget forces the end of
the thinking."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragllm.rag.citations import citation_pattern
from ragllm.structured.grammars import GrammarCompiler, GrammarViolation
from ragllm.structured.spec import StructuredOutput
from ragllm.structured.thinking_first import (
    FREE_ANSWER,
    ThinkingGrammar,
    prompt_opens_thinking,
    thinking_markers,
    thinking_tokens,
)
from ragllm.thinking import answer_after_thinking
from tests.support.thinking_model import OPENED_TEMPLATE, thinking_tokenizer

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
CITATIONS = StructuredOutput(
    "regex", citation_pattern(["bridge", "ferry"], "I cannot tell."), "rag.citations"
)


@pytest.fixture(scope="module")
def tokenizer():
    return thinking_tokenizer()


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))


@pytest.fixture(scope="module")
def markers(tokenizer):
    found = thinking_markers(tokenizer)
    assert found is not None
    return found


def _allowed(grammar, vocab: int) -> torch.Tensor:
    """The grammar's token mask as the engine fills it (llguidance's bitmask), one bool per id."""
    words = np.frombuffer(grammar.matcher.compute_bitmask(), dtype=np.uint32)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab]
    return torch.from_numpy(bits.astype(bool))


def _walk(grammar, tokenizer, ids: list[int]) -> None:
    """Feed ``ids``, checking each was allowed by the mask first."""
    for token in ids:
        allowed = _allowed(grammar, len(tokenizer))
        assert allowed[token], f"token {token} ({tokenizer.decode([token])!r}) was masked"
        grammar.accept(token)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_the_markers_are_tokens_of_their_own(tokenizer, markers):
    assert _ids(tokenizer, "a</think>b")[1] == markers.close_id
    assert markers.open_id != markers.close_id


def test_free_thinking_then_only_json_that_validates(compiler, tokenizer, markers):
    grammar = compiler.grammar(
        StructuredOutput("json_schema", json.dumps(SCHEMA)), ThinkingGrammar(markers, False, 200)
    )
    # The answer must open the block: nothing else is allowed first.
    assert _allowed(grammar, len(tokenizer)).nonzero().flatten().tolist() == [markers.open_id]
    thinking = "Hmm [not a citation] {not json} <b>tags</b> and 3.5 things!\n\nOk."
    _walk(grammar, tokenizer, [markers.open_id, *_ids(tokenizer, thinking), markers.close_id])
    # After </think>: the schema's JSON only (a word is masked, the end of the answer too).
    allowed = _allowed(grammar, len(tokenizer))
    assert not allowed[_ids(tokenizer, "Sure")[0]]
    assert not allowed[tokenizer.eos_token_id]
    _walk(grammar, tokenizer, _ids(tokenizer, '\n\n{"n": 42}'))
    assert grammar.finished


def test_citations_after_thinking_that_holds_unknown_brackets(compiler, tokenizer, markers):
    grammar = compiler.grammar(CITATIONS, ThinkingGrammar(markers, False, 200))
    thinking = "The [weather] document is not given; cite [bridge]."
    answer = "It opened in 1987. [bridge]"
    text = f"<think>{thinking}</think>\n\n{answer}"
    _walk(grammar, tokenizer, [markers.open_id, *_ids(tokenizer, thinking), markers.close_id])
    # In the answer, the ids the thinking named freely are refused.
    other = compiler.grammar(CITATIONS, ThinkingGrammar(markers, True, 10))
    _walk(other, tokenizer, [markers.close_id, *_ids(tokenizer, "Yes. [")])
    assert not _allowed(other, len(tokenizer))[_ids(tokenizer, "weather")[0]]
    _walk(grammar, tokenizer, _ids(tokenizer, "\n\n" + answer))
    assert re.fullmatch(CITATIONS.source, answer_after_thinking(text))


def test_a_prompt_that_opened_the_block_starts_inside_the_thinking(compiler, tokenizer, markers):
    grammar = compiler.grammar(
        StructuredOutput("json_schema", json.dumps(SCHEMA)), ThinkingGrammar(markers, True, 50)
    )
    allowed = _allowed(grammar, len(tokenizer))
    assert not allowed[markers.open_id] and allowed[markers.close_id]
    assert allowed[_ids(tokenizer, "Let")[0]]
    _walk(grammar, tokenizer, [*_ids(tokenizer, "Let me see."), markers.close_id])
    _walk(grammar, tokenizer, _ids(tokenizer, '{"n": 1}'))
    assert grammar.finished


def test_the_budget_forces_the_end_of_thinking(compiler, tokenizer, markers):
    grammar = compiler.grammar(CITATIONS, ThinkingGrammar(markers, True, 4))
    words = _ids(tokenizer, " one two three four five six")
    _walk(grammar, tokenizer, words[:4])
    allowed = _allowed(grammar, len(tokenizer))
    assert allowed.nonzero().flatten().tolist() == [markers.close_id]
    with pytest.raises(GrammarViolation):
        grammar.accept(words[4])


def test_a_zero_budget_allows_no_thinking_at_all(compiler, tokenizer, markers):
    grammar = compiler.grammar(CITATIONS, ThinkingGrammar(markers, False, 0))
    _walk(grammar, tokenizer, [markers.open_id])
    assert _allowed(grammar, len(tokenizer)).nonzero().flatten().tolist() == [markers.close_id]


def test_thinking_cannot_spell_the_marker_or_end_the_answer(compiler, tokenizer, markers):
    grammar = compiler.grammar(CITATIONS, ThinkingGrammar(markers, True, 100))
    _walk(grammar, tokenizer, _ids(tokenizer, "so </think"))
    allowed = _allowed(grammar, len(tokenizer))
    assert not allowed[_ids(tokenizer, ">")[0]]  # "</think>" as plain text would end it for readers
    assert not allowed[tokenizer.eos_token_id]
    assert allowed[markers.close_id]


def test_a_bound_alone_leaves_the_answer_free(compiler, tokenizer, markers):
    grammar = compiler.grammar(FREE_ANSWER, ThinkingGrammar(markers, False, 3))
    _walk(grammar, tokenizer, [markers.open_id, *_ids(tokenizer, " a b c"), markers.close_id])
    allowed = _allowed(grammar, len(tokenizer))
    assert bool(allowed.all())  # any token, the end of the answer included
    grammar.accept(tokenizer.eos_token_id)


def test_wrapped_grammars_are_cached_by_constraint_and_shape(compiler, markers):
    spec = StructuredOutput("json_schema", json.dumps({"type": "object", "title": "cache"}))
    before = compiler.num_compiled
    compiler.grammar(spec, ThinkingGrammar(markers, False, 64))
    compiler.grammar(spec, ThinkingGrammar(markers, False, 64))
    assert compiler.num_compiled == before + 1
    compiler.grammar(spec, ThinkingGrammar(markers, False, 65))
    compiler.grammar(spec)
    assert compiler.num_compiled == before + 3


def test_a_constraint_that_cannot_be_enforced_is_refused_before_the_thinking(compiler, markers):
    from ragllm.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as refused:
        compiler.grammar(
            StructuredOutput("regex", "(unclosed", "structured_outputs.regex"),
            ThinkingGrammar(markers, False, 64),
        )
    assert refused.value.param == "structured_outputs.regex"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(st.characters(max_codepoint=0xFFFF, blacklist_categories=("Cs",)), max_size=120))
def test_any_thinking_text_passes_then_only_the_constraint(compiler, tokenizer, markers, text):
    """Hypothesis: whatever the model thinks (markers' spelling aside), the thinking is unconstrained
    until </think>, and the answer after it is held to the citation pattern."""
    if "</think>" in text or "<think>" in text:
        return
    grammar = compiler.grammar(CITATIONS, ThinkingGrammar(markers, True, 1000))
    thinking = [*_ids(tokenizer, text), markers.close_id]
    assert grammar.matcher.try_consume_tokens(thinking) == len(thinking), grammar.error()
    assert not _allowed(grammar, len(tokenizer))[_ids(tokenizer, "[")[0]]  # no citation first
    _walk(grammar, tokenizer, _ids(tokenizer, "It was. [ferry]"))


def test_the_prompt_shape_says_where_the_answer_starts(tokenizer, markers):
    def shape(template, **kwargs):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], add_generation_prompt=True, **kwargs
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return prompt_opens_thinking(ids, markers, tokenizer.decode)

    assert shape(None) is False  # Qwen3's hybrid template: the model opens the block
    assert shape(None, enable_thinking=False) is None  # an empty block closed it: no thinking
    assert shape(OPENED_TEMPLATE, chat_template=OPENED_TEMPLATE) is True
    earlier = [markers.open_id, 5, markers.close_id, *_ids(tokenizer, "\nuser: next question")]
    assert prompt_opens_thinking(earlier, markers, tokenizer.decode) is False


@pytest.mark.parametrize(
    ("requested", "default", "max_tokens", "opened", "expected"),
    [
        (None, 1024, 100, False, 50),  # at most half of max_tokens by default
        (None, 16, 100, True, 16),
        (90, 1024, 100, False, 90),  # the client's own budget, within room for the markers
        (99, 1024, 100, False, 97),
        (99, 1024, 100, True, 98),
        (None, 1024, 1, False, 0),
        (0, 1024, 10, False, 0),
    ],
)
def test_the_thinking_budget_leaves_the_answer_room(
    requested, default, max_tokens, opened, expected
):
    assert thinking_tokens(requested, default, max_tokens, opened) == expected


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<think>a [x]</think>\n\nIt is. [bridge]", "It is. [bridge]"),
        ("opened in the prompt [x]</think>It is.", "It is."),
        ("No thinking. [bridge]", "No thinking. [bridge]"),
        ("<think>unfinished [x]", ""),
    ],
)
def test_the_answer_is_told_apart_from_its_thinking(text, answer):
    assert answer_after_thinking(text) == answer


@settings(max_examples=300, deadline=None)
@given(
    requested=st.none() | st.integers(min_value=0, max_value=2**31 - 1),
    default=st.integers(min_value=0, max_value=2**31 - 1),
    max_tokens=st.integers(min_value=1, max_value=2**31 - 1),
    opened=st.booleans(),
)
def test_the_budget_always_leaves_the_markers_and_an_answer_room(
    requested, default, max_tokens, opened
):
    """Hypothesis: whatever the budgets, thinking never takes the tokens the markers and at least
    one answer token need, never more than asked, and by default never more than half."""
    budget = thinking_tokens(requested, default, max_tokens, opened)
    markers = 1 if opened else 2
    assert 0 <= budget <= (requested if requested is not None else default)
    assert budget + markers + 1 <= max_tokens or budget == 0
    if requested is None:
        assert budget <= max_tokens // 2


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    words=st.lists(st.integers(min_value=0, max_value=49151), max_size=40),
    ending=st.sampled_from(["none", "open", "close"]),
)
def test_any_prompt_has_the_shape_of_its_ending(tokenizer, markers, words, ending):
    """Hypothesis: whatever precedes it, a prompt ending in <think> opens the thinking, one ending in
    </think> closed it, and one with no marker leaves the answer to open it."""
    tail = {"none": [], "open": [markers.open_id], "close": [markers.close_id]}[ending]
    expected = {"none": False, "open": True, "close": None}[ending]
    assert prompt_opens_thinking([*words, *tail], markers, tokenizer.decode) is expected
