"""What the GPU benchmarks share: random prompts, the timing of device work, the device's copy bandwidth
and block tables for driving a runner directly."""

from __future__ import annotations

import random
import time

import torch

PROMPT_TOKENS = 128
DECODE_TOKENS = 256
TTFT_ATTEMPTS = (
    5  # TTFT is reported as the median of this many prompts; single-stream rate as that of 3
)


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


def copy_bandwidth() -> float:
    """Device memory bandwidth in bytes/s, from a large device-to-device copy (read + write)."""
    source = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    torch.cuda.synchronize()
    return 2 * source.numel() * 10 / (time.perf_counter() - start)


def timed(function) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def block_tables(runner, rows: int, length: int) -> list[list[int]]:
    """Disjoint block tables for ``rows`` sequences of ``length`` positions (the engine is idle: any
    block may be written)."""
    width = runner.blocks_for(length)
    return [list(range(1 + row * width, 1 + (row + 1) * width)) for row in range(rows)]
