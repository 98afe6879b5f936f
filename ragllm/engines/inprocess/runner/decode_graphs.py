"""Decode steps replayed as CUDA graphs: one graph per batch bucket, one launch per step instead of
~20 kernels per layer, and a second per bucket whose attention splits long contexts into partitions
(chosen once a row's position reaches the bucket's ``attention.split_from``). Rows past the real batch
write to the scratch block and are not read.

The graphs' inputs live at fixed addresses: each row's token, position and flat cache row to write,
and each row's block table. Tables change rarely (a row takes a new block every ``block_size``
steps; the batch changes when sequences join or leave), so they are copied to the device only when
one has changed: a runner tells by the table's identity and length (tables only grow in place).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ragllm.engines.inprocess.layers.attention import split_from

logger = logging.getLogger(__name__)

# forward(inputs [3, bucket]: ids, positions, write rows; tables [bucket, width]; split) → logits [bucket, vocab]
DecodeForward = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def batch_buckets(max_batch_size: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b < max_batch_size]
    return buckets + [max_batch_size]


# Table entries a step may change in place (blocks appended); applied inside the graph, from the same
# host-to-device copy as the step's tokens. More in one step (sequences joining): those rows are copied.
UPDATE_SLOTS = 128


class DecodeGraphs:
    def __init__(
        self, max_batch_size: int, table_width: int, block_size: int, device: torch.device
    ) -> None:
        self.buckets = batch_buckets(max_batch_size)
        self._block_size = block_size
        self._device = device
        largest = self.buckets[-1]
        # One flat buffer: ids, positions and write rows of each row [3, largest] (rows 0: the scratch
        # block), then the table updates [3, UPDATE_SLOTS] (row, column, block).
        size = 3 * largest + 3 * UPDATE_SLOTS
        self._inputs = torch.zeros(size, dtype=torch.long, device=device)
        self._steps = self._inputs[: 3 * largest].view(3, largest)
        self._updates = self._inputs[3 * largest :].view(3, UPDATE_SLOTS)
        # One row more than the batch: unused update slots write there.
        self._tables = torch.zeros(largest + 1, table_width, dtype=torch.long, device=device)
        # Staged through pinned memory: a copy from pageable memory would wait for the device to
        # drain the work queued before it, and the host could no longer run a step ahead. Two
        # buffers in turn, each with an event recorded after the copy that reads it: before a buffer
        # is written again, its last copy must have run. (Measured need: a caller queuing steps
        # without reading any back, three or more ahead, had later steps read earlier steps' inputs.)
        # The scheduler runs at most one step ahead, so the wait is never long there.
        self._staging = [torch.zeros(size, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._staging_read = [torch.cuda.Event() for _ in range(2)] if device.type == "cuda" else []
        self._host_tables = np.zeros((largest, table_width), dtype=np.int64)
        self._staged: list[tuple[list[int] | None, int]] = [
            (None, 0)
        ] * largest  # per row: table, length
        self._num_runs = 0
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._positions = table_width * block_size  # a row's positions are below this

    @property
    def largest(self) -> int:
        return self.buckets[-1]

    @torch.inference_mode()
    def capture(self, forward: DecodeForward, side: torch.cuda.Stream, pool: tuple) -> None:
        self._updates[0].fill_(self.largest)  # warm-up and capture update only the spare row
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):  # capture must not run on the default stream
            for split in (False, True):
                for bucket in reversed(
                    self.buckets
                ):  # the largest first: the others reuse its pool memory
                    if split and self._positions <= split_from(bucket):
                        continue  # its rows never reach the split
                    self._step(forward, bucket, split)  # warm-up: lazy workspaces, kernel selection
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=side):
                        logits = self._step(forward, bucket, split)
                    self._graphs[(bucket, split)] = (graph, logits)
        torch.cuda.current_stream(self._device).wait_stream(side)
        torch.cuda.synchronize(self._device)
        logger.info(
            "captured %d decode graphs (batch %s; split attention for %s)",
            len(self._graphs),
            self.buckets,
            [bucket for bucket, split in self._graphs if split],
        )

    def _step(self, forward: DecodeForward, bucket: int, split: bool) -> torch.Tensor:
        self._tables.index_put_((self._updates[0], self._updates[1]), self._updates[2])
        return forward(self._steps[:, :bucket], self._tables[:bucket], split)

    @torch.inference_mode()
    def run(
        self, tables: Sequence[list[int]], token_ids: list[int] | torch.Tensor, positions: list[int]
    ) -> torch.Tensor:
        batch = len(positions)
        bucket = self.buckets[bisect.bisect_left(self.buckets, batch)]
        turn = self._num_runs % 2
        staging = self._staging[turn]
        if self._num_runs >= 2:
            self._staging_read[turn].synchronize()  # the copy that last read this buffer has run
        self._num_runs += 1
        flat = staging.numpy()
        largest, size = self.largest, self._block_size
        host = flat[: 3 * largest].reshape(3, largest)
        host[1, :batch] = positions
        host[1, batch:bucket] = 0
        host[2, :batch] = [
            table[p // size] * size + p % size for table, p in zip(tables, positions)
        ]
        host[2, batch:bucket] = 0  # padding rows write into the scratch block
        if not isinstance(token_ids, torch.Tensor):
            host[0, :batch] = token_ids
        copied_rows = self._stage_tables(tables, flat[3 * largest :].reshape(3, UPDATE_SLOTS))
        self._inputs.copy_(staging, non_blocking=True)
        self._staging_read[turn].record()
        if isinstance(
            token_ids, torch.Tensor
        ):  # the previous step's choice, never read back to the host
            self._steps[0, :batch].copy_(token_ids)
        if copied_rows:
            # Rows rewritten whole (a sequence joined), up to the longest of them. A pinned copy from
            # the caching host allocator is not handed out again before the copy ran.
            rows, columns = len(tables), max(len(tables[row]) for row in copied_rows)
            staged = torch.from_numpy(
                np.ascontiguousarray(self._host_tables[:rows, :columns])
            ).pin_memory()
            self._tables[:rows, :columns].copy_(staged, non_blocking=True)
        graph, logits = self._graphs[(bucket, max(positions) >= split_from(bucket))]
        graph.replay()
        return logits[:batch]

    def _stage_tables(self, tables: Sequence[list[int]], updates: np.ndarray) -> list[int]:
        """Bring the host copy up to date and write this step's in-place updates (blocks appended to
        a row's table); returns the rows to copy whole instead (new tables, or too many updates)."""
        updates[0] = self.largest
        updates[1:] = 0
        appended: list[tuple[int, int, int]] = []
        rewritten: list[int] = []
        for row, table in enumerate(tables):
            staged, length = self._staged[row]
            if staged is table and length == len(table):
                continue
            start = length if staged is table else 0
            self._host_tables[row, start : len(table)] = table[start:]
            self._staged[row] = (table, len(table))
            if start:
                appended.extend((row, column, table[column]) for column in range(start, len(table)))
            else:
                rewritten.append(row)
        if len(appended) > UPDATE_SLOTS:
            return rewritten + sorted({row for row, _, _ in appended})
        if appended:
            updates[:, : len(appended)] = np.array(appended, dtype=np.int64).T
        return rewritten
