"""Prefill of one sequence replayed as a CUDA graph, for prompt lengths up to a few thousand tokens.

Measured need (H100, Qwen2.5-1.5B): launching a prefill's ~300 kernels took 15-27 ms of host time
for 512 or 2,048 tokens alike, while the device needs 3.8 ms and 12.4 ms for them; the time to first
token was the launch time. A graph is captured per length bucket and replayed with the prompt padded
to its bucket: rows past the prompt write to the scratch block and their logits are never read.

Two kinds of graph: a whole prompt (``start == 0``: causal attention within the chunk), and the rest
of a prompt whose prefix is already cached (a reused RAG prefix: attention reads the sequence's
blocks through its block table, an input of the graph).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Whole prompts: powers of two up to 512, then every 256 up to 2,048 and every 512 up to 4,096, so
# padding adds at most a quarter of a prompt. Past 4,096 tokens the device time outweighs the
# launches and the eager path is as fast.
_WHOLE_BUCKETS = (32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096)
# Continuations after a cached prefix: usually the question and the template's tail, but a prompt that
# shares only its first blocks with an earlier one continues for thousands of tokens (run eagerly, a
# 1,536-token continuation took 19 ms to its first token against 12 ms for the whole prompt as a graph).
_CONTINUATION_BUCKETS = (16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)

# forward(ids, positions, write rows, last, block table, whole) → logits [1, vocab] of the token at ``last``
PrefillForward = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor
]


def graph_buckets(limit: int, whole: bool) -> list[int]:
    """The bucket lengths captured, none longer than ``limit`` (the prefill budget, the context)."""
    return [b for b in (_WHOLE_BUCKETS if whole else _CONTINUATION_BUCKETS) if b <= limit]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: (
        torch.Tensor
    )  # on the device: ids, positions, write rows, index of the last token, block table
    logits: torch.Tensor  # [1, vocab]


class PrefillGraphs:
    def __init__(self, limit: int, table_width: int, block_size: int, device: torch.device) -> None:
        self._table_width = table_width
        self._block_size = block_size
        self._device = device
        self._buckets = {whole: graph_buckets(limit, whole) for whole in (True, False)}
        self._graphs: dict[tuple[bool, int], _Graph] = {}

    @torch.inference_mode()  # nothing recorded for autograd: it would keep every activation alive
    def capture(self, forward: PrefillForward, side: torch.cuda.Stream, pool: tuple) -> None:
        """Capture ``forward`` on ``side`` (not the default stream) into the memory ``pool`` of the runner's
        other graphs. The forward is not kept: a runner that held itself through it would only be freed
        by the cycle collector, at any time, possibly in the middle of another runner's capture."""
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):  # capture must not run on the default stream
            for whole, buckets in self._buckets.items():
                for bucket in reversed(
                    buckets
                ):  # the largest first: the others reuse its pool memory
                    self._graphs[(whole, bucket)] = self._capture_one(
                        forward, whole, bucket, pool, side
                    )
        torch.cuda.current_stream(self._device).wait_stream(side)
        torch.cuda.synchronize(self._device)
        logger.info(
            "captured %d prefill graphs (whole prompts %s, continuations %s)",
            len(self._graphs),
            self._buckets[True],
            self._buckets[False],
        )

    def _capture_one(
        self,
        forward: PrefillForward,
        whole: bool,
        bucket: int,
        pool: tuple,
        stream: torch.cuda.Stream,
    ) -> _Graph:
        # Zeros: warm-up and capture write only to the scratch block.
        inputs = torch.zeros(
            3 * bucket + 1 + self._table_width, dtype=torch.long, device=self._device
        )
        ids, positions, rows, last, table = _views(inputs, bucket)
        if whole:
            positions.copy_(torch.arange(bucket))
        forward(
            ids, positions, rows, last, table, whole
        )  # warm-up: lazy workspaces, kernel selection
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            logits = forward(ids, positions, rows, last, table, whole)
        return _Graph(graph, inputs, logits)

    @torch.inference_mode()  # the graphs' inputs were made in it, and only it may write them
    def run(self, block_table: list[int], token_ids: list[int], start: int) -> torch.Tensor | None:
        """The logits [vocab] of the chunk's last token, or None when no graph is that long."""
        whole = start == 0
        buckets = self._buckets[whole]
        length = len(token_ids)
        index = bisect.bisect_left(buckets, length)
        if index == len(buckets):
            return None
        bucket = buckets[index]
        captured = self._graphs[(whole, bucket)]
        # Staged through pinned memory from the caching host allocator: the copy does not wait for
        # work queued before it, and the buffer is not handed out again until the copy has run.
        host = torch.empty(3 * bucket + 1 + self._table_width, dtype=torch.long, pin_memory=True)
        ids, positions, rows, last, table = _views(host.numpy(), bucket)
        ids[:length] = token_ids
        ids[length:] = 0
        if whole:
            positions[:] = np.arange(bucket)
        else:
            positions[:length] = np.arange(start, start + length)
            positions[length:] = start  # padding rows attend to a short span and are discarded
        table[: len(block_table)] = block_table
        table[len(block_table) :] = 0
        real = positions[:length]
        rows[:length] = table[real // self._block_size] * self._block_size + real % self._block_size
        rows[length:] = 0  # padding rows write into the scratch block
        last[0] = length - 1
        captured.inputs.copy_(host, non_blocking=True)
        captured.graph.replay()
        # The graph's output is overwritten by its next replay, possibly before this one is sampled.
        return captured.logits[0].clone()


def _views(flat, bucket: int):
    """ids, positions, write rows, last index, block table"""
    return (
        flat[:bucket],
        flat[bucket : 2 * bucket],
        flat[2 * bucket : 3 * bucket],
        flat[3 * bucket : 3 * bucket + 1],
        flat[3 * bucket + 1 :],
    )
