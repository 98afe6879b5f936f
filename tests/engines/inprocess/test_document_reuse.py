"""Document KV reuse at any position (rag.kv_reuse) in the worker, on a tiny random model in float32:
stored documents placed at new positions, blended with a share recomputed; with the whole share
recomputed the answer is a full prefill's, tenants never share, an edited document is another
document, and the store's blocks are ordinary cached blocks that pressure evicts."""

from __future__ import annotations

import random

import pytest
import torch

from ragllm.engines.inprocess.runner.cpu import KVCacheOptions
from ragllm.engines.inprocess.sequence import Sequence
from tests.support.letter_model import (
    MODEL,
    check_against_reference,
    choices_of,
    greedy_sequence,
    make_worker,
    reference_tokens,
    run_to_completion,
)

BLOCK = 16
RNG = random.Random(11)
TEMPLATE = [
    RNG.randrange(1, 200) for _ in range(21)
]  # not a whole block: documents start mid-block
DOCUMENTS = [[RNG.randrange(1, 200) for _ in range(30 + 11 * d)] for d in range(6)]
SEPARATOR = [5, 6]


def rag_prompt(order: list[int], question: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    ids, spans = list(TEMPLATE), []
    for index in order:
        spans.append((len(ids), len(ids) + len(DOCUMENTS[index])))
        ids += DOCUMENTS[index] + SEPARATOR
    return ids + question, spans


def reusing(worker, request_id: str, order: list[int], question: list[int], scope=b"") -> Sequence:
    ids, spans = rag_prompt(order, question)
    sequence = greedy_sequence(request_id, ids, 6)
    sequence.scope_salt = scope
    sequence.documents = worker.scheduler.blocks.document_spans(ids, spans, scope)
    return sequence


def worker_with(share: float, num_blocks: int = 200, **limits):
    return make_worker(
        KVCacheOptions(block_size=BLOCK, num_blocks=num_blocks, document_recompute_share=share),
        **limits,
    )


def full_prefill_logits(ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return MODEL(torch.tensor([ids])).logits[0, -1].float()


def blended_logits(worker, sequence: Sequence) -> torch.Tensor:
    """The logits the blend hands to sampling for ``sequence`` (its prompt's last position)."""
    seen: list[torch.Tensor] = []
    real = worker.runner.blend
    worker.runner.blend = lambda *args: seen.append(real(*args)) or seen[-1]
    try:
        run_to_completion(worker, {0: [sequence]})
    finally:
        worker.runner.blend = real
    assert len(seen) == 1
    return seen[0]


def test_documents_in_a_new_order_are_reused_and_with_everything_recomputed_answer_as_a_full_prefill():
    worker = worker_with(share=1.0)
    first = reusing(worker, "a", [0, 1, 2], [7, 8, 9])
    run_to_completion(worker, {0: [first]})
    again = reusing(worker, "b", [2, 0, 1], [9, 8])
    run_to_completion(worker, {0: [again]})
    store = worker.scheduler.blocks.documents
    assert (store.misses, store.hits) == (3, 3)
    assert store.tokens_reused == 0  # everything recomputed: nothing kept as stored
    check_against_reference([first, again])


def test_kv_of_a_reused_document_matches_a_full_prefill():
    """Share 1: every layer's keys and values of the placed documents equal a full prefill's; share
    0.15: the next token's distribution stays within a KL of 0.05 of the full prefill's."""
    for share, bound in ((1.0, 1e-6), (0.15, 0.05)):
        worker = worker_with(share)
        run_to_completion(worker, {0: [reusing(worker, "store", [3, 4, 5], [1])]})
        sequence = reusing(worker, "reuse", [5, 3, 4], [4, 2, 2])
        logits = blended_logits(worker, sequence)
        expected = full_prefill_logits(sequence.prompt_ids)
        divergence = torch.nn.functional.kl_div(
            logits.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="sum"
        )
        assert float(divergence) <= bound, (share, float(divergence))
        assert worker.scheduler.blocks.documents.hits == 3


def test_share_one_writes_the_full_prefills_keys_and_values():
    worker = worker_with(share=1.0)
    run_to_completion(worker, {0: [reusing(worker, "store", [0, 1], [1])]})
    sequence = reusing(worker, "reuse", [1, 0], [3])
    sequence.stop_token_ids = frozenset()
    cache = worker.runner.cache
    captured = {}
    real = worker.runner.blend

    def capture(table, target, start, blend):
        logits = real(table, target, start, blend)
        rows = cache.rows_of(table, 0, len(target))
        captured["kv"] = cache.storage[:, :, rows // BLOCK, :, rows % BLOCK].clone()
        return logits

    worker.runner.blend = capture
    run_to_completion(worker, {0: [sequence]})
    # A full prefill of the same prompt into fresh blocks of another runner, read back the same way.
    reference = worker_with(share=1.0).runner
    table = list(range(1, 1 + -(-len(sequence.prompt_ids) // BLOCK)))
    reference.prefill(table, sequence.prompt_ids, 0)
    rows = reference.cache.rows_of(table, 0, len(sequence.prompt_ids))
    expected = reference.cache.storage[:, :, rows // BLOCK, :, rows % BLOCK]
    torch.testing.assert_close(captured["kv"], expected, atol=1e-5, rtol=1e-5)


def test_reuse_never_crosses_tenants():
    worker = worker_with(share=0.15)
    run_to_completion(worker, {0: [reusing(worker, "a", [0, 1], [1], scope=b"tenant-a")]})
    other = reusing(worker, "b", [1, 0], [1], scope=b"tenant-b")
    run_to_completion(worker, {0: [other]})
    store = worker.scheduler.blocks.documents
    assert (store.hits, store.misses) == (0, 4)
    assert other.num_cached_tokens == 0  # not even the template: prefix blocks are scoped too
    same = reusing(worker, "c", [1, 0], [2], scope=b"tenant-a")
    run_to_completion(worker, {0: [same]})
    assert store.hits == 2 and same.num_cached_tokens > 0


def test_a_document_changed_by_one_token_is_not_reused():
    worker = worker_with(share=0.15)
    run_to_completion(worker, {0: [reusing(worker, "a", [0, 1], [1])]})
    ids, spans = rag_prompt([1, 0], [1])
    ids[spans[1][0] + 7] += 1  # one token of document 0 differs
    edited = greedy_sequence("b", ids, 4)
    edited.documents = worker.scheduler.blocks.document_spans(ids, spans)
    run_to_completion(worker, {0: [edited]})
    store = worker.scheduler.blocks.documents
    assert (store.hits, store.misses) == (1, 3)


def test_reused_tokens_count_as_cached_and_blended_blocks_are_never_shared_as_a_prefix():
    worker = worker_with(share=0.15)
    run_to_completion(worker, {0: [reusing(worker, "a", [0, 1, 2], [1])]})
    again = reusing(worker, "b", [2, 1, 0], [1])
    run_to_completion(worker, {0: [again]})
    store = worker.scheduler.blocks.documents
    template_blocks = len(TEMPLATE) // BLOCK * BLOCK
    assert again.num_cached_tokens == template_blocks + store.tokens_reused
    # The same prompt again: only the exact prefix (the template's full block) comes from the
    # prefix cache; the blended documents are reused from the store, not shared as a prefix.
    third = reusing(worker, "c", [2, 1, 0], [1])
    run_to_completion(worker, {0: [third]})
    assert store.hits == 6
    assert worker.scheduler.blocks.pool.hits == 2 * template_blocks  # b's and c's


def test_store_blocks_are_evicted_under_pressure_and_nothing_leaks():
    # 40 blocks: one 512-token window and a little more; each prompt stores 3 documents of its own.
    worker = worker_with(share=0.15, num_blocks=40, max_num_batched_tokens=512)
    pool, store = worker.scheduler.blocks.pool, worker.scheduler.blocks.documents
    for round_ in range(4):
        for order in ([0, 1, 2], [3, 4, 5], [2, 4, 0]):
            sequence = reusing(worker, f"r{round_}{order}", order, [round_ + 1])
            run_to_completion(worker, {0: [sequence]})
            assert store.num_blocks <= pool.num_usable
            assert pool.num_free == pool.num_usable  # stored blocks are free to evict
    assert store.misses > 6  # pressure evicted stored documents, which were computed again
    assert store.hits > 0


def test_a_blend_survives_preemption_and_choices_fork_off_it():
    worker = worker_with(share=1.0, num_blocks=40, max_num_seqs=4, max_num_batched_tokens=512)
    run_to_completion(worker, {0: [reusing(worker, "store", [0, 1], [1])]})
    sequences = [reusing(worker, f"r{r}", [1, 0], [r + 1] * (10 + 20 * r)) for r in range(4)]
    for sequence in sequences:
        sequence.max_tokens = 90
        sequence.stop_token_ids = frozenset()
    run_to_completion(worker, {0: sequences})
    assert worker.scheduler.blocks.num_preemptions > 0
    for sequence in sequences:
        expected = reference_tokens(sequence.prompt_ids, 90, stop_at_zero=False)
        assert sequence.output_ids == expected, sequence.request_id
    ids, spans = rag_prompt([0, 1], [3])
    group = choices_of("n", ids, 5, [1, 2, 3])
    group[0].documents = worker.scheduler.blocks.document_spans(ids, spans)
    run_to_completion(worker, {0: [group[0]]})
    assert all(len(choice.output_ids) == 5 for choice in group)
    pool = worker.scheduler.blocks.pool
    assert pool.num_free == pool.num_usable


def test_an_aborted_request_gives_back_the_blocks_its_blend_held():
    worker = worker_with(share=0.15, max_num_batched_tokens=64, chunked_prefill=True)
    run_to_completion(worker, {0: [reusing(worker, "store", [0, 1], [1])]})
    busy = greedy_sequence("busy", list(range(1, 200)), 30)  # prefills in chunks, ahead in line
    sequence = reusing(worker, "gone", [1, 0, 2], [2])
    worker.submit(busy)
    worker.submit(sequence)
    worker.run_once()
    assert sequence.blend is not None and sequence.blend.held  # admitted, its blend not yet run
    worker.abort("gone")
    run_to_completion(worker, {})
    pool = worker.scheduler.blocks.pool
    assert pool.num_free == pool.num_usable
    assert worker.scheduler.blocks.documents.misses == 2  # only the first request's documents


def test_choices_of_a_blended_prompt_share_nothing_approximate_as_a_prefix():
    """A later request that does not reuse documents, continuing one choice's answer, finds only the
    exact prefix cached: neither the leader's nor a follower's blocks past the blend are shared."""
    worker = worker_with(share=0.0)
    run_to_completion(worker, {0: [reusing(worker, "store", [0, 1], [1])]})
    ids, spans = rag_prompt([1, 0], [3])
    group = choices_of("n", ids, 40, [1, 2])
    for choice in group:
        choice.stop_token_ids = frozenset()
    group[0].documents = worker.scheduler.blocks.document_spans(ids, spans)
    run_to_completion(worker, {0: [group[0]]})
    assert all(choice.exact_until == spans[0][0] for choice in group)
    exact = greedy_sequence("exact", ids, 1)  # the prompt's exact blocks, computed without reuse
    run_to_completion(worker, {0: [exact]})
    for choice in group:
        probe = greedy_sequence(f"probe{choice.index}", choice.history() + [7], 1)
        run_to_completion(worker, {0: [probe]})
        assert probe.num_cached_tokens <= len(ids) // BLOCK * BLOCK


def test_a_prompt_longer_than_a_blend_takes_is_prefilled_as_without_reuse():
    worker = worker_with(share=0.15, max_num_batched_tokens=16, chunked_prefill=True)
    run_to_completion(worker, {0: [reusing(worker, "a", [0, 1], [1])]})
    again = reusing(worker, "b", [1, 0], [2])
    run_to_completion(worker, {0: [again]})
    store = worker.scheduler.blocks.documents
    assert (store.hits, store.misses) == (0, 0)  # both over 4 steps' budget: no blend at all
    check_against_reference([again])
    assert worker.scheduler.blocks.pool.num_free == worker.scheduler.blocks.pool.num_usable


def test_cached_tokens_never_exceed_the_prompt_and_a_readmission_counts_nothing_twice():
    worker = worker_with(share=0.15, num_blocks=40, max_num_seqs=4, max_num_batched_tokens=512)
    run_to_completion(worker, {0: [reusing(worker, "store", [0, 1], [1])]})
    sequences = [reusing(worker, f"r{r}", [1, 0], [r + 1] * (10 + 20 * r)) for r in range(4)]
    for sequence in sequences:
        sequence.max_tokens, sequence.stop_token_ids = 90, frozenset()
    first_counts = {}
    real = worker.scheduler.blocks.blended

    def note(sequence):
        real(sequence)
        first_counts.setdefault(sequence.request_id, sequence.num_cached_tokens)

    worker.scheduler.blocks.blended = note
    run_to_completion(worker, {0: sequences})
    assert worker.scheduler.blocks.num_preemptions > 0
    for sequence in sequences:
        assert 0 < sequence.num_cached_tokens <= sequence.num_prompt_tokens
        assert sequence.num_cached_tokens == first_counts[sequence.request_id]


def test_placed_keys_are_rotated_to_their_new_position():
    """A first layer's key depends on its token and position only: a document's keys computed after
    one context and rotated by the placement's shift equal its keys computed after a longer one."""
    runner = worker_with(share=0.0).runner
    document, shift = DOCUMENTS[2], 37
    near, far = TEMPLATE, TEMPLATE + [3] * shift
    tables = {}
    for name, context, first_block in (("near", near, 1), ("far", far, 40)):
        length = len(context) + len(document)
        tables[name] = list(range(first_block, first_block + -(-length // BLOCK)))
        runner.prefill(tables[name], context + document, 0)
    cache = runner.cache

    def first_layer_keys(table, start):
        rows = cache.rows_of(table, start, start + len(document))
        return cache.storage[0, 0, rows // BLOCK, :, rows % BLOCK]

    shifts = torch.full((len(document),), shift)
    rotated = runner.blender._rotated(first_layer_keys(tables["near"], len(near)), shifts)
    torch.testing.assert_close(
        rotated, first_layer_keys(tables["far"], len(far)), atol=1e-5, rtol=1e-5
    )


def test_placed_documents_hold_a_full_prefills_first_layer_keys_and_values():
    """Right after placing (before any layer runs again), each document's first-layer keys and
    values at its new rows are a full prefill's, since they depend on token and position only: the
    gather, each document's own rotation and the scatter, checked together."""
    worker = worker_with(share=0.0)
    run_to_completion(worker, {0: [reusing(worker, "store", [0, 1, 2], [1])]})
    sequence = reusing(worker, "reuse", [2, 0, 1], [3])
    blender, cache = worker.runner.blender, worker.runner.cache
    placed = []
    real = blender._forward

    def capture(table, target, start, placements):
        for placement in placements:
            rows = cache.rows_of(table, placement.span.start, placement.span.end)
            placed.append((placement, cache.storage[0, :, rows // BLOCK, :, rows % BLOCK].clone()))
        return real(table, target, start, placements)

    blender._forward = capture
    run_to_completion(worker, {0: [sequence]})
    reference = worker_with(share=1.0).runner
    table = list(range(1, 1 + -(-len(sequence.prompt_ids) // BLOCK)))
    reference.prefill(table, sequence.prompt_ids, 0)
    assert sorted(p.stored.base != p.span.start for p, _ in placed) == [False, True, True]
    assert not any(p.fill for p, _ in placed)
    for placement, kv in placed:
        rows = reference.cache.rows_of(table, placement.span.start, placement.span.end)
        expected = reference.cache.storage[0, :, rows // BLOCK, :, rows % BLOCK]
        torch.testing.assert_close(kv, expected, atol=1e-5, rtol=1e-5)


def test_padding_the_kept_tokens_changes_nothing_but_their_count():
    """On CUDA the kept tokens are padded with the last one repeated (shapes then repeat from blend
    to blend); here on the CPU with a quantum of 32: the same logits and recomputed counts."""
    results = []
    for quantum in (1, 32):
        worker = worker_with(share=0.15)
        worker.runner.blender.keep_quantum = quantum
        run_to_completion(worker, {0: [reusing(worker, "store", [3, 4, 5], [1])]})
        kept = []
        real = worker.runner.blender._choose
        worker.runner.blender._choose = lambda *args: kept.append(real(*args)) or kept[-1]
        sequence = reusing(worker, "reuse", [5, 3, 4], [4, 2, 2])
        logits = blended_logits(worker, sequence)
        store = worker.scheduler.blocks.documents
        results.append((logits, store.tokens_reused, store.tokens_recomputed, kept[0]))
    (plain, *plain_counts, plain_kept), (padded, *padded_counts, padded_kept) = results
    assert padded_kept.shape[0] % 32 == 0 and padded_kept.shape[0] > plain_kept.shape[0]
    assert padded_kept.unique().tolist() == plain_kept.tolist()
    assert padded_counts == plain_counts
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("header_blocks", [0, 1])
def test_a_first_document_whose_header_completes_a_cached_block_is_still_stored(header_blocks):
    """Documents that start alike (a header such as ``[doc-``) complete the context's last block the
    same way, so once a prompt without reuse has cached that block (and any further blocks the
    header fills), it is cached whichever document comes first. The first document is still
    stored: a later prompt that moves it elsewhere reuses it rather than computing it again."""
    header = [9] * (BLOCK - len(TEMPLATE) % BLOCK + header_blocks * BLOCK)
    worker = worker_with(share=1.0)  # every token recomputed: answers checkable against a model
    store, pool = worker.scheduler.blocks.documents, worker.scheduler.blocks.pool
    sequences = [
        header_prompt(worker, "plain", header, [0, 1], reuse=False),  # caches the header's blocks
        header_prompt(worker, "b", header, [3, 1]),
    ]
    assert (store.hits, store.misses) == (0, 2)  # 3 computed and stored, though it came first
    sequences.append(header_prompt(worker, "c", header, [1, 3]))
    assert (store.hits, store.misses) == (2, 2)
    check_against_reference(sequences)
    assert pool.num_free == pool.num_usable


def test_a_cached_prefix_holding_most_of_the_first_document_is_kept():
    """The same first document again after a prompt without reuse: its cached blocks are exact and
    cheaper than placing and blending it, so they are taken as they are (the document is stored
    when a later prompt moves it)."""
    worker = worker_with(share=0.15)
    store = worker.scheduler.blocks.documents
    header_prompt(worker, "plain", [], [3, 1], reuse=False)
    again = header_prompt(worker, "b", [], [3, 2])
    document_end = len(TEMPLATE) + len(DOCUMENTS[3])
    assert (
        document_end % BLOCK
    )  # its last block differs (the next document): the prefix ends inside
    assert again.num_cached_tokens == document_end // BLOCK * BLOCK
    assert (store.hits, store.misses) == (0, 1)  # 2 only: 3 lay in the prefix


def header_prompt(
    worker, request_id: str, header: list[int], order: list[int], reuse: bool = True
) -> Sequence:
    """A prompt of documents that all start with ``header``, run to completion."""
    ids, spans = list(TEMPLATE), []
    for index in order:
        spans.append((len(ids), len(ids) + len(header) + len(DOCUMENTS[index])))
        ids += header + DOCUMENTS[index] + SEPARATOR
    sequence = greedy_sequence(request_id, ids + [1], 4)
    if reuse:
        sequence.documents = worker.scheduler.blocks.document_spans(sequence.prompt_ids, spans)
    run_to_completion(worker, {0: [sequence]})
    return sequence


def test_a_document_at_the_position_it_was_computed_at_is_reused_exactly_and_not_recomputed():
    """The first document right after the context it was computed after holds a full prefill's KV:
    at a 0.15 share none of its tokens is recomputed, and its KV in every layer is still a full
    prefill's."""
    worker = worker_with(share=0.15)
    run_to_completion(worker, {0: [reusing(worker, "store", [0, 1, 2], [1])]})
    sequence = reusing(worker, "reuse", [0, 2, 1], [3])
    cache = worker.runner.cache
    captured = {}
    real = worker.runner.blend

    def capture(table, target, start, blend):
        logits = real(table, target, start, blend)
        captured["placements"] = list(blend.placements)
        first = blend.placements[0].span
        rows = cache.rows_of(table, first.start, first.end)
        captured["kv"] = cache.storage[:, :, rows // BLOCK, :, rows % BLOCK].clone()
        return logits

    worker.runner.blend = capture
    run_to_completion(worker, {0: [sequence]})
    first, *moved = captured["placements"]
    assert first.span.start == first.stored.base == len(TEMPLATE) and not first.fill
    assert first.recomputed == 0 and all(p.recomputed > 0 for p in moved)
    reference = worker_with(share=1.0).runner
    table = list(range(1, 1 + -(-len(sequence.prompt_ids) // BLOCK)))
    reference.prefill(table, sequence.prompt_ids, 0)
    rows = reference.cache.rows_of(table, first.span.start, first.span.end)
    expected = reference.cache.storage[:, :, rows // BLOCK, :, rows % BLOCK]
    torch.testing.assert_close(captured["kv"], expected, atol=1e-5, rtol=1e-5)
