"""Paged KV with prefix caching in the worker, on a tiny random model in float32: the same greedy
tokens with caching on and off, blocks shared while sequences join and leave, preemption and
recompute, and no block leaked by cancelled requests."""

from __future__ import annotations

import random

from ragllm.engines.inprocess.runner.cpu import KVCacheOptions
from tests.support.letter_model import (
    check_against_reference,
    choices_of,
    greedy_sequence,
    make_worker,
    reference_tokens,
    results_by_request,
    run_to_completion,
)

BLOCK = 16


def _rag_prompts(count: int, seed: int = 0) -> list[list[int]]:
    """A shared template, one of three document sets, then a question: what RAG traffic repeats."""
    rng = random.Random(seed)
    template = [rng.randrange(1, 200) for _ in range(21)]
    documents = [[rng.randrange(1, 200) for _ in range(40 + 13 * d)] for d in range(3)]
    return [
        template + documents[i % 3] + [rng.randrange(1, 200) for _ in range(rng.randrange(3, 12))]
        for i in range(count)
    ]


def _run(prefix_caching: bool, prompts: list[list[int]], **limits):
    worker = make_worker(
        KVCacheOptions(block_size=BLOCK, num_blocks=200, prefix_caching=prefix_caching), **limits
    )
    sequences = [greedy_sequence(f"r{i}", prompt, 6 + i % 5) for i, prompt in enumerate(prompts)]
    shared_while_running = 0
    arrivals = {
        2 * i: [sequence] for i, sequence in enumerate(sequences)
    }  # join one by one, leave as they end
    for step in range(500):
        for sequence in arrivals.pop(step, []):
            worker.submit(sequence)
        worker.run_once()
        held = [block for s in worker.scheduler.running for block in s.block_table]
        shared_while_running = max(shared_while_running, len(held) - len(set(held)))
        if not arrivals and not worker.scheduler.running and not worker.scheduler.waiting:
            return worker, sequences, shared_while_running
    raise AssertionError("worker did not drain")


def test_greedy_tokens_are_the_same_with_prefix_caching_on_and_off():
    prompts = _rag_prompts(9)
    on, cached, shared = _run(True, prompts)
    off, uncached, _ = _run(False, prompts)
    assert [s.output_ids for s in cached] == [s.output_ids for s in uncached]
    check_against_reference(cached)
    pool = on.scheduler.blocks.pool
    assert (
        pool.hits >= 6 * 3 * BLOCK
    )  # the last six prompts find at least template and first documents
    assert (
        off.scheduler.blocks.pool.hits == 0 and shared > 0
    )  # running sequences held the same blocks at once
    assert [s.num_cached_tokens for s in cached[:3]] == [
        0,
        BLOCK,
        BLOCK,
    ]  # the template's one full block
    assert all(
        s.num_cached_tokens % BLOCK == 0 and s.num_cached_tokens >= 3 * BLOCK for s in cached[3:]
    )


def test_a_reported_cache_hit_is_what_the_prefill_skipped(monkeypatch):
    worker = make_worker(KVCacheOptions(block_size=BLOCK, num_blocks=200))
    prompts = _rag_prompts(4)
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
    first, repeat = (
        greedy_sequence("a", prompts[0], 3),
        greedy_sequence("b", prompts[3], 3),
    )  # same documents
    results = results_by_request(worker, {0: [first], 5: [repeat]})
    last = results["b"][-1]
    assert (
        last.cached_tokens == repeat.num_cached_tokens > 0 and results["a"][-1].cached_tokens == 0
    )
    assert prefilled == [len(prompts[0]), len(prompts[3]) - last.cached_tokens]


def test_a_whole_prompt_in_the_cache_still_computes_its_last_token():
    worker = make_worker(KVCacheOptions(block_size=BLOCK, num_blocks=200))
    prompt = list(range(1, 2 * BLOCK + 1))  # exactly two blocks
    first, again = greedy_sequence("a", prompt, 4), greedy_sequence("b", list(prompt), 4)
    run_to_completion(worker, {0: [first], 6: [again]})
    assert again.num_cached_tokens == BLOCK  # the second block holds the last token: computed again
    check_against_reference([first, again])


