"""A tiny random Llama served by the real worker, with a tokenizer that writes one letter a token.

It stands in for a served model where text is not what a test is about: sequences are built on it
(greedy, or sampled with a seed, or several choices of one request), a worker steps them by hand,
and transformers' own greedy decoding of the same weights is the reference their tokens must equal.
"""

from __future__ import annotations

import torch

from ragllm.engines.inprocess.detokenizer import IncrementalDetokenizer, StopMatcher
from ragllm.engines.inprocess.runner.cpu import KVCacheOptions, ModelRunner
from ragllm.engines.inprocess.scheduler import SchedulerLimits
from ragllm.engines.inprocess.sequence import Sequence
from ragllm.engines.inprocess.worker import Worker
from ragllm.generation import SamplingParams
from tests.support.tiny_models import tiny_model


class LetterTokenizer:
    """Test double for a tokenizer (text is not what these tests are about): id n → one letter."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + token % 26) for token in ids)


MODEL = tiny_model("llama", seed=3)

PROMPTS = [[1, 2, 3], list(range(10, 60)), [7, 8], list(range(100, 130)), [44] * 5, [9, 19, 29, 39]]
MAX_TOKENS = [12, 5, 20, 8, 15, 3]


def make_worker(
    kv: KVCacheOptions = KVCacheOptions(block_size=16, num_blocks=400), **limits
) -> Worker:
    """A worker over ``MODEL`` on the CPU runner; ``limits`` override the scheduler's defaults."""
    defaults = dict(
        max_num_seqs=4, max_batch_size=4, max_num_batched_tokens=256, chunked_prefill=False
    )
    runner = ModelRunner(MODEL, max_model_len=512, kv=kv)
    return Worker(runner, SchedulerLimits(**{**defaults, **limits}), deliver=lambda results: None)


def greedy_sequence(request_id: str, prompt: list[int], max_tokens: int, stop=()) -> Sequence:
    """A greedy request that stops at token 0 (or at one of ``stop``'s strings)."""
    return Sequence(
        request_id=request_id,
        prompt_ids=prompt,
        params=SamplingParams(temperature=0.0, stop=stop),
        max_tokens=max_tokens,
        stop_token_ids=frozenset({0}),
        detokenizer=IncrementalDetokenizer(LetterTokenizer(), prompt),
        stop_matcher=StopMatcher(stop),
        sink=None,
    )


def seeded_sequence(request_id: str, prompt: list[int], max_tokens: int, seed: int) -> Sequence:
    """A sampled request (temperature 0.9) whose tokens its seed decides."""
    sequence = greedy_sequence(request_id, prompt, max_tokens)
    sequence.params = SamplingParams(temperature=0.9, seed=seed)
    sequence.generator = torch.Generator().manual_seed(seed)
    return sequence


def choices_of(
    request_id: str, prompt: list[int], max_tokens: int, seeds: list[int]
) -> list[Sequence]:
    """One request of several choices: the first leads, the rest follow it."""
    group = [seeded_sequence(request_id, prompt, max_tokens, seed) for seed in seeds]
    for index, follower in enumerate(group[1:], start=1):
        follower.index, follower.leader = index, group[0]
        group[0].followers.append(follower)
    return group


def reference_tokens(prompt: list[int], max_tokens: int, stop_at_zero: bool = True) -> list[int]:
    """transformers' own greedy decoding, stopping at token 0 like the sequences above (or running
    to ``max_tokens``, for sequences without stop tokens)."""
    with torch.no_grad():
        out = MODEL.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=0 if stop_at_zero else None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    return out


def check_against_reference(sequences) -> None:
    for sequence in sequences:
        expected = reference_tokens(sequence.prompt_ids, sequence.max_tokens)
        assert sequence.output_ids == expected, sequence.request_id


def run_to_completion(worker: Worker, arrivals: dict[int, list[Sequence]], max_steps=500) -> int:
    """Submits each step's arrivals and steps the worker until nothing runs or waits; the last step."""
    for step in range(max_steps):
        for sequence in arrivals.pop(step, []):
            worker.submit(sequence)
        worker.run_once()
        if not arrivals and not worker.scheduler.running and not worker.scheduler.waiting:
            return step
    raise AssertionError("worker did not drain")


def results_by_request(worker: Worker, arrivals: dict[int, list[Sequence]]) -> dict[str, list]:
    """As ``run_to_completion``, keeping what each step handed over (deltas and errors) by request."""
    by_request: dict[str, list] = {}
    for step in range(500):
        for sequence in arrivals.pop(step, []):
            worker.submit(sequence)
        for sequence, item in worker.run_once():
            by_request.setdefault(sequence.request_id, []).append(item)
        if not arrivals and not worker.scheduler.running and not worker.scheduler.waiting:
            return by_request
    raise AssertionError("worker did not drain")
