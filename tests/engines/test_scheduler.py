"""The continuous-batching scheduler, stepped by hand on a tiny random model."""

from __future__ import annotations

import torch

from ragllm.engines.base import FinishReason, SamplingParams
from ragllm.engines.model_runner import ModelRunner
from ragllm.engines.scheduler import Scheduler, SchedulerLimits
from ragllm.engines.sequence import Sequence
from ragllm.engines.text import IncrementalDetokenizer, StopMatcher
from tests.tiny_models import tiny_model


class LetterTokenizer:
    """Test double for a tokenizer (text is not what these tests are about): id n → one letter."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + token % 26) for token in ids)


MODEL = tiny_model("llama", seed=3)


def _scheduler(**limits) -> Scheduler:
    defaults = dict(max_num_seqs=4, max_batch_size=4, max_num_batched_tokens=256, chunked_prefill=False)
    runner = ModelRunner(MODEL, num_slots=defaults["max_num_seqs"] if "max_num_seqs" not in limits
                         else limits["max_num_seqs"], max_model_len=512)
    return Scheduler(runner, SchedulerLimits(**{**defaults, **limits}), deliver=lambda results: None)


def _sequence(request_id: str, prompt: list[int], max_tokens: int, stop=()) -> Sequence:
    return Sequence(request_id=request_id, prompt_ids=prompt, params=SamplingParams(temperature=0.0, stop=stop),
                    max_tokens=max_tokens, stop_token_ids=frozenset({0}),
                    detokenizer=IncrementalDetokenizer(LetterTokenizer(), prompt),
                    stop_matcher=StopMatcher(stop), sink=None)


def _reference(prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' own greedy decoding, stopping at token 0 like the sequences above."""
    with torch.no_grad():
        out = MODEL.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=0, pad_token_id=0)[0, len(prompt):].tolist()
    return out


def _run_to_completion(scheduler: Scheduler, arrivals: dict[int, list[Sequence]], max_steps=500) -> int:
    for step in range(max_steps):
        for sequence in arrivals.pop(step, []):
            scheduler.submit(sequence)
        scheduler.run_once()
        if not arrivals and not scheduler.running and not scheduler.waiting:
            return step
    raise AssertionError("scheduler did not drain")


PROMPTS = [[1, 2, 3], list(range(10, 60)), [7, 8], list(range(100, 130)), [44] * 5, [9, 19, 29, 39]]
MAX_TOKENS = [12, 5, 20, 8, 15, 3]


def _check_against_reference(sequences):
    for sequence in sequences:
        expected = _reference(sequence.prompt_ids, sequence.max_tokens)
        assert sequence.output_ids == expected, sequence.request_id


def test_sequences_joining_and_leaving_mid_batch_match_solo_greedy():
    scheduler = _scheduler(max_num_seqs=4, max_batch_size=4)
    sequences = [_sequence(f"r{i}", p, m) for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS))]
    # Arrivals spread over steps; with 4 slots, the last ones wait for earlier ones to leave.
    arrivals = {0: sequences[:2], 2: sequences[2:4], 3: sequences[4:5], 6: sequences[5:]}
    _run_to_completion(scheduler, arrivals)
    _check_against_reference(sequences)
    assert scheduler.num_running == 0


def test_micro_batches_and_chunked_prefill_give_the_same_tokens():
    scheduler = _scheduler(max_num_seqs=6, max_batch_size=2, max_num_batched_tokens=16, chunked_prefill=True)
    sequences = [_sequence(f"r{i}", p, m) for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS))]
    _run_to_completion(scheduler, {0: sequences})
    _check_against_reference(sequences)


def test_whole_prompt_prefill_respects_the_step_budget_but_never_starves():
    scheduler = _scheduler(max_num_batched_tokens=32)
    long_prompt = _sequence("long", list(range(1, 101)), 3)  # longer than a whole step's budget
    scheduler.submit(long_prompt)
    scheduler.run_once()
    assert long_prompt.prefill_done and len(long_prompt.output_ids) == 1


def test_abort_frees_the_slot_at_the_next_step():
    scheduler = _scheduler()
    keep, drop = _sequence("keep", [1, 2, 3], 10), _sequence("drop", [4, 5, 6], 400)
    scheduler.submit(drop)
    scheduler.submit(keep)
    scheduler.run_once()
    scheduler.run_once()
    assert scheduler.num_running == 2
    scheduler.abort("drop")
    scheduler.run_once()
    assert [s.request_id for s in scheduler.running] == ["keep"]
    _run_to_completion(scheduler, {})
    assert keep.output_ids == _reference(keep.prompt_ids, 10)


def test_abort_of_a_waiting_request_removes_it():
    scheduler = _scheduler(max_num_seqs=1)
    first, second = _sequence("a", [1, 2], 50), _sequence("b", [3, 4], 50)
    scheduler.submit(first)
    scheduler.submit(second)
    scheduler.run_once()
    assert scheduler.num_waiting == 1
    scheduler.abort("b")
    scheduler.run_once()
    assert scheduler.num_waiting == 0


def test_finish_reasons_and_stop_strings():
    scheduler = _scheduler()
    reference = _reference([1, 2, 3], 12)
    text = LetterTokenizer().decode(reference)
    stop = text[4:6]
    by_length = _sequence("len", [1, 2, 3], 12)
    by_stop = _sequence("stop", [1, 2, 3], 12, stop=(stop,))
    results = []
    scheduler.submit(by_length)
    scheduler.submit(by_stop)
    for _ in range(20):
        results.extend(scheduler.run_once())
    finals = {s.request_id: d for s, d in results if d.finish_reason is not None}
    assert finals["len"].finish_reason is FinishReason.LENGTH and finals["len"].completion_tokens == 12
    assert finals["stop"].finish_reason is FinishReason.STOP
    stop_text = "".join(d.text for s, d in results if s.request_id == "stop")
    assert stop_text == text[: text.index(stop)]
    length_text = "".join(d.text for s, d in results if s.request_id == "len")
    assert length_text == text


def test_slots_are_compacted_after_the_cache_has_grown():
    """Growth happens inside a forward pass; moving a slot afterwards must still work."""
    scheduler = _scheduler(max_num_seqs=3, max_batch_size=3, max_num_batched_tokens=512)
    sequences = [_sequence("short", [1, 2, 3], 2), _sequence("long", [i % 200 + 1 for i in range(300)], 6),
                 _sequence("mid", [5, 6], 10)]
    _run_to_completion(scheduler, {0: sequences})  # "short" leaves first: "mid" moves into its slot
    _check_against_reference(sequences)
