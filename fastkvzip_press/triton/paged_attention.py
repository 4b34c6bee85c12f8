"""Attention over the head-wise pool of single-head blocks: Triton kernel (CUDA), torch reference
(:func:`fastkvzip_press.paged.attention.paged_attention`, same contract, same results).

One program per (sequence, KV head) and tile of query rows; a row is one (new token, query head of the group), so
the ``G`` query heads that share a KV head read its blocks once. Keys are visited block by block of the head's own
table with an online softmax, causally: the ``j``-th new token of a sequence sees the ``lengths_before`` pairs its
head stored and the new tokens up to itself.
"""

from __future__ import annotations

import torch

from fastkvzip_press.paged.attention import paged_attention as paged_attention_reference
from fastkvzip_press.paged.step import StepLayout
from fastkvzip_press.triton.dispatch import cdiv, interpret_enabled, kernel_backend, lazy_jit, next_power_of_2

try:
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; the torch reference covers the other platforms.
    tl = None

BLOCK_M = 16  # query rows per program: tl.dot needs at least 16


@lazy_jit
def _paged_attention_kernel(
    q_ptr,
    pool_ptr,
    out_ptr,
    tables_ptr,
    lengths_ptr,
    query_lens_ptr,
    query_start_ptr,
    scale,
    heads,
    groups,
    q_stride_t,
    q_stride_h,
    o_stride_t,
    o_stride_h,
    pool_stride_block,
    pool_stride_kv,
    pool_stride_row,
    tables_stride_r,
    tables_stride_h,
    lengths_stride_r,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Program (sequence x KV head, row tile): rows ``tile * BLOCK_M + [0, BLOCK_M)`` of the ``m * groups`` rows
    (token ``row // groups``, query head ``head * groups + row % groups``)."""
    pid = tl.program_id(0)
    seq = pid // heads
    head = pid % heads
    m = tl.load(query_lens_ptr + seq)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    if tl.program_id(1) * BLOCK_M < m * groups:
        row_ok = rows < m * groups
        token = rows // groups
        query_head = head * groups + rows % groups
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        start = tl.load(query_start_ptr + seq).to(tl.int64)
        q_offsets = (start + token)[:, None] * q_stride_t + query_head[:, None] * q_stride_h + dims[None, :]
        q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        before = tl.load(lengths_ptr + seq * lengths_stride_r + head)
        visible = before + token + 1  # keys each row sees
        n_keys = before + tl.minimum(m, (tl.program_id(1) * BLOCK_M + BLOCK_M + groups - 1) // groups)
        keys_at = tl.arange(0, BLOCK_SIZE)
        table = tables_ptr + seq.to(tl.int64) * tables_stride_r + head * tables_stride_h
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.full([BLOCK_M], 0.0, tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
        for block in range(0, (n_keys + BLOCK_SIZE - 1) // BLOCK_SIZE):
            block_id = tl.load(table + block).to(tl.int64)
            base = pool_ptr + block_id * pool_stride_block + keys_at[:, None] * pool_stride_row + dims[None, :]
            k = tl.load(base, mask=dim_ok[None, :], other=0.0)
            v = tl.load(base + pool_stride_kv, mask=dim_ok[None, :], other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32) * scale
            positions = block * BLOCK_SIZE + keys_at
            scores = tl.where(positions[None, :] < visible[:, None], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            # Rows that see no key yet (padding rows) keep -inf; exp(-inf - -inf) would be NaN.
            safe_best = tl.where(new_best == float("-inf"), 0.0, new_best)
            weights = tl.exp(scores - safe_best[:, None])
            rescale = tl.exp(best - safe_best)
            total = total * rescale + tl.sum(weights, 1)
            acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision="ieee", out_dtype=tl.float32)
            best = new_best
        result = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        o_offsets = (start + token)[:, None] * o_stride_t + query_head[:, None] * o_stride_h + dims[None, :]
        tl.store(out_ptr + o_offsets, result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def paged_attention(
    query: torch.Tensor, pool: torch.Tensor, step: StepLayout, layer: int, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention of ``layer``'s queries ``[T, Hq, D]`` over each head's pairs in ``pool`` ``[N, 2, block_size, D]``
    (the new tokens written already): Triton on CUDA (``FASTKVZIP_PRESS_KERNELS``), the torch path otherwise."""
    out = torch.empty_like(query) if out is None else out
    if kernel_backend(query) == "torch" or pool.shape[2] < 16 or pool.shape[2] & (pool.shape[2] - 1):
        return paged_attention_reference(query, pool, step, layer, scale, out)
    n_tokens, n_query_heads, head_dim = query.shape
    if query.stride(2) != 1 or out.stride(2) != 1 or pool.stride(3) != 1:
        raise ValueError("query, out and pool must be contiguous along the head dimension")
    tables = step.block_tables[layer]  # [R, H, B]
    lengths = step.lengths_before[layer]  # [R, H]
    heads = tables.shape[1]
    groups = n_query_heads // heads
    grid = (step.num_sequences * heads, cdiv(max(step.max_query_len, 1) * groups, BLOCK_M))
    _paged_attention_kernel[grid](
        query,
        pool,
        out,
        tables,
        lengths,
        step.query_lens,
        step.query_start,
        scale,
        heads,
        groups,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        pool.stride(0),
        pool.stride(1),
        pool.stride(2),
        tables.stride(0),
        tables.stride(1),
        lengths.stride(0),
        BLOCK_SIZE=pool.shape[2],
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, next_power_of_2(head_dim)),
        BLOCK_M=BLOCK_M,
        # Triton 3.x's interpreter multiplies half-precision dots wrongly (errors of 1e10 measured): upcast there.
        DOT_FP32=interpret_enabled() or query.dtype == torch.float32,
    )
    return out
