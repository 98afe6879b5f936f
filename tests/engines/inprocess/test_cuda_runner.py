"""The CUDA path's runner (paged cache, fused projections, batched prefill, decode and prefill
graphs) against transformers' forward on the same weights. On the CPU it runs without graphs, so
all but the capture is covered everywhere; the ``cuda`` cases run on a GPU (the device tool)."""

from __future__ import annotations

import pytest
import torch

from ragllm.engines.inprocess.kv.document_store import (
    DocumentBlend,
    DocumentPlacement,
    DocumentSpan,
    StoredDocument,
)
from ragllm.engines.inprocess.runner.cpu import KVCacheOptions, PrefillChunk
from ragllm.engines.inprocess.runner.cuda import CudaGraphRunner, CudaRunnerOptions
from ragllm.engines.inprocess.sample.choice import (
    filtered_probabilities,
    filtered_probabilities_batched,
)
from ragllm.engines.inprocess.scheduler import SchedulerLimits
from ragllm.engines.inprocess.worker import Worker
from ragllm.errors import ModelLoadError
from ragllm.generation import SamplingParams
from tests.support.block_tables import scattered_tables
from tests.support.letter_model import (
    MAX_TOKENS,
    PROMPTS,
    choices_of,
    greedy_sequence,
    seeded_sequence,
)
from tests.support.tiny_models import ARCHITECTURES, tiny_model

CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ],
)
DEVICES = ["cpu", CUDA]
# Relative to the largest reference logit: float32 agrees to rounding; bf16 to its 8-bit mantissa.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def _runner(
    model, max_model_len=512, max_batch_size=4, num_blocks=300, prefix_caching=True, **options
) -> CudaGraphRunner:
    kv = KVCacheOptions(block_size=16, num_blocks=num_blocks, prefix_caching=prefix_caching)
    return CudaGraphRunner(
        model,
        max_model_len,
        CudaRunnerOptions(max_batch_size=max_batch_size, max_num_batched_tokens=1024, **options),
        kv,
    )


def _worker(runner: CudaGraphRunner, launch_ahead: bool = False) -> Worker:
    return Worker(
        runner,
        SchedulerLimits(
            max_num_seqs=4, max_batch_size=4, max_num_batched_tokens=256, chunked_prefill=False
        ),
        deliver=lambda results: None,
        launch_ahead=launch_ahead,
    )


def _reference(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0, -1].float()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    scale = expected.abs().max()
    error = (actual.float() - expected).abs().max()
    assert error <= TOLERANCE[dtype] * scale, (
        f"max error {float(error):.3g} vs scale {float(scale):.3g}"
    )


def _assert_each_equals_its_solo_run(model, sequences, device: str) -> None:
    """transformers' own greedy decoding of each prompt alone, stopping at token 0 as the sequences do."""
    for sequence in sequences:
        with torch.no_grad():
            expected = model.generate(
                torch.tensor([sequence.prompt_ids], device=device),
                do_sample=False,
                max_new_tokens=sequence.max_tokens,
                eos_token_id=0,
                pad_token_id=0,
            )[0, len(sequence.prompt_ids) :].tolist()
        assert sequence.output_ids == expected, sequence.request_id


def _dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_teacher_forced_logits_match_transformers_at_every_step(device, architecture):
    """A batch of mixed-length prompts prefilled together, then decoded (graphs on CUDA) with the
    reference's own tokens fed back: every step's logits against a full transformers forward."""
    for dtype in _dtypes(device):
        model = tiny_model(architecture, dtype=dtype).to(device)
        runner = _runner(model)
        prompts = [
            list(range(10, 50)),
            list(range(60, 95)),
            [7] * 44,
        ]  # close lengths: one padded batch
        tables = scattered_tables([len(p) + 8 for p in prompts])
        chunks = [PrefillChunk(table, p, 0) for table, p in zip(tables, prompts)]
        for logits, prompt in zip(runner.prefill_many(chunks), prompts):
            _assert_close(logits, _reference(model, prompt), dtype)
        sequences = [list(p) + [int(_reference(model, p).argmax())] for p in prompts]
        for _ in range(6):
            logits = runner.decode(
                tables, [s[-1] for s in sequences], [len(s) - 1 for s in sequences]
            )
            for row, sequence in enumerate(sequences):
                expected = _reference(model, sequence)
                _assert_close(logits[row], expected, dtype)
                sequence.append(int(expected.argmax()))


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_tokens_equal_transformers_generate_in_float32(device):
    model = tiny_model("qwen2", dtype=torch.float32).to(device)
    runner = _runner(model)
    prompt = list(range(20, 60))
    table = [12, 3, 7, 30]
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([prompt], device=device),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    tokens = [int(runner.prefill(table, prompt, 0).argmax())]
    for step in range(15):
        tokens.append(int(runner.decode([table], [tokens[-1]], [len(prompt) + step]).argmax()))
    assert tokens == expected


