"""How much GPU memory the KV cache may take: what ``gpu_memory_utilization`` allows once the
weights are loaded, less what activations and captured graphs need."""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

GIB = 1 << 30
# Activations, cuBLAS workspaces and graph pools beyond the weights and the KV cache (measured ~1 GiB
# for a 1.5B model with 2,048-token prefills; the rest scales with the prefill budget below).
FIXED_RESERVE_BYTES = 1 * GIB


def kv_cache_budget(
    device: torch.device, config: Any, dtype: torch.dtype, utilization: float, prefill_tokens: int
) -> int:
    """Bytes left for the KV cache. ``prefill_tokens``: the most tokens one forward pass holds
    activations for (the step budget plus the largest captured prefill graph's pool)."""
    free, total = torch.cuda.mem_get_info(device)
    allowed = utilization * total - (total - free)  # the weights are already in
    # Eager prefill's activations, plus the graph pool that keeps the largest captured prefill's
    # (measured for Qwen2.5-1.5B up to 4,096 tokens: 360 MiB against 258 estimated here; the fixed
    # reserve covers the difference).
    per_token = (4 * config.hidden_size + 3 * config.intermediate_size) * dtype.itemsize
    reserve = FIXED_RESERVE_BYTES + prefill_tokens * per_token
    budget = int(allowed - reserve)
    logger.info(
        "GPU memory: %.1f GiB total, %.1f GiB allowed after the weights, %.1f GiB reserved for "
        "activations: %.2f GiB for the KV cache",
        total / GIB,
        allowed / GIB,
        reserve / GIB,
        max(budget, 0) / GIB,
    )
    return max(budget, 0)
