"""Grammars and token masks over the packaged model's real tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ragllm.engines.inprocess.sample.masks import TokenMasks
from ragllm.errors import ConstraintUnfollowable, InvalidRequest
from ragllm.structured.grammars import Grammar, GrammarCompiler, GrammarViolation
from ragllm.structured.spec import StructuredOutput, structured_output_of


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))


def _walk(grammar, tokenizer, text: str) -> None:
    """Feed ``text``'s tokens, checking each was allowed by the mask first."""
    masks = TokenMasks(len(tokenizer), torch.device("cpu"))
    for token in tokenizer.encode(text, add_special_tokens=False):
        masked, failures = masks.apply(torch.zeros(1, len(tokenizer)), [grammar])
        assert failures == [None]
        assert masked[0, token] == 0, f"token {token} ({tokenizer.decode([token])!r}) was masked"
        grammar.accept(token)


def test_a_valid_answer_passes_every_mask_and_completes_the_grammar(compiler, tokenizer):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["city", "n"],
    }
    grammar = compiler.grammar(StructuredOutput("json_schema", json.dumps(schema)))
    _walk(grammar, tokenizer, '{"city": "Paris", "n": 3}')
    assert grammar.finished


def test_a_token_outside_the_grammar_is_refused_and_masked(compiler, tokenizer):
    grammar = compiler.grammar(structured_output_of({"guided_choice": ["yes", "no"]}))
    masks = TokenMasks(len(tokenizer), torch.device("cpu"))
    masked, _ = masks.apply(torch.zeros(1, len(tokenizer)), [grammar])
    maybe = tokenizer.encode("maybe", add_special_tokens=False)[0]
    assert masked[0, maybe] == float("-inf")
    assert masked[0, tokenizer.encode("yes", add_special_tokens=False)[0]] == 0
    with pytest.raises(GrammarViolation):
        grammar.accept(maybe)


@pytest.mark.parametrize(
    "whole_batch", [False, True], ids=["constrained-rows", "whole-batch (as on a GPU)"]
)
def test_masks_leave_unconstrained_rows_and_the_callers_logits_alone(
    compiler, tokenizer, whole_batch
):
    grammar = compiler.grammar(StructuredOutput("regex", "[0-9]{3}"))
    logits = torch.randn(3, len(tokenizer))
    original = logits.clone()
    masks = TokenMasks(len(tokenizer), torch.device("cpu"), whole_batch=whole_batch)
    masked, failures = masks.apply(logits, [None, grammar, None])
    assert failures == [None, None, None]
    assert torch.equal(logits, original)
    assert torch.equal(masked[0], original[0]) and torch.equal(masked[2], original[2])
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]).isdigit() for t in allowed)


def test_grammars_are_compiled_once_per_constraint(compiler):
    before = compiler.num_compiled
    first = compiler.grammar(StructuredOutput("regex", "(ab)+c"))
    second = compiler.grammar(StructuredOutput("regex", "(ab)+c", param="guided_regex"))
    assert compiler.num_compiled == before + 1
    assert first.matcher is not second.matcher  # each request gets its own position


@pytest.mark.parametrize(
    "spec, words",
    [
        (
            StructuredOutput(
                "json_schema",
                json.dumps({"type": "string", "format": "no-such-format"}),
                "response_format.json_schema.schema",
            ),
            "no-such-format",
        ),
        (StructuredOutput("regex", "(unclosed", "guided_regex"), "regular expression"),
        (
            StructuredOutput("grammar", "start: undefined_rule", "structured_outputs.grammar"),
            "grammar",
        ),
    ],
)
def test_what_cannot_be_enforced_is_a_400_naming_the_field(compiler, spec, words):
    with pytest.raises(InvalidRequest) as caught:
        compiler.grammar(spec)
    assert caught.value.param == spec.param
    assert words in caught.value.message


@pytest.mark.parametrize(
    "spec",
    [
        StructuredOutput("regex", "2\U0006815c", "guided_regex"),
        StructuredOutput(
            "choice", json.dumps(["a", "\U0006815c"], ensure_ascii=False), "guided_choice"
        ),
        StructuredOutput(
            "json_schema",
            json.dumps({"const": "\U0006815c"}, ensure_ascii=False),
            "response_format",
        ),
    ],
)
def test_a_character_no_token_can_write_is_refused_before_decoding(compiler, spec):
    """The packaged vocabulary has no token holding byte 0xF1 (the lead byte of U+40000-U+BFFFF):
    a constraint demanding such a character would dead-end mid-answer."""
    with pytest.raises(InvalidRequest) as caught:
        compiler.grammar(spec)
    assert caught.value.param == spec.param and "U+6815C" in caught.value.message


