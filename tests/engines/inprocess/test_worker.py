"""The continuous-batching worker, stepped by hand on a tiny random model."""

from __future__ import annotations

import time

import torch

from ragllm.engines.inprocess import worker as worker_module
from ragllm.engines.inprocess.detokenizer import IncrementalDetokenizer
from ragllm.engines.inprocess.runner.cpu import KVCacheOptions, ModelRunner
from ragllm.engines.inprocess.sample import choice as sampling_module
from ragllm.engines.inprocess.sample import sampler as sampler_module
from ragllm.engines.inprocess.scheduler import SchedulerLimits
from ragllm.engines.inprocess.sequence import Sequence
from ragllm.engines.inprocess.worker import Worker
from ragllm.errors import EngineFailure, EngineNotReady, EngineOverloaded
from ragllm.generation import Delta, FinishReason, SamplingParams
from tests.support.letter_model import (
    MAX_TOKENS,
    MODEL,
    PROMPTS,
    LetterTokenizer,
    check_against_reference,
    choices_of,
    greedy_sequence,
    make_worker,
    reference_tokens,
    results_by_request,
    run_to_completion,
    seeded_sequence,
)


def test_sequences_joining_and_leaving_mid_batch_match_solo_greedy():
    worker = make_worker(max_num_seqs=4, max_batch_size=4)
    sequences = [
        greedy_sequence(f"r{i}", p, m) for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS))
    ]
    # Arrivals spread over steps; with 4 slots, the last ones wait for earlier ones to leave.
    arrivals = {0: sequences[:2], 2: sequences[2:4], 3: sequences[4:5], 6: sequences[5:]}
    run_to_completion(worker, arrivals)
    check_against_reference(sequences)
    assert worker.scheduler.num_running == 0


def test_micro_batches_and_chunked_prefill_give_the_same_tokens():
    worker = make_worker(
        max_num_seqs=6, max_batch_size=2, max_num_batched_tokens=16, chunked_prefill=True
    )
    sequences = [
        greedy_sequence(f"r{i}", p, m) for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS))
    ]
    run_to_completion(worker, {0: sequences})
    check_against_reference(sequences)


def test_whole_prompt_prefill_respects_the_step_budget_but_never_starves():
    worker = make_worker(max_num_batched_tokens=32)
    long_prompt = greedy_sequence(
        "long", list(range(1, 101)), 3
    )  # longer than a whole step's budget
    worker.submit(long_prompt)
    worker.run_once()
    assert long_prompt.prefill_done and len(long_prompt.output_ids) == 1


def test_abort_frees_the_slot_at_the_next_step():
    worker = make_worker()
    keep, drop = greedy_sequence("keep", [1, 2, 3], 10), greedy_sequence("drop", [4, 5, 6], 400)
    worker.submit(drop)
    worker.submit(keep)
    worker.run_once()
    worker.run_once()
    assert worker.scheduler.num_running == 2
    worker.abort("drop")
    worker.run_once()
    assert [s.request_id for s in worker.scheduler.running] == ["keep"]
    run_to_completion(worker, {})
    assert keep.output_ids == reference_tokens(keep.prompt_ids, 10)


def test_abort_of_a_waiting_request_removes_it():
    worker = make_worker(max_num_seqs=1)
    first, second = greedy_sequence("a", [1, 2], 50), greedy_sequence("b", [3, 4], 50)
    worker.submit(first)
    worker.submit(second)
    worker.run_once()
    assert worker.scheduler.num_waiting == 1
    worker.abort("b")
    worker.run_once()
    assert worker.scheduler.num_waiting == 0


def test_an_abort_is_acknowledged_once_the_request_is_out_and_nothing_more_is_sampled_for_it():
    worker = make_worker()
    keep, drop = greedy_sequence("keep", [1, 2, 3], 10), greedy_sequence("drop", [4, 5, 6], 400)
    worker.submit(drop)
    worker.submit(keep)
    worker.run_once()
    worker.run_once()
    acknowledged: list[int] = []
    worker.abort("drop", lambda: acknowledged.append(len(drop.output_ids)))
    assert acknowledged == []  # not before the engine has taken it in
    worker.run_once()
    assert acknowledged == [len(drop.output_ids)] and acknowledged[0] >= 1
    run_to_completion(worker, {})
    assert len(drop.output_ids) == acknowledged[0]


