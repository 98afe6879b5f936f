"""The scheduler's policy on plain data, without a model: admission, the prefill cap while answers
decode, chunked prefill, preemption, queue timeouts, choices and their release. Each test plans a
step with ``schedule()``, plays the worker's part by hand (a token appended per decoding sequence)
and moves on with ``update()``."""

from __future__ import annotations

import time

import pytest

from ragllm.engines.inprocess.detokenizer import IncrementalDetokenizer, StopMatcher
from ragllm.engines.inprocess.kv.block_tables import BlockTables
from ragllm.engines.inprocess.kv.blocks import BlockPool
from ragllm.engines.inprocess.scheduler import Scheduler, SchedulerLimits, StepPlan
from ragllm.engines.inprocess.sequence import Sequence, SequenceStatus
from ragllm.errors import ContextLengthExceeded, EngineOverloaded
from ragllm.generation import SamplingParams

BLOCK = 4


class LetterTokenizer:
    """Test double for a tokenizer (text is not what these tests are about): id n -> one letter."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + token % 26) for token in ids)


def _scheduler(num_blocks: int = 64, copied: list | None = None, **limits) -> Scheduler:
    settings = dict(
        max_num_seqs=4, max_batch_size=4, max_num_batched_tokens=32, chunked_prefill=False
    )
    blocks = BlockTables(BlockPool(num_blocks, BLOCK, prefix_caching=True), b"policy-test")
    copy = (
        (lambda src, dst: copied.append((src, dst)))
        if copied is not None
        else (lambda src, dst: None)
    )
    return Scheduler(SchedulerLimits(**{**settings, **limits}), blocks, copy)


def _sequence(request_id: str, num_prompt: int, max_tokens: int = 50, first: int = 1) -> Sequence:
    prompt = list(range(first, first + num_prompt))
    return Sequence(
        request_id=request_id,
        prompt_ids=prompt,
        params=SamplingParams(temperature=0.0),
        max_tokens=max_tokens,
        stop_token_ids=frozenset({0}),
        detokenizer=IncrementalDetokenizer(LetterTokenizer(), prompt),
        stop_matcher=StopMatcher(()),
        sink=None,
    )


def _step(scheduler: Scheduler) -> StepPlan:
    """One step as the worker runs it: every decoding sequence gets a token, prefills move on, and
    prompts that complete draw their first token."""
    plan = scheduler.schedule()
    for sequence in plan.decode:
        sequence.append_token(7)
    for group in scheduler.update(plan):
        for sequence in group:
            sequence.append_token(7)
    scheduler.finish_step()
    return plan


def test_requests_are_admitted_first_come_first_served_up_to_max_num_seqs():
    scheduler = _scheduler(max_num_seqs=2)
    for name in "abc":
        scheduler.add(_sequence(name, 5))
    plan = _step(scheduler)
    assert [c.sequence.request_id for c in plan.prefill] == ["a", "b"]
    assert [s.request_id for s in scheduler.running] == ["a", "b"]
    assert [s.request_id for s in scheduler.waiting] == ["c"]
    assert all(s.status is SequenceStatus.DECODING for s in scheduler.running)


def test_a_step_decodes_every_decoding_sequence_and_prefills_within_the_cap():
    """While answers decode, a long prompt gets at most the cap a step (half the step's budget)."""
    scheduler = _scheduler(max_num_batched_tokens=32)
    scheduler.add(_sequence("short", 3))
    _step(scheduler)
    scheduler.add(_sequence("long", 60, first=100))
    chunks = []
    for _ in range(10):
        plan = _step(scheduler)
        assert [s.request_id for s in plan.decode][:1] == ["short"]
        chunks += [c.num_tokens for c in plan.prefill]
        if scheduler.running[-1].status is SequenceStatus.DECODING:
            break
    assert chunks == [16, 16, 16, 12]  # the cap, then what was left
    assert sum(chunks) == 60 and scheduler.running[-1].num_computed == 60


def test_with_nothing_decoding_a_whole_prompt_is_prefilled_at_once_in_whole_prompt_mode():
    scheduler = _scheduler(max_num_batched_tokens=32, chunked_prefill=False)
    scheduler.add(_sequence("long", 60))
    plan = _step(scheduler)
    assert [c.num_tokens for c in plan.prefill] == [60] and plan.prefill[0].completes


def test_chunked_mode_splits_a_prompt_by_the_step_budget_even_alone():
    scheduler = _scheduler(max_num_batched_tokens=32, chunked_prefill=True)
    scheduler.add(_sequence("long", 60))
    assert [c.num_tokens for c in _step(scheduler).prefill] == [32]
    assert [c.num_tokens for c in _step(scheduler).prefill] == [28]


def test_the_prompt_count_is_taken_once_a_request_however_many_chunks():
    scheduler = _scheduler(max_num_batched_tokens=32, chunked_prefill=True)
    scheduler.add(_sequence("long", 60))
    counts = [_step(scheduler).num_prompt_tokens_started for _ in range(3)]
    assert counts == [60, 0, 0]


def test_when_blocks_run_out_the_newest_is_preempted_to_the_head_of_the_queue():
    scheduler = _scheduler(num_blocks=9)  # one reserved: 8 usable blocks of 4 tokens
    old, new = _sequence("old", 12), _sequence("new", 12, first=50)
    scheduler.add(old)
    _step(scheduler)
    scheduler.add(new)
    _step(scheduler)
    assert [s.request_id for s in scheduler.running] == ["old", "new"]
    preempted = []
    for _ in range(8):
        plan = _step(scheduler)
        preempted += plan.preempted
        if preempted:
            break
    assert preempted == [new] and new.status is SequenceStatus.WAITING and new.block_table == []
    assert list(scheduler.waiting) == [new] and [s.request_id for s in scheduler.running] == ["old"]
    assert plan.decode == [old]  # the oldest goes on


def test_a_request_larger_than_the_pool_is_refused_and_the_queue_moves_on():
    scheduler = _scheduler(num_blocks=5)
    scheduler.add(_sequence("huge", 40))
    scheduler.add(_sequence("small", 3))
    plan = _step(scheduler)
    assert [(s.request_id, type(e)) for s, e in plan.refused] == [("huge", ContextLengthExceeded)]
    assert [s.request_id for s in scheduler.running] == ["small"]


def test_a_request_that_waited_past_the_bound_is_refused_but_a_preempted_one_is_not():
    scheduler = _scheduler(max_num_seqs=1, max_queue_wait_s=0.05)
    first, late = _sequence("first", 3), _sequence("late", 3)
    scheduler.add(first)
    _step(scheduler)
    scheduler.add(late)
    late.arrival_time = time.monotonic() - 1.0
    plan = _step(scheduler)
    assert [(s.request_id, type(e)) for s, e in plan.refused] == [("late", EngineOverloaded)]
    assert not scheduler.waiting and scheduler.running == [first]
    first.arrival_time = (
        time.monotonic() - 1.0
    )  # it started: waiting again after a preemption is no refusal
    assert _step(scheduler).refused == []


def test_choices_prefill_once_then_fork_off_the_leader_and_abort_together():
    copied: list[tuple[int, int]] = []
    scheduler = _scheduler(copied=copied)
    leader = _sequence("r", 6)
    followers = [_sequence("r", 6) for _ in range(2)]
    for index, follower in enumerate(followers, start=1):
        follower.index, follower.leader = index, leader
    leader.followers = list(followers)
    scheduler.add(leader)
    plan = _step(scheduler)
    assert [c.sequence for c in plan.prefill] == [leader]  # the prompt once
    assert all(
        s.status is SequenceStatus.DECODING and s.output_ids == [7] for s in (leader, *followers)
    )
    assert len(copied) == 2  # each copied the leader's partial last block (6 tokens in blocks of 4)
    assert len(_step(scheduler).decode) == 3
    scheduler.abort("r")
    assert (
        not scheduler.running and scheduler.blocks.pool.num_free == scheduler.blocks.pool.num_usable
    )


def test_finished_sequences_leave_at_the_end_of_the_step_and_their_blocks_return():
    scheduler = _scheduler()
    sequence = _sequence("a", 5, max_tokens=3)
    scheduler.add(sequence)
    while scheduler.running or scheduler.waiting:
        _step(scheduler)
    assert sequence.status is SequenceStatus.FINISHED and sequence.output_ids == [7, 7, 7]
    assert scheduler.blocks.pool.num_free == scheduler.blocks.pool.num_usable


def test_failing_everything_empties_both_queues():
    scheduler = _scheduler(max_num_seqs=1)
    scheduler.add(_sequence("running", 3))
    _step(scheduler)
    scheduler.add(_sequence("waiting", 3))
    failure = RuntimeError("device lost")
    failed = scheduler.fail_all(failure)
    assert [(s.request_id, e) for s, e in failed] == [("running", failure), ("waiting", failure)]
    assert not scheduler.running and not scheduler.waiting


@pytest.mark.parametrize("max_batched", [8, 16, 64])
def test_a_running_answer_waits_at_most_one_capped_chunk_between_tokens(max_batched):
    scheduler = _scheduler(max_num_batched_tokens=max_batched, num_blocks=128)
    scheduler.add(_sequence("answer", 3))
    _step(scheduler)
    scheduler.add(_sequence("long", 200, first=300))
    for _ in range(40):
        plan = _step(scheduler)
        assert plan.decode and plan.decode[0].request_id == "answer"  # a token every step
        assert sum(c.num_tokens for c in plan.prefill) <= max(16, max_batched // 2)
