"""Attention over the paged KV cache, in Triton, each with a plain-PyTorch twin used on the CPU.

The cache is ``[blocks, kv_heads, block_size, head_dim]`` per layer (``paged_cache``); a sequence's
block table names the block of each ``block_size`` positions. Both kernels read keys ``BLOCK_N``
positions at a time, looking each position's block up in the table (a tile spans several blocks,
each one head's contiguous run of positions), with an online softmax.

Decode over long contexts splits each row's keys into partitions attended in parallel and then
combined (as flash-decoding does). Measured need (H200, Qwen2.5-1.5B, 4k-token contexts): one program
per row and KV head walked 64 tiles in turn, latency-bound, and one stream decoded at half its
short-context rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ragllm.engines.inprocess.kv.paged_cache import PagedKVCache
from ragllm.engines.inprocess.layers.kernels import dependent_launch, triton, use_triton

if triton is not None:
    import triton.language as tl

    from ragllm.engines.inprocess.layers.kernels import after_previous_kernel


# Split decode attention once a context may reach this many keys (below it the combining kernel
# costs more than the parallelism gains); partitions number at most MAX_PARTITIONS. A few rows
# (``FEW_ROWS``) split from ``SPLIT_FEW_FROM`` keys, into partitions of ``FEW_ROWS_PARTITION``: one
# program per KV head walks the keys in turn, so it is the partitions that fill the GPU. Measured on an
# H100 (Qwen2.5-1.5B AWQ, one stream, in a graph): step 1.34 → 1.30 ms at 300 keys, 1.65 → 1.31 ms at
# 1,000; a stream of 256 tokens after a 128-token prompt 750 → 763 tokens/s.
SPLIT_FROM = 1024
SPLIT_FEW_FROM = 128
FEW_ROWS = 8
FEW_ROWS_PARTITION = 64
MAX_PARTITIONS = 128
# Keys the one-pass decode program reads per step of its loop. Measured on an H200 (12 query and 2 KV
# heads of 128, in a graph): one row over 128 keys 5.5 µs a layer with 64, 4.1 with 128; over 512 keys
# 14.4 and 9.4 µs; 64 rows alike. The split kernel keeps 64: with 128, 64 rows over 4,096 keys took
# 3.84 ms a step against 3.57.
DECODE_TILE = 128


def split_from(rows: int) -> int:
    """Keys from which decode attention over ``rows`` rows runs split into partitions."""
    return SPLIT_FEW_FROM if rows <= FEW_ROWS else SPLIT_FROM


def partition_size(max_len: int, rows: int) -> int:
    """Keys per partition for contexts up to ``max_len`` and ``rows`` queries: smaller partitions where
    few rows leave the GPU idle, larger where many rows already fill it. Measured on an H200 (4,096
    keys, 12 query and 2 KV heads of 128, in a graph): one row 17.5 µs a layer with 512-key partitions,
    9.6 µs with 256; 64 rows 74.4 µs with 512, 71.7 with 1,024. A few rows take ``FEW_ROWS_PARTITION``
    (see ``SPLIT_FEW_FROM``)."""
    size = FEW_ROWS_PARTITION if rows <= FEW_ROWS else 512 if rows <= 32 else 1024
    while size * MAX_PARTITIONS < max_len:
        size *= 2
    return size


def decode_attention(
    qkv: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    split: bool = False,
    key_scale: float = 1.0,
    value_scale: float = 1.0,
) -> torch.Tensor:
    """One query token per row: row r attends to its sequence's keys at positions ``0..positions[r]``,
    its blocks named by ``tables[r]``. Returns [rows, heads * head_dim]. ``split``: partitions of the
    keys run in parallel and are combined (for long contexts; ``tables``' width bounds the length).
    An fp8 cache is read in ``qkv``'s dtype times the scales.

    Measured need: PyTorch's fused attention ran 23 µs per layer for a single query (its kernels are
    built for long queries) plus three mask kernels; this reads each row's keys once, in ~3 µs."""
    rows = qkv.shape[0]
    group = num_heads // num_kv_heads
    if not use_triton(qkv):
        end = int(positions.max()) + 1
        keys = PagedKVCache.gather(key_cache, tables, end, qkv.dtype, key_scale)
        values = PagedKVCache.gather(value_cache, tables, end, qkv.dtype, value_scale)
        grouped = qkv[:, : num_heads * head_dim].view(rows, num_kv_heads, group, head_dim)
        visible = (torch.arange(end, device=qkv.device)[None, :] <= positions[:, None])[
            :, None, None, :
        ]
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=visible)
        return out.reshape(rows, num_heads * head_dim)
    out = torch.empty(rows, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    if split:
        _split_decode_attention(
            qkv,
            key_cache,
            value_cache,
            tables,
            positions,
            out,
            num_heads,
            num_kv_heads,
            head_dim,
            key_scale,
            value_scale,
        )
        return out
    _decode_attention_kernel[(rows, num_kv_heads)](
        qkv,
        key_cache,
        value_cache,
        out,
        positions,
        tables,
        qkv.stride(0),
        tables.stride(0),
        *PagedKVCache.strides(key_cache),
        out.stride(0),
        head_dim**-0.5 * key_scale,
        value_scale,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_N=DECODE_TILE,
        BLOCK_SIZE=PagedKVCache.block_size_of(key_cache),
        IEEE=qkv.dtype == torch.float32,
        **dependent_launch(qkv),
    )
    return out


def _split_decode_attention(
    qkv: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    out: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    key_scale: float,
    value_scale: float,
) -> None:
    rows, group = qkv.shape[0], num_heads // num_kv_heads
    block_size = PagedKVCache.block_size_of(key_cache)
    size = partition_size(tables.shape[1] * block_size, rows)
    parts = -(-tables.shape[1] * block_size // size)
    partial = torch.empty(rows, num_heads, parts, head_dim, dtype=torch.float32, device=qkv.device)
    scores = torch.empty(
        2, rows, num_heads, parts, dtype=torch.float32, device=qkv.device
    )  # max, sum
    _decode_partition_kernel[(rows, num_kv_heads, parts)](
        qkv,
        key_cache,
        value_cache,
        partial,
        scores,
        positions,
        tables,
        qkv.stride(0),
        tables.stride(0),
        *PagedKVCache.strides(key_cache),
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        scores.stride(0),
        scores.stride(1),
        scores.stride(2),
        head_dim**-0.5 * key_scale,
        PARTITION=size,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_N=64,
        BLOCK_SIZE=block_size,
        IEEE=qkv.dtype == torch.float32,
        **dependent_launch(qkv),
    )
    _combine_partitions_kernel[(rows, num_heads)](
        partial,
        scores,
        out,
        positions,
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        scores.stride(0),
        scores.stride(1),
        scores.stride(2),
        out.stride(0),
        value_scale,
        PARTITION=size,
        PARTS_PAD=triton.next_power_of_2(parts),
        HEAD_DIM=head_dim,
        **dependent_launch(qkv),
    )


def extend_attention(
    qkv: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    positions: torch.Tensor,
    table: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    key_scale: float = 1.0,
    value_scale: float = 1.0,
) -> torch.Tensor:
    """Queries of a prompt chunk that continues a sequence already in the cache (its blocks named by
    ``table``): token t attends to positions ``0..positions[t]`` (its own chunk's keys are already
    written). Rows that pad a captured chunk sit at a short position and their output is not used.
    Returns [tokens, heads * head_dim].

    Measured need: PyTorch's attention with a mask falls back to a kernel that needs the keys repeated
    per query head (one copy per layer), and its first call with a new mask shape cost tens of ms. The
    keys are split into partitions attended in parallel, as in decode: a question after 4,032 cached
    tokens otherwise took 8 ms to its first token, a dozen programs each walking every key in turn."""
    tokens = qkv.shape[0]
    group = num_heads // num_kv_heads
    if not use_triton(qkv):
        query = (
            qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim).transpose(0, 1)[None]
        )
        end = int(positions.max()) + 1
        keys = PagedKVCache.gather(
            key_cache, table[None], end, qkv.dtype, key_scale
        ).repeat_interleave(group, dim=1)
        values = PagedKVCache.gather(
            value_cache, table[None], end, qkv.dtype, value_scale
        ).repeat_interleave(group, 1)
        visible = torch.arange(end, device=qkv.device)[None, :] <= positions[:, None]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible)
        return out[0].transpose(0, 1).reshape(tokens, num_heads * head_dim)
    out = torch.empty(tokens, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    block_size = PagedKVCache.block_size_of(key_cache)
    size = partition_size(table.shape[0] * block_size, tokens)
    parts = -(-table.shape[0] * block_size // size)
    partial = torch.empty(
        tokens, num_heads, parts, head_dim, dtype=torch.float32, device=qkv.device
    )
    scores = torch.empty(
        2, tokens, num_heads, parts, dtype=torch.float32, device=qkv.device
    )  # max, sum
    block_rows = 64  # (token, query head) pairs per program: a few tokens times the query group
    _extend_partition_kernel[(triton.cdiv(tokens * group, block_rows), num_kv_heads, parts)](
        qkv,
        key_cache,
        value_cache,
        partial,
        scores,
        positions,
        table,
        tokens,
        qkv.stride(0),
        *PagedKVCache.strides(key_cache),
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        scores.stride(0),
        scores.stride(1),
        scores.stride(2),
        head_dim**-0.5 * key_scale,
        PARTITION=size,
        GROUP=group,
        BLOCK_M=block_rows,
        HEAD_DIM=head_dim,
        BLOCK_N=64,
        BLOCK_SIZE=block_size,
        IEEE=qkv.dtype == torch.float32,
        **dependent_launch(qkv),
    )
    _combine_partitions_kernel[(tokens, num_heads)](
        partial,
        scores,
        out,
        positions,
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        scores.stride(0),
        scores.stride(1),
        scores.stride(2),
        out.stride(0),
        value_scale,
        PARTITION=size,
        PARTS_PAD=triton.next_power_of_2(parts),
        HEAD_DIM=head_dim,
        **dependent_launch(qkv),
    )
    return out


if triton is not None:

    @triton.jit
    def _attend_paged(
        q,
        key_cache_ptr,
        value_cache_ptr,
        table_ptr,
        head_offset,
        positions,
        last,
        stride_block,
        stride_position,
        scale,
        ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """Queries ``q`` [ROWS, HEAD_DIM] against one sequence's cached keys of one KV head (its block
        table at ``table_ptr``), positions ``0..last``; row r sees positions up to ``positions[r]``.
        Online softmax; returns [ROWS, HEAD_DIM] in float32."""
        acc, best, total = _attend_paged_span(
            q,
            key_cache_ptr,
            value_cache_ptr,
            table_ptr,
            head_offset,
            positions,
            0,
            last,
            stride_block,
            stride_position,
            scale,
            ROWS=ROWS,
            HEAD_DIM=HEAD_DIM,
            BLOCK_N=BLOCK_N,
            BLOCK_SIZE=BLOCK_SIZE,
            IEEE=IEEE,
        )
        return acc / total[:, None]

    @triton.jit
    def _attend_paged_span(
        q,
        key_cache_ptr,
        value_cache_ptr,
        table_ptr,
        head_offset,
        positions,
        first,
        last,
        stride_block,
        stride_position,
        scale,
        ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """As ``_attend_paged`` over positions ``first..last``; returns the softmax state unnormalised:
        (weighted values [ROWS, HEAD_DIM], running max [ROWS], sum of weights [ROWS])."""
        dims = tl.arange(0, HEAD_DIM)
        best = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        total = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
        for start in range(first, last + 1, BLOCK_N):
            keys_at = start + tl.arange(0, BLOCK_N)
            cached = keys_at <= last
            blocks = tl.load(table_ptr + keys_at // BLOCK_SIZE, mask=cached, other=0).to(tl.int64)
            rows_at = blocks * stride_block + (keys_at % BLOCK_SIZE) * stride_position + head_offset
            offsets = rows_at[:, None] + dims[None, :]
            k = tl.load(key_cache_ptr + offsets, mask=cached[:, None], other=0.0).to(
                q.dtype
            )  # fp8 caches
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            visible = keys_at[None, :] <= positions[:, None]
            scores = tl.where(visible, scores * scale, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            weights = tl.exp(scores - new_best[:, None])
            rescale = tl.exp(best - new_best)
            total = total * rescale + tl.sum(weights, 1)
            v = tl.load(value_cache_ptr + offsets, mask=cached[:, None], other=0.0).to(q.dtype)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(
                    weights.to(v.dtype), v, input_precision="ieee"
                )
            else:
                acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
            best = new_best
        return acc, best, total

    @triton.jit
    def _decode_attention_kernel(
        qkv_ptr,
        key_cache_ptr,
        value_cache_ptr,
        out_ptr,
        positions_ptr,
        tables_ptr,
        stride_row,
        stride_table,
        stride_block,
        stride_position,
        stride_head,
        stride_out,
        scale,
        value_scale,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        IEEE: tl.constexpr,
        DEPENDENT: tl.constexpr,
    ):
        after_previous_kernel(DEPENDENT)
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        dtype = out_ptr.dtype.element_ty
        position = tl.load(positions_ptr + row)
        queries = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        query_mask = queries < GROUP
        q = tl.load(
            qkv_ptr
            + row * stride_row
            + (kv_head * GROUP + queries)[:, None] * HEAD_DIM
            + dims[None, :],
            mask=query_mask[:, None],
            other=0.0,
        )
        positions = (
            tl.zeros([GROUP_PAD], dtype=position.dtype) + position
        )  # the group's queries: one token
        out = _attend_paged(
            q,
            key_cache_ptr,
            value_cache_ptr,
            tables_ptr + row * stride_table,
            kv_head * stride_head,
            positions,
            position,
            stride_block,
            stride_position,
            scale,
            ROWS=GROUP_PAD,
            HEAD_DIM=HEAD_DIM,
            BLOCK_N=BLOCK_N,
            BLOCK_SIZE=BLOCK_SIZE,
            IEEE=IEEE,
        )
        tl.store(
            out_ptr
            + row * stride_out
            + (kv_head * GROUP + queries)[:, None] * HEAD_DIM
            + dims[None, :],
            (out * value_scale).to(dtype),
            mask=query_mask[:, None],
        )

    @triton.jit
    def _decode_partition_kernel(
        qkv_ptr,
        key_cache_ptr,
        value_cache_ptr,
        partial_ptr,
        scores_ptr,
        positions_ptr,
        tables_ptr,
        stride_row,
        stride_table,
        stride_block,
        stride_position,
        stride_head,
        stride_partial_row,
        stride_partial_head,
        stride_partial_part,
        stride_scores_kind,
        stride_scores_row,
        stride_scores_head,
        scale,
        PARTITION: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        IEEE: tl.constexpr,
        DEPENDENT: tl.constexpr,
    ):
        after_previous_kernel(DEPENDENT)
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        part = tl.program_id(2)
        position = tl.load(positions_ptr + row)
        first = part * PARTITION
        if first <= position:  # partitions past the row's context have nothing to read
            queries = tl.arange(0, GROUP_PAD)
            dims = tl.arange(0, HEAD_DIM)
            query_mask = queries < GROUP
            heads = kv_head * GROUP + queries
            q = tl.load(
                qkv_ptr + row * stride_row + heads[:, None] * HEAD_DIM + dims[None, :],
                mask=query_mask[:, None],
                other=0.0,
            )
            positions = tl.zeros([GROUP_PAD], dtype=position.dtype) + position
            last = tl.minimum(first + PARTITION - 1, position)
            acc, best, total = _attend_paged_span(
                q,
                key_cache_ptr,
                value_cache_ptr,
                tables_ptr + row * stride_table,
                kv_head * stride_head,
                positions,
                first,
                last,
                stride_block,
                stride_position,
                scale,
                ROWS=GROUP_PAD,
                HEAD_DIM=HEAD_DIM,
                BLOCK_N=BLOCK_N,
                BLOCK_SIZE=BLOCK_SIZE,
                IEEE=IEEE,
            )
            base = row * stride_partial_row + part * stride_partial_part
            tl.store(
                partial_ptr + base + heads[:, None] * stride_partial_head + dims[None, :],
                acc,
                mask=query_mask[:, None],
            )
            at = row * stride_scores_row + heads * stride_scores_head + part
            tl.store(scores_ptr + at, best, mask=query_mask)
            tl.store(scores_ptr + stride_scores_kind + at, total, mask=query_mask)

    @triton.jit
    def _combine_partitions_kernel(
        partial_ptr,
        scores_ptr,
        out_ptr,
        positions_ptr,
        stride_partial_row,
        stride_partial_head,
        stride_partial_part,
        stride_scores_kind,
        stride_scores_row,
        stride_scores_head,
        stride_out,
        value_scale,
        PARTITION: tl.constexpr,
        PARTS_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        DEPENDENT: tl.constexpr,
    ):
        after_previous_kernel(DEPENDENT)
        row = tl.program_id(0)
        head = tl.program_id(1)
        dtype = out_ptr.dtype.element_ty
        count = tl.load(positions_ptr + row) // PARTITION + 1
        parts = tl.arange(0, PARTS_PAD)
        used = parts < count
        dims = tl.arange(0, HEAD_DIM)
        at = row * stride_scores_row + head * stride_scores_head + parts
        best = tl.load(scores_ptr + at, mask=used, other=float("-inf"))
        total = tl.load(scores_ptr + stride_scores_kind + at, mask=used, other=0.0)
        weights = tl.exp(best - tl.max(best, 0))  # 0 for unused partitions
        partial = tl.load(
            partial_ptr
            + row * stride_partial_row
            + head * stride_partial_head
            + parts[:, None] * stride_partial_part
            + dims[None, :],
            mask=used[:, None],
            other=0.0,
        )
        out = tl.sum(partial * weights[:, None], 0) / tl.sum(total * weights, 0) * value_scale
        tl.store(out_ptr + row * stride_out + head * HEAD_DIM + dims, out.to(dtype))

    @triton.jit
    def _extend_partition_kernel(
        qkv_ptr,
        key_cache_ptr,
        value_cache_ptr,
        partial_ptr,
        scores_ptr,
        positions_ptr,
        table_ptr,
        num_tokens,
        stride_row,
        stride_block,
        stride_position,
        stride_head,
        stride_partial_row,
        stride_partial_head,
        stride_partial_part,
        stride_scores_kind,
        stride_scores_row,
        stride_scores_head,
        scale,
        PARTITION: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        IEEE: tl.constexpr,
        DEPENDENT: tl.constexpr,
    ):
        after_previous_kernel(DEPENDENT)
        block = tl.program_id(0)
        kv_head = tl.program_id(1)
        part = tl.program_id(2)
        rows = block * BLOCK_M + tl.arange(
            0, BLOCK_M
        )  # row = token * GROUP + query head in the group
        tokens = rows // GROUP
        heads = kv_head * GROUP + rows % GROUP
        valid = tokens < num_tokens
        positions = tl.load(positions_ptr + tokens, mask=valid, other=0)
        first = part * PARTITION
        top = tl.max(positions, 0)
        if first <= top:  # partitions past every row's position have nothing to read
            dims = tl.arange(0, HEAD_DIM)
            q = tl.load(
                qkv_ptr + tokens[:, None] * stride_row + heads[:, None] * HEAD_DIM + dims[None, :],
                mask=valid[:, None],
                other=0.0,
            )
            last = tl.minimum(first + PARTITION - 1, top)
            acc, best, total = _attend_paged_span(
                q,
                key_cache_ptr,
                value_cache_ptr,
                table_ptr,
                kv_head * stride_head,
                positions,
                first,
                last,
                stride_block,
                stride_position,
                scale,
                ROWS=BLOCK_M,
                HEAD_DIM=HEAD_DIM,
                BLOCK_N=BLOCK_N,
                BLOCK_SIZE=BLOCK_SIZE,
                IEEE=IEEE,
            )
            # Rows before this partition saw no key here (their state is not a number): not stored, and
            # the combining kernel reads only partitions up to each row's position.
            kept = valid & (positions >= first)
            base = (
                tokens * stride_partial_row
                + heads * stride_partial_head
                + part * stride_partial_part
            )
            tl.store(partial_ptr + base[:, None] + dims[None, :], acc, mask=kept[:, None])
            at = tokens * stride_scores_row + heads * stride_scores_head + part
            tl.store(scores_ptr + at, best, mask=kept)
            tl.store(scores_ptr + stride_scores_kind + at, total, mask=kept)