def test_the_engine_counts_prompts_once_and_every_sampled_token_but_not_its_canary():
    worker = make_worker(max_num_seqs=2)
    sequences = [
        greedy_sequence(f"r{i}", p, m) for i, (p, m) in enumerate(zip(PROMPTS[:4], MAX_TOKENS[:4]))
    ]
    canary = greedy_sequence("canary", [5], 1)
    canary.for_client = False
    run_to_completion(worker, {0: sequences[:3], 1: [canary, sequences[3]]})
    assert worker.num_prompt_tokens_started == sum(len(s.prompt_ids) for s in sequences)
    assert worker.num_tokens_sampled == sum(len(s.output_ids) for s in sequences)


def test_a_failing_acknowledgement_does_not_stop_the_engine():
    worker = make_worker()
    worker.submit(greedy_sequence("a", [1, 2], 50))
    worker.run_once()
    worker.abort("a", lambda: 1 / 0)
    worker.run_once()
    assert worker.fatal is None and worker.scheduler.num_running == 0


def test_aborts_behind_the_shutdown_are_acknowledged_when_the_thread_ends():
    worker = make_worker()
    acknowledged: list[str] = []
    worker._inbox.put(worker_module.SHUTDOWN)  # queued first: the thread stops before the abort
    worker.abort("late", lambda: acknowledged.append("late"))
    worker.start()
    worker._thread.join(timeout=10)
    assert not worker.is_alive() and acknowledged == ["late"]


def test_finish_reasons_and_stop_strings():
    worker = make_worker()
    reference = reference_tokens([1, 2, 3], 12)
    text = LetterTokenizer().decode(reference)
    stop = text[4:6]
    by_length = greedy_sequence("len", [1, 2, 3], 12)
    by_stop = greedy_sequence("stop", [1, 2, 3], 12, stop=(stop,))
    results = []
    worker.submit(by_length)
    worker.submit(by_stop)
    for _ in range(20):
        results.extend(worker.run_once())
    finals = {s.request_id: d for s, d in results if d.finish_reason is not None}
    assert (
        finals["len"].finish_reason is FinishReason.LENGTH and finals["len"].completion_tokens == 12
    )
    assert finals["stop"].finish_reason is FinishReason.STOP
    stop_text = "".join(d.text for s, d in results if s.request_id == "stop")
    assert stop_text == text[: text.index(stop)]
    length_text = "".join(d.text for s, d in results if s.request_id == "len")
    assert length_text == text


def test_blocks_freed_by_a_finished_sequence_serve_the_next_and_all_return():
    worker = make_worker(
        KVCacheOptions(block_size=16, num_blocks=34, prefix_caching=False),
        max_num_seqs=3,
        max_batch_size=3,
        max_num_batched_tokens=512,
    )
    free_at_start = worker.scheduler.blocks.pool.num_free
    sequences = [
        greedy_sequence("short", [1, 2, 3], 2),
        greedy_sequence("long", [i % 200 + 1 for i in range(300)], 6),
        greedy_sequence("mid", [5, 6], 10),
        greedy_sequence("late", [i % 150 + 2 for i in range(200)], 5),
    ]
    run_to_completion(worker, {0: sequences[:3], 1: sequences[3:]})  # "late" needs "long"'s blocks
    check_against_reference(sequences)
    assert worker.scheduler.blocks.pool.num_free == free_at_start


# -- faults ---------------------------------------------------------------------------------------
class FailingDetokenizer(IncrementalDetokenizer):
    """Test double of a detokenizer that breaks on its fourth token (a fault of one sequence)."""

    def push(self, token_id: int) -> str:
        if len(self._ids) >= 4 + 3:  # three prompt tokens of context, then four pushes
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return super().push(token_id)