@pytest.mark.parametrize("device", DEVICES)
def test_a_shared_prefix_gives_the_same_logits_as_computing_it(device):
    """A second prompt continuing from the first one's cached blocks (what a prefix-cache hit does):
    transformers' logits, to float32 rounding on the CPU and to bf16's on a GPU."""
    for dtype in _dtypes(device):
        model = tiny_model("llama", dtype=dtype).to(device)
        shared = list(range(3, 3 + 64))  # four full blocks: a template and documents, say
        first, second = shared + [101, 102, 103], shared + [150, 151]
        runner = _runner(model)
        runner.prefill([5, 9, 2, 14, 20], first, 0)
        second_table = [5, 9, 2, 14, 33]  # the four shared blocks, then its own
        logits = runner.prefill(second_table, second[64:], 64)
        _assert_close(logits, _reference(model, second), dtype)
        token = int(logits.argmax())
        after = runner.decode(
            [[5, 9, 2, 14, 20], second_table], [0, token], [len(first), len(second)]
        )[1]
        _assert_close(after, _reference(model, second + [token]), dtype)


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_prefill_graphs_match_transformers_for_padded_lengths(device, architecture):
    """Prompts padded up to their captured bucket, whole and as a continuation of a cached prefix
    (the reused-RAG-prefix case): the real rows' logits are transformers' own."""
    for dtype in _dtypes(device):
        model = tiny_model(architecture, dtype=dtype).to(device)
        runner = _runner(model)
        for length, more in ((1, 1), (17, 15), (32, 33), (33, 64), (200, 7), (440, 70)):
            prompt = [(7 * i + 3) % 200 + 1 for i in range(length)]
            table = scattered_tables([length + more, 100], first=40)[0]
            logits = runner._prefill_graphs.run(table, prompt, 0)
            assert logits is not None, f"no graph for {length} tokens"
            _assert_close(logits, _reference(model, prompt), dtype)
            continuation = [(11 * i + 5) % 200 + 1 for i in range(more)]
            logits = runner._prefill_graphs.run(table, continuation, length)
            assert logits is not None, f"no graph for {more} tokens after {length}"
            _assert_close(logits, _reference(model, prompt + continuation), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_a_continuation_longer_than_any_graph_runs_eagerly_and_matches(device):
    """A chunked prefill's later chunk (or a long question after a reused prefix) past the largest
    continuation graph: the eager path with the same attention kernel."""
    for dtype in _dtypes(device):
        model = tiny_model("qwen2", dtype=dtype).to(device)
        runner = _runner(model, max_model_len=2048)  # graphs up to the step budget, 1,024 tokens
        prompt = [(5 * i + 2) % 200 + 1 for i in range(1500)]
        table = list(range(200, 100, -1))
        runner.prefill(table, prompt[:300], 0)
        if device == "cuda":
            assert (
                runner._prefill_graphs.run(table, prompt[300:], 300) is None
            )  # 1,200 tokens: no graph
        _assert_close(runner.prefill(table, prompt[300:], 300), _reference(model, prompt), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_sequences_joining_and_leaving_mid_batch_match_solo(device):
    """Continuous batching over the paged cache: arrivals at different steps, blocks freed as sequences
    leave, prefix blocks shared among prompts that share a start; each equals its solo run."""
    model = tiny_model("llama", seed=3).to(device)
    worker = _worker(_runner(model))
    shared = list(range(30, 30 + 72))
    prompts = PROMPTS + [shared + [5, 6], shared + [9]]
    max_tokens = MAX_TOKENS + [10, 10]
    sequences = [
        greedy_sequence(f"r{i}", p, m) for i, (p, m) in enumerate(zip(prompts, max_tokens))
    ]
    arrivals = {
        0: sequences[:2],
        2: sequences[2:4],
        3: sequences[4:5],
        5: sequences[6:7],
        6: sequences[5:6],
        9: sequences[7:],
    }
    for step in range(400):
        for sequence in arrivals.pop(step, []):
            worker.submit(sequence)
        worker.run_once()
        if not arrivals and not worker.scheduler.running and not worker.scheduler.waiting:
            break
    assert worker.scheduler.blocks.pool.hits >= 64
    _assert_each_equals_its_solo_run(model, sequences, device)


def test_batched_filtering_equals_row_by_row():
    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 3
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=20),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.9, min_p=0.05),
        SamplingParams(temperature=0.5, top_k=50, top_p=0.9, min_p=0.01),
    ]
    batched = filtered_probabilities_batched(logits, params)
    for row, row_params in enumerate(params):
        assert torch.allclose(
            batched[row], filtered_probabilities(logits[row], row_params), atol=1e-6
        )


