"""Block tables laid out by hand for runner tests, standing in for the ones the scheduler allocates."""

from __future__ import annotations


def scattered_tables(lengths: list[int], block_size: int = 16, first: int = 1) -> list[list[int]]:
    """Block tables for sequences of these lengths, their blocks interleaved (not contiguous) so
    that a read through the wrong table or offset shows."""
    needed = [-(-length // block_size) for length in lengths]
    tables: list[list[int]] = [[] for _ in lengths]
    block = first
    for round_ in range(max(needed)):
        for row in reversed(range(len(lengths))):
            if round_ < needed[row]:
                tables[row].append(block)
                block += 1
    return tables
