"""The fp8 (e4m3) KV cache: half the bytes of a bf16 cache, values back within e4m3's precision,
saturation instead of NaN, and a model's logits within a measured tolerance of the full-precision
cache's (on the CPU's twins and, as ``cuda`` cases, the Triton kernels on a GPU)."""

from __future__ import annotations

import pytest
import torch

from ragllm.engines.inprocess.kv.paged_cache import FP8, FP8_MAX, PagedKVCache
from ragllm.engines.inprocess.runner.cpu import KVCacheOptions, ModelRunner, kv_storage_dtype
from ragllm.engines.inprocess.runner.cuda import CudaGraphRunner, CudaRunnerOptions
from ragllm.errors import ModelLoadError
from tests.support.tiny_models import ARCHITECTURES, tiny_model

ON_CUDA = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
# Measured (prefill of 150 tokens, then 50 teacher-forced decode steps, tiny random models): the
# largest logit difference was 0.4-1.1% of the largest logit on the CPU's twins (float32) and
# 0.8-1.5% through the Triton kernels on an H200 (bf16); greedy choices agreed at 98-100% of steps.
LOGIT_TOLERANCE = {"cpu": 3e-2, "cuda": 3e-2}
# e4m3 keeps 3 mantissa bits: a value rounds to within 2^-4 of itself.
E4M3_RELATIVE_STEP = 2.0**-4


def _cache(dtype: torch.dtype, key_scale: float = 1.0) -> PagedKVCache:
    return PagedKVCache(
        num_layers=1,
        num_blocks=4,
        block_size=16,
        num_kv_heads=2,
        head_dim=32,
        device=torch.device("cpu"),
        dtype=dtype,
        compute_dtype=torch.float32,
        key_scale=key_scale,
        value_scale=key_scale,
    )


def test_values_come_back_within_e4m3_precision_and_scaled():
    for scale in (1.0, 8.0):
        cache = _cache(FP8, scale)
        keys = torch.randn(20, 2, 32) * scale * 10
        rows = torch.arange(20) + 16  # blocks 1 and 2
        cache.write(0, rows, keys, -keys)
        read_keys, read_values = cache.read(0, torch.tensor([[1, 2]]), 20)
        stored = read_keys[0].transpose(0, 1)  # [positions, heads, dim]
        tiny = scale * 2.0**-9  # e4m3's subnormal step, times the scale
        assert ((stored - keys).abs() <= E4M3_RELATIVE_STEP * keys.abs() + tiny).all()
        assert torch.equal(read_values[0].transpose(0, 1), -stored)


def test_out_of_range_values_saturate_rather_than_become_nan():
    cache = _cache(FP8)
    huge = torch.full((1, 2, 32), 1e6)
    cache.write(0, torch.tensor([16]), huge, -huge)
    keys, values = cache.read(0, torch.tensor([[1]]), 1)
    assert torch.equal(keys, torch.full_like(keys, FP8_MAX)) and torch.equal(values, -keys)


def test_an_fp8_block_is_half_a_bf16_block():
    assert PagedKVCache.bytes_per_block(28, 16, 2, 128, FP8) * 2 == PagedKVCache.bytes_per_block(
        28, 16, 2, 128, torch.bfloat16
    )


def test_kv_cache_dtype_names_are_vllms():
    assert kv_storage_dtype("fp8") is FP8 and kv_storage_dtype("fp8_e4m3") is FP8
    assert kv_storage_dtype(None) is None and kv_storage_dtype("auto") is None
    with pytest.raises(ModelLoadError, match="fp8_e5m2"):
        kv_storage_dtype("fp8_e5m2")


def _teacher_forced_logits(runner, ids: list[int], prompt: int) -> torch.Tensor:
    """Each step's logits, copied: a decode graph's output is overwritten by its next replay."""
    table = list(range(1, 20))
    out = [runner.prefill(table, ids[:prompt], 0).float().clone()]
    for position in range(prompt, len(ids)):
        out.append(runner.decode([table], [ids[position]], [position])[0].float().clone())
    return torch.stack(out)


@pytest.mark.parametrize(
    "device, runner_kind",
    [("cpu", "plain"), ("cpu", "cuda-path"), pytest.param("cuda", "cuda-path", marks=ON_CUDA)],
)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_logits_over_an_fp8_cache_stay_near_the_full_precision_caches(
    device, architecture, runner_kind
):
    """The plain runner is the CPU's; on CUDA the engine runs the CUDA path."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_model(architecture).to(device, dtype)
    ids = torch.randint(1, 211, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    logits = {}
    for name, cache_dtype in (("full", None), ("fp8", FP8)):
        kv = KVCacheOptions(block_size=16, num_blocks=100, dtype=cache_dtype)
        if runner_kind == "plain":
            runner = ModelRunner(model, 512, kv)
        else:
            runner = CudaGraphRunner(
                model, 512, CudaRunnerOptions(max_batch_size=4, max_num_batched_tokens=512), kv
            )
        assert runner.cache.storage.dtype == (cache_dtype or dtype)
        logits[name] = _teacher_forced_logits(runner, ids, 150)
    error = (logits["fp8"] - logits["full"]).abs().max() / logits["full"].abs().max()
    assert 0 < error <= LOGIT_TOLERANCE[device]
    agreement = (logits["fp8"].argmax(-1) == logits["full"].argmax(-1)).float().mean()
    assert agreement >= 0.95