@pytest.mark.parametrize("device", [CUDA])
def test_a_cache_that_does_not_fit_is_refused_at_start(device):
    model = tiny_model("llama").to(device)
    with pytest.raises(ModelLoadError, match="less than one .*-token context window"):
        CudaGraphRunner(
            model,
            512,
            CudaRunnerOptions(max_batch_size=4, max_num_batched_tokens=1024),
            KVCacheOptions(memory_bytes=1 << 16),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_preemption_with_steps_launched_ahead_gives_the_same_tokens(device):
    """A pool barely over one context window: sequences are preempted and recomputed while steps
    are launched ahead; every output equals its solo run and every block comes back."""
    model = tiny_model("llama", seed=3).to(device)
    worker = _worker(_runner(model, num_blocks=40), launch_ahead=True)
    prompts = [[(7 * i + r) % 200 + 1 for i in range(100 + 20 * r)] for r in range(4)]
    sequences = [greedy_sequence(f"r{r}", prompt, 60) for r, prompt in enumerate(prompts)]
    for sequence in sequences:
        sequence.stop_token_ids = frozenset()
    for sequence in sequences:
        worker.submit(sequence)
    for _ in range(2000):
        worker.run_once()
        if not worker.scheduler.running and not worker.scheduler.waiting:
            break
    assert worker.scheduler.blocks.num_preemptions > 0
    for sequence in sequences:
        with torch.no_grad():
            expected = model.generate(
                torch.tensor([sequence.prompt_ids], device=device),
                do_sample=False,
                max_new_tokens=60,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(sequence.prompt_ids) :]
        assert sequence.output_ids == expected.tolist(), sequence.request_id
    assert worker.scheduler.blocks.pool.num_free == worker.scheduler.blocks.pool.num_usable


@pytest.mark.parametrize("device", DEVICES)
def test_steps_launched_ahead_give_the_same_tokens(device):
    """The next decode step launched before this one's tokens are read back (what the GPU path does),
    with sequences finishing, joining and being aborted mid-run: every output equals its solo run."""
    model = tiny_model("llama", seed=3).to(device)
    worker = _worker(_runner(model), launch_ahead=True)
    sequences = [
        greedy_sequence(f"r{i}", p, m) for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS))
    ]
    doomed = greedy_sequence("aborted", [3, 1, 4, 1, 5], 40)
    arrivals = {0: sequences[:2] + [doomed], 3: sequences[2:4], 7: sequences[4:]}
    launched_ahead = 0
    for step in range(400):
        for sequence in arrivals.pop(step, []):
            worker.submit(sequence)
        if step == 5:
            worker.abort("aborted")
        worker.run_once()
        launched_ahead += worker._ahead is not None
        if not arrivals and not worker.scheduler.running and not worker.scheduler.waiting:
            break
    assert launched_ahead > 10
    _assert_each_equals_its_solo_run(model, sequences, device)


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_with_steps_launched_ahead_are_the_models_own(device):
    """Rows asking for logprobs beside rows that do not: their scores equal transformers' log_softmax,
    the other rows' tokens are unchanged, and steps are launched ahead once no row needs scores."""
    model = tiny_model("llama", seed=3).to(device)
    worker = _worker(_runner(model), launch_ahead=True)
    plain = [greedy_sequence(f"plain{i}", p, 30) for i, p in enumerate(PROMPTS[:2])]
    for sequence in plain:
        sequence.stop_token_ids = frozenset()
    scored = greedy_sequence("scored", PROMPTS[2], 8)
    scored.params = SamplingParams(temperature=0.0, logprobs=3)
    scored.token_text = str
    entries, launched_ahead = [], 0
    for sequence in (*plain, scored):
        worker.submit(sequence)
    for _ in range(100):
        entries += [
            e for s, item in worker.run_once() if s is scored for e in (item.logprobs or ())
        ]
        launched_ahead += worker._ahead is not None
        if not worker.scheduler.running:
            break
    assert launched_ahead > 0 and len(entries) == len(scored.output_ids)
    ids = list(scored.prompt_ids)
    for entry, token in zip(entries, scored.output_ids):
        logprobs = torch.log_softmax(_reference(model, ids), dim=-1)
        assert entry.token == str(token) and abs(entry.logprob - float(logprobs[token])) < 1e-3
        assert [int(t) for t, _ in entry.top] == torch.topk(logprobs, 3).indices.tolist()
        ids.append(token)
    _assert_each_equals_its_solo_run(model, [scored], device)


