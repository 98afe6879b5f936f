"""The KV cache's memory: per layer, keys and values of ``num_blocks`` blocks of ``block_size``
positions, ``[num_blocks, block_size, kv_heads, head_dim]`` (vLLM's layout), allocated once.

A position ``p`` of a sequence lives at flat row ``table[p // block_size] * block_size + p % block_size``
of a layer's ``[num_blocks * block_size, kv_heads, head_dim]`` view. Which blocks a sequence holds is
the scheduler's business (``block_tables``); this holds the numbers and reads and writes them.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        # Zeros, not empty: positions read but masked out must hold finite numbers (0 * NaN is NaN).
        self.storage = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                   device=device, dtype=dtype)
        self.keys = [self.storage[layer, 0] for layer in range(num_layers)]
        self.values = [self.storage[layer, 1] for layer in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize

    @property
    def num_bytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    @torch.inference_mode()
    def copy_block(self, source: int, target: int) -> None:
        self.storage[:, :, target] = self.storage[:, :, source]

    def rows_of(self, table: Seq[int], start: int, end: int) -> torch.Tensor:
        """Flat rows of positions ``start..end-1`` of a sequence with block table ``table``."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)[positions // self.block_size]
        return (blocks * self.block_size + positions % self.block_size).to(self.device)

    def row_of(self, table: Seq[int], position: int) -> int:
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def write(self, layer: int, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keys and values [tokens, kv_heads, head_dim] into flat ``rows``."""
        self.flat(self.keys[layer])[rows] = keys
        self.flat(self.values[layer])[rows] = values

    @staticmethod
    def flat(layer_cache: torch.Tensor) -> torch.Tensor:
        return layer_cache.view(-1, *layer_cache.shape[2:])

    def tables_tensor(self, tables: Seq[Seq[int]], width: int) -> torch.Tensor:
        """Block tables as a [rows, width] tensor; short tables padded with the scratch block (0)."""
        padded = [list(table[:width]) + [0] * (width - len(table)) for table in tables]
        return torch.tensor(padded, dtype=torch.long, device=self.device)

    @staticmethod
    def gather(layer_cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
        """Positions ``0..length-1`` of each table's sequence: [rows, kv_heads, length, head_dim]."""
        rows, width = tables.shape
        block_size = layer_cache.shape[1]
        blocks = layer_cache[tables[:, : -(-length // block_size)]]  # [rows, width, block_size, heads, dim]
        spread = blocks.reshape(rows, -1, *blocks.shape[3:])
        return spread[:, :length].transpose(1, 2)
