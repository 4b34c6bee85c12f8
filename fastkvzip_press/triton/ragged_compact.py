"""Compaction of ragged row buffers (one segment of rows per KV head): Triton row scatter and its torch reference.

A ragged buffer stores S segments of rows in one tensor with leading dimension M: segment s occupies rows
``starts[s] : starts[s] + lengths[s]``; segments do not overlap and may be separated by unused rows. Compaction keeps
a subset of each segment's rows, in order, and packs the segments back to back, each followed by ``spare`` rows of
zeros (room for later appends).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastkvzip_press.triton.dispatch import cdiv, kernel_backend, lazy_jit, row_block_shape

try:
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; the torch reference covers the other platforms.
    tl = None


@dataclass
class CompactedRows:
    """Result of :func:`ragged_compact`.

    rows: new buffers, same dtype/device/trailing shape as the inputs, leading dim = sum(capacities).
    starts: [S] int64, exclusive prefix sum of capacities.
    lengths: [S] int64, kept rows per segment.
    capacities: [S] int64, lengths + spare.
    host_lengths: ``lengths`` as a list, read in the one host synchronisation the compaction needs anyway (for the
    output size), so callers that keep lengths on the host need no second one.
    """

    rows: list[torch.Tensor]
    starts: torch.Tensor
    lengths: torch.Tensor
    capacities: torch.Tensor
    host_lengths: list[int]


@lazy_jit
def _compact_kernel(
    src_ptr,
    dst_ptr,
    keep_ptr,
    kept_cumsum_ptr,
    in_offsets_ptr,
    kept_before_ptr,
    starts_ptr,
    lengths_ptr,
    out_starts_ptr,
    kept_ptr,
    spare,
    width,
    src_stride_row,
    src_stride_col,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Program (row block, segment, column block): copy the block's kept rows to their packed place in ``dst``
    (``[sum(capacities), width]``, contiguous) and zero the same block of the segment's spare rows."""
    seg = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    col_ok = cols < width
    out_start = tl.load(out_starts_ptr + seg)

    in_offset = tl.load(in_offsets_ptr + seg)  # where the segment's flags start in ``keep``
    keep = tl.load(keep_ptr + in_offset + rows, mask=rows < tl.load(lengths_ptr + seg), other=0) != 0
    # Inclusive count of kept rows over the whole ``keep`` buffer, made relative to the segment.
    kept_cumsum = tl.load(kept_cumsum_ptr + in_offset + rows, mask=keep, other=0)
    dst_rows = out_start + kept_cumsum - 1 - tl.load(kept_before_ptr + seg)
    src_rows = tl.load(starts_ptr + seg) + rows
    copy = keep[:, None] & col_ok[None, :]
    block = tl.load(src_ptr + src_rows[:, None] * src_stride_row + cols[None, :] * src_stride_col, mask=copy)
    tl.store(dst_ptr + dst_rows[:, None] * width + cols[None, :], block, mask=copy)

    spare_rows = out_start + tl.load(kept_ptr + seg) + rows
    zero = (rows < spare)[:, None] & col_ok[None, :]
    zeros = tl.full([BLOCK_ROWS, BLOCK_W], 0, dtype=dst_ptr.dtype.element_ty)  # tl.zeros is not a builtin
    tl.store(dst_ptr + spare_rows[:, None] * width + cols[None, :], zeros, mask=zero)


@dataclass
class _Plan:
    """Per-segment bookkeeping shared by both implementations ([S] int64 tensors, plus host-side sizes)."""

    in_offsets: torch.Tensor  # where each segment's flags start in ``keep``
    kept_before: torch.Tensor  # kept rows in the segments before
    kept: torch.Tensor
    capacities: torch.Tensor
    out_starts: torch.Tensor
    kept_cumsum: torch.Tensor  # [sum(lengths)] inclusive count of kept flags
    total_rows: int
    max_length: int
    host_kept: list[int]