def test_a_dead_end_is_told_as_the_constraints_fault_in_one_line(compiler, tokenizer):
    grammar = compiler.grammar(StructuredOutput("regex", "a+", "structured_outputs.regex"))
    refused = grammar.matcher.consume_token(tokenizer.encode("zzz", add_special_tokens=False)[0])
    assert not refused and grammar.error()
    error = grammar.unfollowable(GrammarViolation(f"structured output: {grammar.error()}"))
    assert isinstance(error, ConstraintUnfollowable) and error.status_code == 400
    assert error.param == "structured_outputs.regex" and "\n" not in error.message


def test_gbnf_grammars_as_llama_cpp_writes_them_work(compiler, tokenizer):
    grammar = compiler.grammar(StructuredOutput("grammar", 'root ::= "answer: " ("yes" | "no")'))
    _walk(grammar, tokenizer, "answer: no")
    assert grammar.finished


@pytest.mark.parametrize(
    "whole_batch", [False, True], ids=["constrained-rows", "whole-batch (as on a GPU)"]
)
def test_a_failed_grammar_fails_only_its_row(compiler, tokenizer, whole_batch):
    broken = compiler.grammar(StructuredOutput("regex", "a+"))
    broken.matcher.consume_token(
        tokenizer.encode("zzz", add_special_tokens=False)[0]
    )  # now in error
    healthy = compiler.grammar(StructuredOutput("regex", "b+"))
    masked, failures = TokenMasks(
        len(tokenizer), torch.device("cpu"), whole_batch=whole_batch
    ).apply(torch.zeros(3, len(tokenizer)), [broken, None, healthy])
    assert isinstance(failures[0], GrammarViolation) and failures[1] is None and failures[2] is None
    assert torch.isfinite(masked[2]).any() and not torch.isfinite(masked[2]).all()
    assert torch.isfinite(masked[1]).all()


class FailingMatcher:
    """A matcher whose mask computation raises, as a misused one does (not an llguidance matcher,
    so the batch call refuses it too)."""

    def unsafe_compute_mask_ptr(self, pointer: int, size: int) -> None:
        raise RuntimeError("mask computation failed")

    def is_error(self) -> bool:
        return False


@pytest.mark.parametrize(
    "whole_batch", [False, True], ids=["constrained-rows", "whole-batch (as on a GPU)"]
)
def test_a_row_whose_mask_cannot_be_computed_fails_alone(compiler, tokenizer, whole_batch):
    healthy = compiler.grammar(StructuredOutput("regex", "b+"))
    failing = Grammar(FailingMatcher(), StructuredOutput("regex", "c+"))
    masked, failures = TokenMasks(
        len(tokenizer), torch.device("cpu"), whole_batch=whole_batch
    ).apply(torch.zeros(3, len(tokenizer)), [failing, healthy, None])
    assert isinstance(failures[0], RuntimeError) and failures[1] is None and failures[2] is None
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert allowed and all(
        set(tokenizer.decode([token])) <= {"b"}
        for token in allowed
        if token not in (tokenizer.eos_token_id,)
    )
    assert torch.isfinite(masked[2]).all()


FIRST_FILL = """
import sys, torch
from transformers import AutoTokenizer
from ragllm.config import load_settings
from ragllm.models import resolve_model
from ragllm.structured.grammars import GrammarCompiler
from ragllm.engines.inprocess.sample.masks import TokenMasks
from ragllm.structured.spec import StructuredOutput
engine = load_settings().engine
tokenizer = AutoTokenizer.from_pretrained(resolve_model(engine.model, engine.model_cache_dir))
grammar = GrammarCompiler(tokenizer, len(tokenizer), frozenset()).grammar(StructuredOutput("regex", "a+"))
masked, failures = TokenMasks(len(tokenizer), torch.device("cpu")).apply(torch.zeros(1, len(tokenizer)), [grammar])
assert failures == [None] and not torch.isfinite(masked).all()
print("llguidance.torch" in sys.modules)
"""


def test_the_first_mask_does_not_load_llguidances_torch_module():
    """Importing ``llguidance.torch`` runs torch.compile (1-2.5 s, measured), which the engine
    thread would pay at the first constrained step with every request waiting."""
    result = subprocess.run(
        [sys.executable, "-c", FIRST_FILL], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
