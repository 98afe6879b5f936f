"""Our slot-cache forward passes against transformers' own forward, on tiny random models."""

from __future__ import annotations

import pytest
import torch

from ragllm.engines.model_runner import ModelRunner
from ragllm.errors import ModelLoadError
from tests.tiny_models import ARCHITECTURES, tiny_model


def _reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_prefill_matches_transformers(architecture):
    model = tiny_model(architecture)
    runner = ModelRunner(model, num_slots=2, max_model_len=512)
    ids = [5, 17, 42, 99, 3, 150, 7, 8, 9, 10]
    torch.testing.assert_close(runner.prefill(1, ids, 0), _reference_logits(model, ids)[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_chunked_prefill_matches_whole_prefill(architecture):
    model = tiny_model(architecture)
    runner = ModelRunner(model, num_slots=1, max_model_len=512)
    ids = list(range(1, 41))
    runner.prefill(0, ids[:16], 0)
    runner.prefill(0, ids[16:30], 16)
    chunked = runner.prefill(0, ids[30:], 30)
    torch.testing.assert_close(chunked, _reference_logits(model, ids)[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_batched_decode_of_mixed_lengths_matches_transformers_at_every_step(architecture):
    model = tiny_model(architecture)
    runner = ModelRunner(model, num_slots=3, max_model_len=512)
    prompts = [[1, 2, 3], list(range(10, 40)), [7] * 300]  # 300 forces the cache to grow
    sequences = [list(p) for p in prompts]
    for slot, prompt in enumerate(prompts):
        runner.prefill(slot, prompt[:-1], 0)
    for _ in range(6):  # teacher-forced: feed tokens of our choosing, compare every step's logits
        logits = runner.decode(0, [s[-1] for s in sequences], [len(s) - 1 for s in sequences])
        for row, sequence in enumerate(sequences):
            torch.testing.assert_close(logits[row], _reference_logits(model, sequence)[-1], atol=1e-4, rtol=1e-4)
            sequence.append((sequence[-1] * 7 + row) % 200 + 1)


def test_slot_move_keeps_a_sequence_intact():
    model = tiny_model("llama")
    runner = ModelRunner(model, num_slots=2, max_model_len=512)
    ids = list(range(1, 20))
    runner.prefill(1, ids[:-1], 0)
    runner.cache.move(1, 0, len(ids) - 1)
    logits = runner.decode(0, [ids[-1]], [len(ids) - 1])
    torch.testing.assert_close(logits[0], _reference_logits(model, ids)[-1], atol=1e-4, rtol=1e-4)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel is not supported"):
        ModelRunner(model, num_slots=1, max_model_len=64)