def test_preempted_sequences_are_recomputed_and_give_the_same_tokens():
    # 40 blocks: one 512-token window and a little more; four sequences growing to ~30 blocks together.
    worker = make_worker(
        KVCacheOptions(block_size=BLOCK, num_blocks=40), max_num_seqs=4, max_num_batched_tokens=512
    )
    prompts = [[(7 * i + r) % 200 + 1 for i in range(100 + 20 * r)] for r in range(4)]
    sequences = [greedy_sequence(f"r{r}", prompt, 60) for r, prompt in enumerate(prompts)]
    for sequence in sequences:
        sequence.stop_token_ids = frozenset()  # all run to max_tokens
    run_to_completion(worker, {0: sequences})
    assert worker.scheduler.blocks.num_preemptions > 0
    for sequence in sequences:
        expected = reference_tokens(sequence.prompt_ids, 60, stop_at_zero=False)
        assert sequence.output_ids == expected, sequence.request_id
    assert worker.scheduler.blocks.pool.num_free == worker.scheduler.blocks.pool.num_usable


def test_choices_share_their_prompts_full_blocks_and_copy_the_partial_one():
    worker = make_worker(KVCacheOptions(block_size=BLOCK, num_blocks=200))
    prompt = list(range(20, 60))  # two full blocks and 8 tokens
    choices = choices_of("r", prompt, 10, [5, 6, 7])
    worker.submit(choices[0])
    worker.run_once()
    tables = [c.block_table for c in choices]
    assert all(t[:2] == tables[0][:2] for t in tables)  # shared
    assert len({t[2] for t in tables}) == 3  # each its own copy of the partial block
    run_to_completion(worker, {})
    assert worker.scheduler.blocks.pool.num_free == worker.scheduler.blocks.pool.num_usable


def test_a_storm_of_cancelled_requests_leaks_no_block():
    worker = make_worker(
        KVCacheOptions(block_size=BLOCK, num_blocks=60),
        max_num_seqs=4,
        chunked_prefill=True,
        max_num_batched_tokens=32,
    )
    pool = worker.scheduler.blocks.pool
    rng = random.Random(5)
    prompts = _rag_prompts(40, seed=5)
    aborts: dict[int, list[str]] = {}
    for index in range(40):
        aborts.setdefault(rng.randrange(0, 60), []).append(f"r{index}")
    for step in range(80):
        if step < 40:
            sequence = greedy_sequence(f"r{step}", prompts[step], 50)
            sequence.stop_token_ids = frozenset()
            worker.submit(sequence)
            if step % 4 == 0:
                choices = choices_of(f"g{step}", prompts[step], 30, [1, 2])
                worker.submit(choices[0])
                aborts.setdefault(step + 1 + step % 3, []).append(f"g{step}")
        for request_id in aborts.pop(step, []):
            worker.abort(request_id)
        worker.run_once()
    for step in range(400):
        worker.run_once()
        if not worker.scheduler.running and not worker.scheduler.waiting:
            break
    assert not worker.scheduler.running and not worker.scheduler.waiting
    assert pool.num_free == pool.num_usable


def test_a_request_larger_than_the_whole_pool_is_refused_and_the_engine_goes_on():
    from ragllm.errors import ContextLengthExceeded

    worker = make_worker(
        KVCacheOptions(block_size=BLOCK, num_blocks=34), max_num_seqs=8
    )  # one window
    prompt = [
        (5 * i) % 200 + 1 for i in range(500)
    ]  # 32 blocks, the last partial: 7 copies for n=8
    choices = choices_of("huge", prompt, 4, list(range(8)))
    worker.submit(choices[0])
    refused = worker.run_once()
    assert [(s.request_id, type(item)) for s, item in refused] == [("huge", ContextLengthExceeded)]
    assert "needs more KV cache than the engine has" in str(refused[0][1])
    after = greedy_sequence("after", [1, 2, 3], 5)
    run_to_completion(worker, {0: [after]})
    check_against_reference([after])
    assert worker.scheduler.blocks.pool.num_free == worker.scheduler.blocks.pool.num_usable