@pytest.mark.parametrize("device", DEVICES)
def test_choices_share_one_prefill_and_each_equals_its_solo_run(device):
    """n choices over the paged cache, steps launched ahead: the followers share the leader's prompt
    blocks, and choice i samples exactly as a single request with seed + i does."""
    model = tiny_model("llama", seed=3).to(device)
    prompt = list(range(40, 80))

    def worker() -> Worker:
        return _worker(_runner(model), launch_ahead=True)

    def run(sequences, engine) -> None:
        for sequence in sequences:
            engine.submit(sequence)
        for _ in range(400):
            engine.run_once()
            if not engine.scheduler.running and not engine.scheduler.waiting:
                return
        raise AssertionError("did not drain")

    def on_device(sequence):  # the engine makes seeded generators where the logits are
        sequence.generator = torch.Generator(device=device).manual_seed(sequence.params.seed)
        return sequence

    solos = [on_device(seeded_sequence(f"solo{seed}", prompt, 12, seed)) for seed in (21, 22, 23)]
    for solo in solos:
        run([solo], worker())
    choices = [on_device(choice) for choice in choices_of("r", prompt, 12, [21, 22, 23])]
    plain = greedy_sequence("plain", [1, 2, 3], 12)
    run([plain, choices[0]], worker())
    assert [c.output_ids for c in choices] == [s.output_ids for s in solos]
    _assert_each_equals_its_solo_run(model, [plain], device)