def test_a_faulty_row_fails_alone_and_seeded_rows_keep_their_exact_tokens(monkeypatch):
    def solo(seed: int) -> list[int]:
        sequence = seeded_sequence(f"solo{seed}", [5, 6, 7], 10, seed)
        run_to_completion(make_worker(), {0: [sequence]})
        return sequence.output_ids

    expected = {seed: solo(seed) for seed in (11, 12, 13)}
    real_sampler = sampler_module.sample_next_tokens
    calls_with_the_faulty_row = 0

    def sampler_failing_on_row_with_seed_13(logits, params, histories, generators):
        """Fails from the faulty row's second token on, in a batch or alone, after drawing from every
        row's generator first (as a failure part-way through a batch would)."""
        nonlocal calls_with_the_faulty_row
        if any(p.seed == 13 for p in params):
            calls_with_the_faulty_row += 1
            if calls_with_the_faulty_row > 1:
                for row, generator in enumerate(generators):
                    torch.multinomial(
                        torch.softmax(logits[row].float(), -1), 1, generator=generator
                    )
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_sampler(logits, params, histories, generators)

    monkeypatch.setattr(sampler_module, "sample_next_tokens", sampler_failing_on_row_with_seed_13)
    monkeypatch.setattr(sampling_module, "sample_next_tokens", sampler_failing_on_row_with_seed_13)
    sequences = [seeded_sequence(f"s{seed}", [5, 6, 7], 10, seed) for seed in (11, 12)]
    faulty = seeded_sequence("s13", [5, 6, 7], 10, 13)
    worker = make_worker()
    results = results_by_request(worker, {0: sequences, 1: [faulty]})
    assert [s.output_ids for s in sequences] == [expected[11], expected[12]]
    assert isinstance(results["s13"][-1], EngineFailure) and len(faulty.output_ids) == 1
    assert calls_with_the_faulty_row == 3  # its prefill token, the failed batch, then alone
    assert (
        worker.num_sequence_faults == 1
        and worker.fatal is None
        and worker.scheduler.num_running == 0
    )


def test_a_detokenizer_fault_ends_only_its_sequence():
    healthy = greedy_sequence("ok", [1, 2, 3], 8)
    broken = greedy_sequence("broken", [1, 2, 3], 8)
    broken.detokenizer = FailingDetokenizer(LetterTokenizer(), [1, 2, 3])
    worker = make_worker()
    results = results_by_request(worker, {0: [healthy, broken]})
    assert healthy.output_ids == reference_tokens([1, 2, 3], 8)
    assert isinstance(results["broken"][-1], EngineFailure) and "UnicodeDecodeError" in str(
        results["broken"][-1]
    )


def test_a_failed_forward_pass_is_fatal_and_refuses_everything_after(monkeypatch):
    fatal: list[BaseException] = []
    runner = ModelRunner(MODEL, max_model_len=512, kv=KVCacheOptions(num_blocks=100))
    worker = Worker(
        runner, SchedulerLimits(4, 4, 256, False), deliver=lambda r: None, on_fatal=fatal.append
    )
    first, queued = greedy_sequence("a", [1, 2, 3], 20), greedy_sequence("b", [4, 5], 20)
    worker.submit(first)
    worker.run_once()
    monkeypatch.setattr(
        runner, "decode", lambda *args: (_ for _ in ()).throw(RuntimeError("device lost"))
    )
    worker.submit(queued)
    results = worker.run_once()
    assert {s.request_id for s, _ in results} == {"a", "b"}
    assert all(isinstance(item, EngineNotReady) for _, item in results)
    assert len(fatal) == 1 and "device lost" in str(fatal[0])
    late = greedy_sequence("c", [6], 5)
    worker.submit(late)
    assert [(s.request_id, type(item)) for s, item in worker.run_once()] == [("c", EngineNotReady)]