def _plan(
    rows: list[torch.Tensor], starts: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor, spare: int
) -> _Plan:
    if starts.dim() != 1 or starts.shape != lengths.shape:
        raise ValueError(f"starts and lengths must be [S], got {tuple(starts.shape)} and {tuple(lengths.shape)}")
    if keep.dtype != torch.bool or keep.dim() != 1:
        raise TypeError(f"keep must be a 1-D bool tensor, got {keep.dtype} of shape {tuple(keep.shape)}")
    if spare < 0:
        raise ValueError(f"spare={spare} must be >= 0")
    if len({t.shape[0] for t in rows}) > 1:
        raise ValueError(f"row tensors must share their leading dimension, got {[tuple(t.shape) for t in rows]}")
    in_offsets = lengths.cumsum(0) - lengths
    kept_cumsum = keep.cumsum(0)
    padded = torch.cat([kept_cumsum.new_zeros(1), kept_cumsum])
    n_flags = keep.numel()
    kept_before = padded[in_offsets.clamp(max=n_flags)]
    kept = padded[(in_offsets + lengths).clamp(max=n_flags)] - kept_before
    capacities = kept + spare
    zero = lengths.new_zeros(1)
    # One host synchronisation for the output size, the grid, the checks and the kept lengths.
    total_rows, max_length, total_length, min_start, max_end, *host_kept = torch.cat(
        [
            capacities.sum().reshape(1),
            torch.cat([lengths, zero]).max().reshape(1),
            lengths.sum().reshape(1),
            torch.cat([starts, zero]).min().reshape(1),
            torch.cat([starts + lengths, zero]).max().reshape(1),
            kept,
        ]
    ).tolist()
    if total_length != n_flags:
        raise ValueError(f"keep has {n_flags} flags for segments of {total_length} rows in all")
    if rows and (min_start < 0 or max_end > rows[0].shape[0]):
        raise ValueError(f"segments span rows [{min_start}, {max_end}) outside the {rows[0].shape[0]} rows given")
    return _Plan(
        in_offsets,
        kept_before,
        kept,
        capacities,
        capacities.cumsum(0) - capacities,
        kept_cumsum,
        total_rows,
        max_length,
        host_kept,
    )


def ragged_compact_reference(
    rows: list[torch.Tensor], starts: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor, spare: int = 0
) -> CompactedRows:
    """Torch implementation of :func:`ragged_compact` (same contract, same results)."""
    starts, lengths = starts.long(), lengths.long()
    plan = _plan(rows, starts, lengths, keep, spare)
    flag = keep.nonzero().squeeze(1)  # [kept] index of every kept flag, in segment order
    segment = torch.bucketize(flag, plan.in_offsets, right=True) - 1
    source = starts[segment] + flag - plan.in_offsets[segment]
    # Kept rows land back to back from their segment's new start: the k-th kept row overall, shifted per segment.
    target = torch.arange(flag.numel(), device=keep.device) + (plan.out_starts - plan.kept_before)[segment]
    out = []
    for t in rows:
        packed = t.new_zeros((plan.total_rows, *t.shape[1:]))
        packed.index_copy_(0, target, t.index_select(0, source))
        out.append(packed)
    return CompactedRows(out, plan.out_starts, plan.kept, plan.capacities, plan.host_kept)


def _as_copyable(t: torch.Tensor) -> torch.Tensor:
    # Triton has no bool pointers of its own; a byte view copies the same bits.
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def ragged_compact_triton(
    rows: list[torch.Tensor], starts: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor, spare: int = 0
) -> CompactedRows:
    """Triton implementation of :func:`ragged_compact` (same contract, same results): one launch per row tensor."""
    starts, lengths = starts.long(), lengths.long()
    plan = _plan(rows, starts, lengths, keep, spare)
    flags = keep.view(torch.uint8)
    out = []
    for t in rows:
        packed = torch.empty((plan.total_rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
        out.append(packed)
        width = math.prod(t.shape[1:])
        if plan.total_rows == 0 or width == 0:
            continue
        src = _as_copyable(t).reshape(t.shape[0], width)
        dst = _as_copyable(packed).view(plan.total_rows, width)
        block_rows, block_w = row_block_shape(width)
        grid = (cdiv(max(plan.max_length, spare), block_rows), len(lengths), cdiv(width, block_w))
        _compact_kernel[grid](
            src,
            dst,
            flags,
            plan.kept_cumsum,
            plan.in_offsets,
            plan.kept_before,
            starts,
            lengths,
            plan.out_starts,
            plan.kept,
            spare,
            width,
            src.stride(0),
            src.stride(1),
            BLOCK_ROWS=block_rows,
            BLOCK_W=block_w,
        )
    return CompactedRows(out, plan.out_starts, plan.kept, plan.capacities, plan.host_kept)


def ragged_compact(
    rows: list[torch.Tensor], starts: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor, spare: int = 0
) -> CompactedRows:
    """Keep a subset of every segment's rows and pack the segments back to back, each followed by spare rows.

    rows: tensors [M, ...] sharing the segment layout (keys [M, D], values [M, D], per-token side data such as
    scores [M] float32 or positions [M] int64). starts, lengths: [S] int64. keep: [sum(lengths)] bool, the
    concatenation over segments (in segment order) of each segment's per-row keep flags. Each output segment holds
    the kept rows of its input segment in their original order, followed by ``spare`` rows of zeros.
    """
    if kernel_backend(rows[0] if rows else keep) == "triton":
        return ragged_compact_triton(rows, starts, lengths, keep, spare)
    return ragged_compact_reference(rows, starts, lengths, keep, spare)