@pytest.mark.parametrize("device", [CUDA])
def test_split_decode_attention_equals_one_pass_and_the_plain_twin(device):
    """Partitions of a long context attended in parallel and combined: the same output as one pass
    over the keys and as PyTorch's attention over the gathered cache, in float32 and bf16."""
    from ragllm.engines.inprocess.layers.attention import decode_attention

    torch.manual_seed(0)
    heads, kv_heads, head_dim, block = 6, 2, 64, 16
    positions = torch.tensor([0, 700, 1500, 3001, 4095], device=device)
    tables = torch.stack(
        [torch.randperm(600, device=device)[:256] + 1 for _ in positions]
    )  # 4,096 positions each
    for dtype in (torch.float32, torch.bfloat16):
        keys = torch.randn(601, kv_heads, block, head_dim, device=device, dtype=dtype)
        values = torch.randn_like(keys)
        qkv = torch.randn(
            len(positions), (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype
        )
        args = (qkv, keys, values, tables, positions, heads, kv_heads, head_dim)
        split, one_pass = decode_attention(*args, split=True), decode_attention(*args, split=False)
        plain = decode_attention(
            qkv.cpu(),
            keys.cpu(),
            values.cpu(),
            tables.cpu(),
            positions.cpu(),
            heads,
            kv_heads,
            head_dim,
        )
        _assert_close(split.cpu(), plain.float(), dtype)
        _assert_close(one_pass.cpu(), plain.float(), dtype)


@pytest.mark.parametrize("device", [CUDA])
def test_long_context_decode_graphs_match_transformers(device):
    """Decode past ``split_from`` positions replays the split-attention graphs; logits stay transformers'."""
    for dtype in _dtypes(device):
        model = tiny_model("qwen2", dtype=dtype).to(device)
        runner = _runner(model, max_model_len=4096, num_blocks=600)
        prompts = [
            [(3 * i + r) % 200 + 1 for i in range(length)]
            for r, length in enumerate((1500, 40, 2100))
        ]
        tables = scattered_tables([len(p) + 8 for p in prompts])
        for table, prompt in zip(tables, prompts):
            runner.prefill(table, prompt, 0)
        sequences = [list(p) + [int(_reference(model, p).argmax())] for p in prompts]
        for _ in range(3):
            logits = runner.decode(
                tables, [s[-1] for s in sequences], [len(s) - 1 for s in sequences]
            )
            for row, sequence in enumerate(sequences):
                expected = _reference(model, sequence)
                _assert_close(logits[row], expected, dtype)
                sequence.append(int(expected.argmax()))


@pytest.mark.parametrize("device", [CUDA])
def test_one_stream_decodes_over_short_partitions_like_transformers(device):
    """One row from 150 positions on: its attention runs in 64-key partitions (a single row splits from
    ``SPLIT_FEW_FROM`` keys), replayed from the split graph; logits stay transformers'."""
    from ragllm.engines.inprocess.layers.attention import FEW_ROWS_PARTITION, split_from

    assert split_from(1) <= 150 and FEW_ROWS_PARTITION < 150
    for dtype in _dtypes(device):
        model = tiny_model("qwen2", dtype=dtype).to(device)
        runner = _runner(model, max_model_len=4096, num_blocks=600)
        prompt = [(7 * i + 3) % 200 + 1 for i in range(150)]
        table = scattered_tables([len(prompt) + 8])[0]
        runner.prefill(table, prompt, 0)
        sequence = list(prompt) + [int(_reference(model, prompt).argmax())]
        for _ in range(3):
            logits = runner.decode([table], [sequence[-1]], [len(sequence) - 1])
            expected = _reference(model, sequence)
            _assert_close(logits[0], expected, dtype)
            sequence.append(int(expected.argmax()))


@pytest.mark.parametrize("device", [CUDA])
def test_a_question_after_a_long_cached_prefix_matches_transformers(device):
    """A continuation whose attention spans several key partitions (thousands of cached positions),
    replayed from a continuation graph and run eagerly: transformers' logits either way."""
    for dtype in _dtypes(device):
        model = tiny_model("llama", dtype=dtype).to(device)
        runner = _runner(model, max_model_len=4096, num_blocks=600)
        documents = [(13 * i + 7) % 200 + 1 for i in range(3000)]
        table = scattered_tables([3700, 90])[0]
        runner.prefill(table, documents, 0)
        for question in (
            [5, 9, 11] * 13,
            [(3 * i) % 200 + 1 for i in range(600)],
        ):  # a graph, then eager
            _assert_close(
                runner.prefill(table, question, 3000),
                _reference(model, documents + question),
                dtype,
            )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_steps_queued_far_ahead_each_read_their_own_inputs():
    """Fifty graph steps queued without reading anything back (the host far ahead of the GPU): each
    step's logits (copied before the next replay overwrites them) are the eager runner's."""
    model = tiny_model("llama", dtype=torch.bfloat16).to("cuda")
    ids = torch.randint(1, 211, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    results = {}
    for graphs in (True, False):
        runner = _runner(model, cuda_graphs=graphs)
        table = list(range(1, 20))
        steps = [runner.prefill(table, ids[:150], 0).float().clone()]
        steps += [runner.decode([table], [ids[p]], [p])[0].float().clone() for p in range(150, 200)]
        results[graphs] = torch.stack(steps)
    scale = results[False].abs().max()
    assert (results[True] - results[False]).abs().max() <= 1e-2 * scale


@pytest.mark.parametrize("device", DEVICES)
def test_a_blend_with_every_token_recomputed_matches_the_fused_prefill(device):
    """Document reuse on the CUDA path's runner: a document stored after the context, placed at a
    new position behind another and blended with the whole share recomputed, gives the logits of
    the runner's own prefill of the same prompt."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_model("qwen2", seed=4, dtype=dtype).to(device)
    runner = _runner(model)
    runner.blender.share = 1.0
    context, first, second, question = [3] * 21, list(range(30, 70)), list(range(80, 113)), [9, 8]
    # ``second`` stored right after the context, in blocks 40.. (the context's blocks 1-2 shared).
    runner.prefill([1, 2], context, 0)
    runner.copy_block(2, 40)
    runner.prefill([1, 40, 41, 42], second, len(context))
    stored = StoredDocument((40, 41, 42), (), len(context) % 16, len(context), len(second))
    prompt = context + first + second + question
    table = list(range(100, 100 + -(-len(prompt) // 16)))
    runner.prefill(table, context, 0)
    span = DocumentSpan(len(context) + len(first), len(context) + len(first) + len(second), b"", 21)
    blend = DocumentBlend([DocumentPlacement(span, stored, fill=False)])
    blended = runner.blend(table, prompt, len(context), blend)
    expected = runner.prefill(list(range(200, 200 + len(table))), prompt, 0)
    scale = expected.abs().max()
    torch.testing.assert_close(blended / scale, expected / scale, atol=TOLERANCE[dtype], rtol=0)
    assert blend.placements[0].recomputed == len(second)


@pytest.mark.parametrize("device", DEVICES)
def test_documents_filled_as_whole_prompts_store_what_a_continued_prefill_stores(device):
    """The CUDA runner fills missing documents as whole prompts in one batch (the short context
    computed again before each); their stored keys and values are those of a prefill continued
    from the prompt's own context blocks."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_model("qwen2", seed=5, dtype=dtype).to(device)
    context, documents = [3] * 21, [list(range(30, 70)), list(range(80, 118))]
    prompt = context + documents[0] + documents[1] + [9, 8]
    stored_kv = {}
    for batched in (True, False):
        runner = _runner(model)
        runner.batches_whole_prompts = batched
        padded_batches = []
        real_padded = runner._prefill_padded
        runner._prefill_padded = lambda chunks: padded_batches.append(chunks) or real_padded(chunks)
        table = list(range(100, 100 + -(-len(prompt) // 16)))
        runner.prefill(table, context, 0)
        placements, start = [], len(context)
        for index, document in enumerate(documents):
            blocks = tuple(range(40 + 10 * index, 43 + 10 * index))
            stored = StoredDocument(blocks, (), len(context) % 16, len(context), len(document))
            span = DocumentSpan(start, start + len(document), bytes([index]), len(context))
            placements.append(DocumentPlacement(span, stored, fill=True))
            start += len(document)
        runner.blend(table, prompt, len(context), DocumentBlend(placements))
        cache = runner.cache
        rows = torch.cat(
            [
                cache.rows_of(p.stored.blocks, p.stored.offset, p.stored.offset + p.span.length)
                for p in placements
            ]
        )
        stored_kv[batched] = cache.storage[:, :, rows // 16, :, rows % 16].float().clone()
        assert [len(chunks) for chunks in padded_batches] == ([2] if batched else [])
    scale = stored_kv[False].abs().max()
    torch.testing.assert_close(
        stored_kv[True] / scale, stored_kv[False] / scale, atol=TOLERANCE[dtype], rtol=0
    )
