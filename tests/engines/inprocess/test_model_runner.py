"""Our paged-cache forward passes against transformers' own forward, on tiny random models."""

from __future__ import annotations

import pytest
import torch

from ragllm.engines.inprocess.runner.cpu import KVCacheOptions, ModelRunner
from ragllm.errors import ModelLoadError
from tests.support.block_tables import scattered_tables
from tests.support.tiny_models import ARCHITECTURES, tiny_model

KV = KVCacheOptions(block_size=16, num_blocks=200)


def _reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_prefill_matches_transformers(architecture):
    model = tiny_model(architecture)
    runner = ModelRunner(model, max_model_len=512, kv=KV)
    ids = [5, 17, 42, 99, 3, 150, 7, 8, 9, 10]
    torch.testing.assert_close(
        runner.prefill([7], ids, 0), _reference_logits(model, ids)[-1], atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_chunked_prefill_across_blocks_matches_whole_prefill(architecture):
    model = tiny_model(architecture)
    runner = ModelRunner(model, max_model_len=512, kv=KV)
    ids = list(range(1, 41))
    table = [9, 3, 5]  # out of order on purpose
    runner.prefill(table, ids[:16], 0)
    runner.prefill(table, ids[16:30], 16)
    chunked = runner.prefill(table, ids[30:], 30)
    torch.testing.assert_close(chunked, _reference_logits(model, ids)[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_batched_decode_of_mixed_lengths_matches_transformers_at_every_step(architecture):
    model = tiny_model(architecture)
    runner = ModelRunner(model, max_model_len=512, kv=KV)
    prompts = [[1, 2, 3], list(range(10, 40)), [7] * 300]
    tables = scattered_tables([len(p) + 6 for p in prompts])
    sequences = [list(p) for p in prompts]
    for table, prompt in zip(tables, prompts):
        runner.prefill(table, prompt[:-1], 0)
    for _ in range(6):  # teacher-forced: feed tokens of our choosing, compare every step's logits
        logits = runner.decode(tables, [s[-1] for s in sequences], [len(s) - 1 for s in sequences])
        for row, sequence in enumerate(sequences):
            torch.testing.assert_close(
                logits[row], _reference_logits(model, sequence)[-1], atol=1e-4, rtol=1e-4
            )
            sequence.append((sequence[-1] * 7 + row) % 200 + 1)


def test_a_shared_prefix_block_and_a_copied_partial_block_serve_a_second_sequence():
    model = tiny_model("llama")
    runner = ModelRunner(model, max_model_len=512, kv=KV)
    prompt = list(range(1, 21))  # one full block and four positions of the next
    runner.prefill([4, 8], prompt, 0)
    runner.copy_block(8, 11)
    token = int(_reference_logits(model, prompt)[-1].argmax())
    logits = runner.decode([[4, 11]], [token], [len(prompt)])
    torch.testing.assert_close(
        logits[0], _reference_logits(model, prompt + [token])[-1], atol=1e-4, rtol=1e-4
    )


def test_a_pool_smaller_than_one_context_window_is_refused():
    with pytest.raises(ModelLoadError, match="cannot hold one sequence"):
        ModelRunner(
            tiny_model("llama"), max_model_len=512, kv=KVCacheOptions(block_size=16, num_blocks=20)
        )
    with pytest.raises(ModelLoadError, match="less than one 512-token context window"):
        ModelRunner(tiny_model("llama"), max_model_len=512, kv=KVCacheOptions(memory_bytes=1000))


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel is not supported"):
        ModelRunner(model, max_model_len=64)