# -- cache scopes: tenants (and their cache_salt) never share blocks -------------------------------
def _scoped(
    request_id: str, prompt: list[int], max_tokens: int, group: str | None, salt: str | None = None
):
    from ragllm.generation import CacheScope

    sequence = greedy_sequence(request_id, prompt, max_tokens)
    sequence.scope_salt = CacheScope(group, salt).digest()
    return sequence


def test_a_prompt_cached_by_one_scope_is_a_miss_for_another_and_a_hit_for_its_own():
    worker = make_worker(KVCacheOptions(block_size=BLOCK, num_blocks=200))
    prompt = _rag_prompts(1)[0]
    first = _scoped("a1", prompt, 3, "tenant-a")
    other_tenant, other_salt = (
        _scoped("b1", list(prompt), 3, "tenant-b"),
        _scoped("a2", list(prompt), 3, "tenant-a", "x"),
    )
    unscoped, again = (
        _scoped("n1", list(prompt), 3, None),
        _scoped("a3", list(prompt), 3, "tenant-a"),
    )
    run_to_completion(
        worker, {0: [first], 6: [other_tenant], 12: [other_salt], 18: [unscoped], 24: [again]}
    )
    assert first.num_cached_tokens == 0
    assert (
        other_tenant.num_cached_tokens
        == other_salt.num_cached_tokens
        == unscoped.num_cached_tokens
        == 0
    )
    assert again.num_cached_tokens == (len(prompt) - 1) // BLOCK * BLOCK > 0
    check_against_reference(
        [first, other_tenant, other_salt, unscoped, again]
    )  # the same answer each time


def test_preempted_scoped_sequences_resume_from_their_own_blocks_and_give_the_same_tokens():
    worker = make_worker(
        KVCacheOptions(block_size=BLOCK, num_blocks=40), max_num_seqs=4, max_num_batched_tokens=512
    )
    prompts = [[(7 * i + r) % 200 + 1 for i in range(100 + 20 * r)] for r in range(4)]
    sequences = [
        _scoped(f"r{r}", prompt, 60, f"tenant-{r % 2}") for r, prompt in enumerate(prompts)
    ]
    for sequence in sequences:
        sequence.stop_token_ids = frozenset()
    run_to_completion(worker, {0: sequences})
    assert worker.scheduler.blocks.num_preemptions > 0
    check_against_reference(sequences)
    assert worker.scheduler.blocks.pool.num_free == worker.scheduler.blocks.pool.num_usable
    # What they registered is under their own scope: the same tenant finds it, the other does not.
    mine, theirs = (
        _scoped("m", list(prompts[1]), 2, "tenant-1"),
        _scoped("t", list(prompts[1]), 2, "tenant-0"),
    )
    run_to_completion(worker, {0: [mine], 4: [theirs]})
    assert mine.num_cached_tokens > 0 and theirs.num_cached_tokens == 0


def test_choices_register_their_blocks_under_their_requests_scope():
    worker = make_worker(KVCacheOptions(block_size=BLOCK, num_blocks=200))
    prompt = list(range(20, 60))  # two full blocks and 8 tokens
    choices = choices_of("r", prompt, 10, [5, 6, 7])
    for choice in choices:
        choice.scope_salt = _scoped("-", prompt, 1, "tenant-a").scope_salt
    run_to_completion(worker, {0: [choices[0]]})
    same, other = (
        _scoped("s", list(prompt), 2, "tenant-a"),
        _scoped("o", list(prompt), 2, "tenant-b"),
    )
    run_to_completion(worker, {0: [same], 4: [other]})
    assert same.num_cached_tokens == 2 * BLOCK and other.num_cached_tokens == 0
    assert worker.scheduler.blocks.pool.num_free == worker.scheduler.blocks.pool.num_usable
