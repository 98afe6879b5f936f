"""The model runner on CUDA (bf16 and float32) against transformers' forward. Run on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from ragllm.engines.inprocess.runner.cpu import KVCacheOptions, ModelRunner
from tests.support.block_tables import scattered_tables
from tests.support.tiny_models import ARCHITECTURES, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _reference(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids], device="cuda")).logits[0, -1].float()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-3), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_cuda_prefill_and_batched_decode_match_transformers(architecture, dtype, tolerance):
    model = tiny_model(architecture, dtype=dtype).to("cuda")
    runner = ModelRunner(model, max_model_len=512, kv=KVCacheOptions(num_blocks=100))
    prompts = [[1, 2, 3, 4], list(range(10, 50)), [7] * 100]
    tables = scattered_tables([len(p) + 6 for p in prompts])
    sequences = [list(p) for p in prompts]
    for row, prompt in enumerate(prompts):
        logits = runner.prefill(tables[row], prompt, 0)
        scale = _reference(model, prompt).abs().max()
        assert (logits - _reference(model, prompt)).abs().max() <= tolerance * scale
        sequences[row].append(int(logits.argmax()))
    for _ in range(5):
        logits = runner.decode(tables, [s[-1] for s in sequences], [len(s) - 1 for s in sequences])
        for row, sequence in enumerate(sequences):
            expected = _reference(model, sequence)
            assert (logits[row] - expected).abs().max() <= tolerance * expected.abs().max()
            sequence.append(int(expected.argmax()))


def test_cuda_greedy_tokens_equal_transformers_generate_in_float32():
    model = tiny_model("qwen2", dtype=torch.float32).to("cuda")
    runner = ModelRunner(model, max_model_len=512, kv=KVCacheOptions(num_blocks=100))
    prompt = list(range(20, 60))
    table = [9, 2, 31, 4]
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([prompt], device="cuda"),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    tokens = [int(runner.prefill(table, prompt, 0).argmax())]
    for step in range(11):
        tokens.append(int(runner.decode([table], [tokens[-1]], [len(prompt) + step]).argmax()))
    assert tokens == expected
