"""A row's masks may add only a share of its batch's step to the requests beside it: an ambiguous
grammar beside mates ends long before the absolute budget would end it, the same grammar alone goes
on, ordinary grammars are never ended, and the watch forgets what left."""

from __future__ import annotations

import time

import pytest
import torch

from ragllm.engines.inprocess.sample.mask_watch import FLOOR_S, WINDOW, MaskWatch
from ragllm.engines.inprocess.sample.masks import TokenMasks
from ragllm.structured.grammars import GrammarCompiler, MaskOverBudget
from ragllm.structured.spec import structured_output_of

# Every parse of a string of 'a's is ambiguous in more ways each step: its masks cost more each step
# (on the packaged tokenizer ~0.1 ms at first, ~2 ms after 80 'a's, ~20 ms after 160).
AMBIGUOUS = 'start: s "."\ns: s s | s s s | "a" | "b" | "ab" | "ba" | "aa"\n'
OTHER_WORK_S = (
    0.02  # what the rest of each step takes here (a CPU decode step of the packaged model)
)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(
        tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}), mask_budget_s=0.5
    )


def _run(masks: TokenMasks, grammars: list, token: int, steps: int) -> tuple[int, list]:
    """Steps of ``OTHER_WORK_S`` each plus the masks; the step at which the first row failed (or
    ``steps``) and that step's failures."""
    vocab = masks.words * 32
    for step in range(steps):
        time.sleep(OTHER_WORK_S)
        _, failures = masks.apply(torch.zeros(len(grammars), vocab), grammars)
        if any(failures):
            return step, failures
        for grammar in grammars:
            grammar.accept(token)
    return steps, [None] * len(grammars)


def test_a_slow_row_beside_mates_ends_at_its_share_long_before_the_budget(compiler, tokenizer):
    a = tokenizer.encode("a", add_special_tokens=False)[0]
    pathological = compiler.grammar(structured_output_of({"guided_grammar": AMBIGUOUS}))
    mates = [
        compiler.grammar(structured_output_of({"guided_regex": "[a-z ]{0,1000}"})) for _ in range(3)
    ]
    masks = TokenMasks(len(tokenizer), torch.device("cpu"), budget_s=1.0, step_share=0.1)
    step, failures = _run(masks, [pathological, *mates], a, 400)
    assert isinstance(failures[0], MaskOverBudget), "the ambiguous grammar was never ended"
    assert "10% of the batch's other work" in str(failures[0])
    assert failures[1:] == [None] * 3 and masks.num_over_budget == 1
    # Its masks had reached a tenth of the 20 ms step (~2 ms, ~60-110 'a's on 2 idle cores; a busy
    # machine stretches the sleeps and so the share), far from the 1 s budget: alone, the same grammar
    # runs all 150 steps of the next test.
    assert step < 200, step


def test_the_same_row_alone_is_held_to_the_budget_only(compiler, tokenizer):
    a = tokenizer.encode("a", add_special_tokens=False)[0]
    alone = compiler.grammar(structured_output_of({"guided_grammar": AMBIGUOUS}))
    masks = TokenMasks(len(tokenizer), torch.device("cpu"), budget_s=1.0, step_share=0.1)
    step, failures = _run(masks, [alone], a, 150)
    assert (step, failures) == (150, [None]), (
        "a row alone slows nobody: only the absolute budget ends it"
    )


def test_ordinary_grammars_are_never_ended_at_the_floor(compiler, tokenizer):
    """A tiny share leaves the 1 ms floor: a JSON schema, a regex and a choice mask well under it."""
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}, "score": {"type": "number"}},
    }
    grammars = [
        compiler.grammar(structured_output_of({"guided_json": schema})),
        compiler.grammar(structured_output_of({"guided_regex": "[a-z ]{0,1000}"})),
        compiler.grammar(structured_output_of({"guided_regex": "(yes|no|maybe) [a-z ]{0,500}"})),
    ]
    masks = TokenMasks(len(tokenizer), torch.device("cpu"), budget_s=1.0, step_share=1e-6)
    vocab = masks.words * 32
    for _ in range(60):
        time.sleep(0.002)
        _, failures = masks.apply(torch.zeros(3, vocab), grammars)
        assert failures == [None] * 3
    assert masks.num_over_budget == 0


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_share_follows_the_other_work_and_ignores_idle_gaps():
    clock = _Clock()
    watch = MaskWatch(budget_s=0.02, step_share=0.1, clock=clock)
    assert watch.allowance_s(alone=False) == 0.02  # nothing measured yet: the budget alone
    for other_work in (0.03, 0.05):
        watch.step_started()
        watch.step_filled()
        clock.now += other_work
    watch.step_started()
    assert watch.allowance_s(alone=False) == pytest.approx(0.1 * 0.04)  # a tenth of the mean step
    assert watch.allowance_s(alone=True) == 0.02  # nobody beside it to slow
    watch.step_filled()
    clock.now += 5.0  # a pause between requests
    watch.step_started()
    assert watch.allowance_s(alone=False) == pytest.approx(
        0.004
    )  # an idle gap is not a step's work
    clock.now += 0.0001
    watch.step_filled()
    clock.now += 0.001
    for _ in range(WINDOW):
        watch.step_started()
        watch.step_filled()
        clock.now += 0.001
    assert watch.allowance_s(alone=False) == FLOOR_S  # fast steps: the floor


def test_a_suspect_within_its_allowance_is_trusted_again_and_one_that_left_is_forgotten():
    watch = MaskWatch(budget_s=None, step_share=0.1)
    watch.step_started()
    watch.batch_filled(
        [1, 2], elapsed_s=1.0, alone=False
    )  # no step measured: no bound, no suspects
    assert not watch.is_suspect(1)
    watch = MaskWatch(budget_s=0.01, step_share=None, threads=1)
    watch.step_started()
    watch.batch_filled([1, 2], elapsed_s=0.03, alone=False)
    assert watch.is_suspect(1) and watch.is_suspect(2)
    for _ in range(WINDOW):
        watch.step_started()
        assert watch.suspect_filled(1, FLOOR_S, alone=False) is None
    assert not watch.is_suspect(1)  # a window within its allowance
    assert watch.is_suspect(2)  # not filled since: still watched for a window of steps...
    watch.step_started()
    assert not watch.is_suspect(2)  # ...then forgotten as gone
    watch.batch_filled([3], elapsed_s=0.02, alone=False)
    reason = watch.suspect_filled(3, 0.011, alone=False)
    assert reason is not None and "over the 10 ms" in reason


def test_a_batch_within_one_rows_allowance_times_no_row_alone_and_one_past_it_times_one_in_turn():
    watch = MaskWatch(budget_s=0.01, step_share=None, threads=4)
    keys = list(range(8))
    watch.step_started()
    watch.batch_filled(keys, elapsed_s=0.005, alone=False)
    watch.step_started()
    assert (
        watch.sampled(keys, alone=False) is None
    )  # every row was within its allowance: no hand-off
    watch.batch_filled(
        keys, elapsed_s=0.015, alone=False
    )  # past one row's, within 8 rows on 4 threads
    assert not any(watch.is_suspect(key) for key in keys)
    picked = set()
    for _ in range(len(keys)):
        watch.step_started()
        key = watch.sampled(keys, alone=False)
        picked.add(key)
        assert watch.sample_filled(key, 0.001, alone=False) is None and not watch.is_suspect(key)
        watch.batch_filled(keys, elapsed_s=0.015, alone=False)
    assert picked == set(keys)  # each in turn
    watch.step_started()
    assert watch.sampled(keys, alone=True) is None  # alone, it slows nobody