def test_a_request_that_waits_past_the_bound_is_refused_with_503():
    worker = make_worker(max_num_seqs=1, max_queue_wait_s=0.2)
    running, waiting = greedy_sequence("long", [1, 2], 400), greedy_sequence("late", [3, 4], 5)
    worker.submit(running)
    worker.submit(waiting)
    worker.run_once()
    waiting.arrival_time -= 1.0  # as if it had waited a second
    results = worker.run_once()
    assert [(s.request_id, type(item)) for s, item in results if s is waiting] == [
        ("late", EngineOverloaded)
    ]
    assert worker.scheduler.num_waiting == 0 and worker.scheduler.num_running == 1


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode():
    worker = make_worker(max_num_seqs=4, max_num_batched_tokens=64)
    decoding = [greedy_sequence(f"d{i}", [i + 1, i + 2], 50) for i in range(3)]
    for sequence in decoding:
        sequence.stop_token_ids = frozenset()  # they keep decoding throughout
    _run_steps(worker, decoding, 2)
    long = greedy_sequence("long", [i % 200 + 1 for i in range(150)], 3)
    worker.submit(long)
    steps = 0
    while not long.output_ids:
        worker.run_once()
        steps += 1
    # Half of the 64-token step while rows decode: 32 + 32 + 32 + 32 + 22 prompt tokens (the whole
    # step's 61 before), so the three rows wait for at most 32 prompt tokens between two tokens.
    assert steps == 5
    assert [len(s.output_ids) for s in decoding] == [7, 7, 7]  # a token every step meanwhile
    run_to_completion(worker, {})
    check_against_reference([long])


def test_the_prefill_cap_while_decoding_sets_the_chunks_and_lifts_when_decoding_ends(monkeypatch):
    worker = make_worker(max_num_seqs=4, max_num_batched_tokens=256, max_prefill_while_decoding=40)
    prefilled: list[int] = []
    real_prefill_many = worker.runner.prefill_many
    monkeypatch.setattr(
        worker.runner,
        "prefill_many",
        lambda chunks: (
            prefilled.extend(len(chunk.token_ids) for chunk in chunks),
            real_prefill_many(chunks),
        )[1],
    )
    decoding = greedy_sequence("d", [3, 4], 4)
    decoding.stop_token_ids = frozenset()  # exactly 4 tokens: it decodes through the next 3 steps
    _run_steps(worker, [decoding], 1)
    long = greedy_sequence("long", [i % 200 + 1 for i in range(300)], 3)
    run_to_completion(worker, {0: [long]})
    # 40 a step while the other row decodes; once it has finished, the rest whole (nobody waits)
    assert prefilled == [2, 40, 40, 40, 180]
    check_against_reference([long, decoding])


def _run_steps(worker: Worker, sequences: list[Sequence], steps: int) -> None:
    for sequence in sequences:
        worker.submit(sequence)
    for _ in range(steps):
        worker.run_once()


