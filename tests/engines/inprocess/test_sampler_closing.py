"""The sampler's closing hooks on a real grammar over the packaged tokenizer: a row whose budget is
ending is left its way out's token alone, a freely chosen token that would leave no way out is
replaced, rows in their window are sampled on the host, and a closer that fails never takes its
batch down."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from ragllm.engines.inprocess.sample.sampler import Sampler, force_closing, vetted
from ragllm.generation import SamplingParams
from ragllm.structured.closing import Closer, ClosingSearch, ClosingSettings
from ragllm.structured.grammars import GrammarCompiler
from ragllm.structured.spec import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                "required": ["a", "b"],
            },
        }
    },
    "required": ["items"],
}


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))


@pytest.fixture(scope="module")
def search(compiler):
    return ClosingSearch(compiler.tokenizer_index(), compiler.vocab_size)


def _row(compiler, search, tokenizer, prefix: str, remaining: int):
    """What the hooks read of a sequence: its grammar, closer, budget left and parameters."""
    grammar = compiler.grammar(StructuredOutput("json_schema", json.dumps(SCHEMA)))
    closer = Closer(grammar.matcher, search, ClosingSettings())
    for token in tokenizer.encode(prefix, add_special_tokens=False):
        grammar.accept(token)
        closer.accepted(token)
    return SimpleNamespace(
        grammar=grammar,
        closer=closer,
        remaining_tokens=remaining,
        request_id="r",
        params=SamplingParams(temperature=0.0),
        generator=None,
    )


def test_a_row_at_its_budgets_end_is_left_its_way_outs_token(compiler, search, tokenizer):
    row = _row(compiler, search, tokenizer, '{"items": [{"a": "x", "b": "long', 3)
    logits = torch.zeros(1, len(tokenizer))
    masked = force_closing([row], logits, logits.clone(), [None], [False])
    allowed = torch.isfinite(masked[0]).nonzero().flatten().tolist()
    assert allowed == [row.closer.pending[0]] and row.closer.closing
    assert tokenizer.decode(row.closer.pending) == '"}]}'


def test_a_chosen_token_that_leaves_no_way_out_is_replaced(compiler, search, tokenizer):
    row = _row(compiler, search, tokenizer, '{"items": [{"a": "x", "b": "y"}', 8)
    logits = torch.zeros(1, len(tokenizer))
    force_closing([row], logits, logits.clone(), [None], [False])  # looks: "]}" fits 8 tokens
    assert not row.closer.pending
    another = tokenizer.encode(", ", add_special_tokens=False)[0]  # opens one more object
    replaced = vetted([row], [another])[0]
    assert replaced != another and tokenizer.decode([replaced]).startswith("]")
    # A token that keeps a way out within the budget is the model's to keep.
    force_closing([row], logits, logits.clone(), [None], [False])
    closing = tokenizer.encode("]", add_special_tokens=False)[0]
    assert vetted([row], [closing]) == [closing]


def test_rows_in_their_window_are_sampled_on_the_host(compiler, search, tokenizer):
    assert not Sampler.on_device([_row(compiler, search, tokenizer, "{", 40)])
    assert Sampler.on_device([_row(compiler, search, tokenizer, "{", 400)])


class ExplodingCloser:
    """A closer whose look raises, as a bug in the search would."""

    hopeless = False
    pending: list[int] = []

    def forced(self, remaining: int) -> int:
        raise RuntimeError("boom")


def test_a_closer_that_fails_gives_up_on_its_row_alone(compiler, search, tokenizer):
    good = _row(compiler, search, tokenizer, '{"items": [{"a": "x", "b": "long', 3)
    broken = SimpleNamespace(closer=ExplodingCloser(), remaining_tokens=3, request_id="b")
    logits = torch.zeros(2, len(tokenizer))
    masked = force_closing([broken, good], logits, logits.clone(), [None, None], [False, False])
    assert broken.closer.hopeless
    assert torch.isfinite(masked[0]).all()  # left to its grammar's mask
    assert torch.isfinite(masked[1]).sum() == 1
