"""The runner for a loaded model: the reference runner on a CPU, the fused one with CUDA graphs on a
GPU, both over a paged KV cache sized from the engine's settings."""

from __future__ import annotations

from typing import Any

from ragllm.checkpoints import resolved_kv_cache_dtype
from ragllm.config import EngineSettings


def build_runner(
    model: Any, device: Any, max_model_len: int, model_path: str, settings: EngineSettings
) -> Any:
    # Imported here: they import torch, which `import ragllm` must not.
    from ragllm.engines.inprocess.runner.cpu import KVCacheOptions, ModelRunner, kv_storage_dtype

    kv = KVCacheOptions(
        block_size=settings.block_size,
        num_blocks=settings.num_kv_blocks,
        memory_bytes=settings.kv_cache_memory_bytes,
        prefix_caching=settings.enable_prefix_caching,
        dtype=kv_storage_dtype(resolved_kv_cache_dtype(settings.kv_cache_dtype, model_path)),
        document_recompute_share=settings.document_kv_recompute_share,
    )
    if device.type != "cuda":
        return ModelRunner(model, max_model_len, kv)
    from ragllm.engines.inprocess.runner.cuda import CudaGraphRunner, CudaRunnerOptions

    options = CudaRunnerOptions(
        max_batch_size=settings.max_batch_size,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        cuda_graphs=settings.cuda_graphs,
    )
    return CudaGraphRunner(model, max_model_len, options, kv)