def test_logprobs_are_the_models_own_for_each_token_in_batches_and_alone():
    def with_logprobs(request_id: str, prompt: list[int], top: int) -> Sequence:
        sequence = greedy_sequence(request_id, prompt, 6)
        sequence.params = SamplingParams(temperature=0.0, logprobs=top)
        sequence.token_text = lambda token: f"<{token}>"
        return sequence

    asked, plain = with_logprobs("asked", [1, 2, 3], 2), greedy_sequence("plain", [4, 5], 6)
    results = results_by_request(make_worker(), {0: [asked, plain]})
    entries = [entry for delta in results["asked"] for entry in (delta.logprobs or ())]
    assert all(delta.logprobs is None for delta in results["plain"])
    assert [e.token for e in entries] == [f"<{t}>" for t in asked.output_ids]
    ids = list(asked.prompt_ids)
    with torch.no_grad():
        for entry, token in zip(entries, asked.output_ids):
            logprobs = torch.log_softmax(MODEL(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            assert abs(entry.logprob - float(logprobs[token])) < 1e-4
            top = torch.topk(logprobs, 2)
            assert [t for t, _ in entry.top] == [f"<{int(i)}>" for i in top.indices]
            ids.append(token)


def test_logprobs_leave_out_the_ids_the_tokenizer_cannot_write():
    """Log probabilities are normalised over the ids that can be chosen, and the top alternatives are
    among them: a padded id (Qwen2.5 pads 151,665 ids to 151,936 columns) is never listed."""
    choosable = MODEL.config.vocab_size // 2
    runner = ModelRunner(MODEL, max_model_len=512, kv=KVCacheOptions(block_size=16, num_blocks=400))
    worker = Worker(
        runner,
        SchedulerLimits(
            max_num_seqs=4, max_batch_size=4, max_num_batched_tokens=256, chunked_prefill=False
        ),
        deliver=lambda results: None,
        choosable=choosable,
    )
    top = 8
    asked = greedy_sequence("asked", PROMPTS[1], 6)
    asked.params = SamplingParams(temperature=0.0, logprobs=top)
    asked.token_text = lambda token: f"<{token}>"
    results = results_by_request(worker, {0: [asked]})
    entries = [entry for delta in results["asked"] for entry in (delta.logprobs or ())]
    assert len(entries) == len(asked.output_ids) == 6
    ids, listed = list(asked.prompt_ids), set()
    with torch.no_grad():
        for entry, token in zip(entries, asked.output_ids):
            logits = MODEL(torch.tensor([ids])).logits[0, -1].float()
            logprobs = torch.log_softmax(logits[:choosable], dim=-1)
            assert abs(entry.logprob - float(logprobs[token])) < 1e-4
            assert [t for t, _ in entry.top] == [
                f"<{int(i)}>" for i in torch.topk(logprobs, top).indices
            ]
            listed |= {int(t[1:-1]) for t, _ in entry.top}
            ids.append(token)
    assert max(listed) < choosable
    # Over every column, padded ids would have been listed: the cut is what kept them out.
    with torch.no_grad():
        full = torch.log_softmax(
            MODEL(torch.tensor([list(asked.prompt_ids)])).logits[0, -1].float(), dim=-1
        )
    assert int(torch.topk(full, top).indices.max()) >= choosable


def test_choices_prefill_their_prompt_once_and_each_decodes_as_alone(monkeypatch):
    prompt = list(range(20, 60))

    def solo(seed: int) -> list[int]:
        sequence = seeded_sequence(f"solo{seed}", prompt, 10, seed)
        run_to_completion(make_worker(), {0: [sequence]})
        return sequence.output_ids

    expected = [solo(seed) for seed in (5, 6, 7)]
    worker = make_worker(max_num_seqs=4, chunked_prefill=True, max_num_batched_tokens=16)
    prefilled = []
    real_prefill_many = worker.runner.prefill_many
    monkeypatch.setattr(
        worker.runner,
        "prefill_many",
        lambda items: (prefilled.extend(len(ids) for _, ids, _ in items), real_prefill_many(items))[
            1
        ],
    )
    choices = choices_of("r", prompt, 10, [5, 6, 7])
    other = greedy_sequence(
        "other", [1, 2, 3], 12
    )  # decodes beside them, and frees its slot mid-way
    results = results_by_request(worker, {0: [other], 1: [choices[0]]})
    assert [c.output_ids for c in choices] == expected
    assert other.output_ids == reference_tokens([1, 2, 3], 12)
    assert sum(prefilled) == len(prompt) + 3  # the shared prompt once, plus the other request's
    finishes = [item.index for item in results["r"] if item.finish_reason is not None]
    assert sorted(finishes) == [0, 1, 2] and worker.scheduler.num_running == 0


def test_choices_wait_until_all_their_slots_are_free_and_leave_together_on_abort():
    worker = make_worker(max_num_seqs=3)
    blocker = greedy_sequence("blocker", [1, 2, 3], 4)
    choices = choices_of("r", [4, 5, 6], 50, [1, 2, 3])
    worker.submit(blocker)
    worker.run_once()
    worker.submit(choices[0])
    worker.run_once()
    assert (
        worker.scheduler.num_running == 1 and worker.scheduler.num_waiting == 1
    )  # 3 slots needed, 2 free
    while blocker.status.value != "finished":
        worker.run_once()
    worker.run_once()
    assert worker.scheduler.num_running == 3 and all(c.output_ids for c in choices)
    worker.abort("r")
    worker.run_once()
    assert worker.scheduler.num_running == 0 and worker.scheduler.num_waiting == 0


def test_tokens_are_chosen_only_among_the_ids_the_tokenizer_can_write():
    """A model's logits padded past its tokenizer (as Qwen2.5's are) never yield a padded id; rows
    still decode greedily over the ids that remain, decode and prefill alike."""
    choosable = MODEL.config.vocab_size // 2
    runner = ModelRunner(MODEL, max_model_len=512, kv=KVCacheOptions(block_size=16, num_blocks=400))
    worker = Worker(
        runner,
        SchedulerLimits(
            max_num_seqs=4, max_batch_size=4, max_num_batched_tokens=256, chunked_prefill=False
        ),
        deliver=lambda results: None,
        launch_ahead=True,
        choosable=choosable,
    )
    sequences = [greedy_sequence(f"r{i}", p, 12) for i, p in enumerate(PROMPTS[:4])]
    run_to_completion(worker, {0: sequences})
    # Unconstrained, some of these answers would use ids past the cut: the limit is what changed them.
    assert any(max(reference_tokens(s.prompt_ids, s.max_tokens)) >= choosable for s in sequences)
    for sequence in sequences:
        assert all(token < choosable for token in sequence.output_ids)
        with torch.no_grad():  # greedy over the first ``choosable`` columns, one token at a time
            ids, expected = list(sequence.prompt_ids), []
            while len(expected) < sequence.max_tokens:
                token = int(MODEL(torch.tensor([ids])).logits[0, -1, :choosable].argmax())
                expected.append(token)
                ids.append(token)
                if token == 0:
                    break
        assert sequence.output_ids == expected


def test_ordinary_deltas_wait_for_the_next_steps_launch_and_none_is_lost_or_reordered():
    """With a step running ahead, a step's ordinary deltas are handed over in the next pass (once its
    step is launched, before its tokens are awaited); a request's first and last deltas go at once."""
    runner = ModelRunner(MODEL, max_model_len=512, kv=KVCacheOptions(block_size=16, num_blocks=400))
    passes = [0]
    delivered: list[
        tuple[int, Sequence, object]
    ] = []  # (pass it was handed over in, sequence, item)
    worker = Worker(
        runner,
        SchedulerLimits(
            max_num_seqs=4, max_batch_size=4, max_num_batched_tokens=256, chunked_prefill=False
        ),
        deliver=lambda results: delivered.extend((passes[0], s, item) for s, item in results),
        launch_ahead=True,
    )
    sequences = [
        greedy_sequence(f"r{i}", p, m) for i, (p, m) in enumerate(zip(PROMPTS[:3], (12, 20, 6)))
    ]
    produced: dict[int, int] = {}  # id(delta) → the pass that made it
    run_once = worker.run_once

    def counted_pass(block: bool = False):  # the engine thread's loop looks run_once up every pass
        passes[0] += 1
        results = run_once(block)
        produced.update((id(item), passes[0]) for _, item in results or ())
        return results

    worker.run_once = counted_pass
    for sequence in sequences:
        worker.submit(sequence)
    worker.start()
    deadline = time.monotonic() + 60
    while sum(item.finish_reason is not None for _, _, item in delivered) < len(sequences):
        assert time.monotonic() < deadline, "not every answer was handed over"
        time.sleep(0.01)
    worker.stop()
    assert not worker._held
    late = 0
    for sequence in sequences:
        mine = [(at, item) for at, s, item in delivered if s is sequence]
        assert "".join(item.text for _, item in mine) == LetterTokenizer().decode(
            [t for t in sequence.output_ids if t != 0]
        )  # every delta, once, in order
        assert mine[0][0] == produced[id(mine[0][1])]  # the first token is not held
        assert mine[-1][1].finish_reason is not None and mine[-1][0] == produced[id(mine[-1][1])]
        late += sum(at == produced[id(item)] + 1 for at, item in mine[1:-1])
        assert all(at - produced[id(item)] in (0, 1) for at, item in mine)
    assert late > 0  # ordinary deltas did wait for the next step's launch


def test_a_delta_is_held_only_when_it_is_neither_an_answers_first_text_nor_its_last():
    """The first delta of an answer can come from a decode step (its first tokens wrote no whole
    character yet); it carries every token so far, and is never held, nor is a last delta or an error."""
    from ragllm.engines.inprocess.worker import _holdable

    assert not _holdable(
        Delta(text="é", num_tokens=3, prompt_tokens=9, completion_tokens=3)
    )  # first text
    assert _holdable(Delta(text="x", num_tokens=1, prompt_tokens=9, completion_tokens=4))
    assert not _holdable(
        Delta(
            text="",
            num_tokens=1,
            prompt_tokens=9,
            completion_tokens=5,
            finish_reason=FinishReason.STOP,
        )
    )
    assert not _holdable(EngineFailure("a fault of this row"))
