"""In-place append of new rows at the end of every segment of a ragged row buffer: Triton kernel, torch reference.

The buffer layout is the one of :mod:`fastkvzip_press.triton.ragged_compact`: segment s occupies rows
``starts[s] : starts[s] + lengths[s]`` of a tensor with leading dimension M, with spare rows after it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastkvzip_press.triton.dispatch import cdiv, kernel_backend, lazy_jit, row_block_shape

try:
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; the torch reference covers the other platforms.
    tl = None


@lazy_jit
def _append_kernel(
    buffer_ptr,
    new_ptr,
    starts_ptr,
    lengths_ptr,
    n_new,
    width,
    buffer_stride_row,
    buffer_stride_col,
    new_stride_seg,
    new_stride_row,
    new_stride_col,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Program (row block, segment, column block): ``buffer[starts[s] + lengths[s] + i] = new[s, i]``."""
    seg = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows < n_new)[:, None] & (cols < width)[None, :]
    # Loaded as int64, so row offsets into a large buffer cannot overflow.
    dst_rows = tl.load(starts_ptr + seg) + tl.load(lengths_ptr + seg) + rows
    src_rows = seg.to(tl.int64) * new_stride_seg + rows.to(tl.int64) * new_stride_row
    block = tl.load(new_ptr + src_rows[:, None] + cols[None, :] * new_stride_col, mask=mask)
    tl.store(buffer_ptr + dst_rows[:, None] * buffer_stride_row + cols[None, :] * buffer_stride_col, block, mask=mask)


def _check(buffer: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, new_rows: torch.Tensor) -> None:
    if starts.dim() != 1 or starts.shape != lengths.shape:
        raise ValueError(f"starts and lengths must be [S], got {tuple(starts.shape)} and {tuple(lengths.shape)}")
    if new_rows.dim() < 2 or new_rows.shape[0] != starts.shape[0] or new_rows.shape[2:] != buffer.shape[1:]:
        raise ValueError(
            f"new_rows must be [S={starts.shape[0]}, t, *{tuple(buffer.shape[1:])}], got {tuple(new_rows.shape)}"
        )
    if new_rows.dtype != buffer.dtype:
        raise TypeError(f"new_rows dtype {new_rows.dtype} differs from the buffer's {buffer.dtype}")


Rows = torch.Tensor | Sequence[torch.Tensor]


def _pairs(buffers: Rows, new_rows: Rows) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(buffer, new rows)`` pairs from one tensor each or two lists of the same length."""
    if isinstance(buffers, torch.Tensor):
        buffers, new_rows = [buffers], [new_rows]
    if isinstance(new_rows, torch.Tensor) or len(buffers) != len(new_rows):
        raise ValueError("give one tensor of new rows per buffer (two tensors, or two lists of the same length)")
    return list(zip(buffers, new_rows))


def ragged_append_reference(buffers: Rows, starts: torch.Tensor, lengths: torch.Tensor, new_rows: Rows) -> None:
    """Torch implementation of :func:`ragged_append` (same contract, same results)."""
    pairs = _checked_pairs(buffers, starts, lengths, new_rows)
    _append_reference(pairs, starts, lengths)


def _checked_pairs(
    buffers: Rows, starts: torch.Tensor, lengths: torch.Tensor, new_rows: Rows
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = _pairs(buffers, new_rows)
    for buffer, rows in pairs:
        _check(buffer, starts, lengths, rows)
    return pairs


def _append_reference(pairs: list[tuple[torch.Tensor, torch.Tensor]], starts: torch.Tensor, lengths: torch.Tensor):
    n_new = pairs[0][1].shape[1] if pairs else 0
    if n_new == 0:
        return
    # One target index for every buffer: they share the layout.
    targets = starts + lengths
    if targets.dtype != torch.int64:
        targets = targets.long()
    if n_new > 1:
        targets = (targets[:, None] + torch.arange(n_new, device=starts.device)).reshape(-1)
    for buffer, rows in pairs:
        buffer.index_copy_(0, targets, rows.flatten(0, 1))


def ragged_append_triton(buffers: Rows, starts: torch.Tensor, lengths: torch.Tensor, new_rows: Rows) -> None:
    """Triton implementation of :func:`ragged_append` (same contract, same results): one launch per buffer."""
    for buffer, rows in _checked_pairs(buffers, starts, lengths, new_rows):
        _append_one(buffer, starts, lengths, rows)


def _append_one(buffer: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, new_rows: torch.Tensor) -> None:
    n_segments, n_new = new_rows.shape[:2]
    width = math.prod(buffer.shape[1:])
    if n_segments == 0 or n_new == 0 or width == 0:
        return
    if buffer.dtype == torch.bool:  # Triton has no bool pointers of its own; a byte view copies the same bits.
        buffer, new_rows = buffer.view(torch.uint8), new_rows.view(torch.uint8)
    try:
        target = buffer.view(buffer.shape[0], width)  # must alias the buffer: the kernel writes in place
    except RuntimeError as err:
        raise ValueError(
            f"the Triton append needs a buffer whose trailing dimensions flatten without a copy, got strides "
            f"{buffer.stride()} for shape {tuple(buffer.shape)}"
        ) from err
    source = new_rows.reshape(n_segments, n_new, width)
    block_rows, block_w = row_block_shape(width, max_rows=n_new)
    grid = (cdiv(n_new, block_rows), n_segments, cdiv(width, block_w))
    _append_kernel[grid](
        target,
        source,
        starts.long(),
        lengths.long(),
        n_new,
        width,
        target.stride(0),
        target.stride(1),
        source.stride(0),
        source.stride(1),
        source.stride(2),
        BLOCK_ROWS=block_rows,
        BLOCK_W=block_w,
    )


def ragged_append(buffers: Rows, starts: torch.Tensor, lengths: torch.Tensor, new_rows: Rows) -> None:
    """In place: buffer[starts[s] + lengths[s] + i] = new_rows[s, i] for every segment s and i < t.

    buffers: one tensor [M, ...] or a list of tensors sharing the segment layout (keys, values, side columns);
    new_rows: [S, t, ...] per buffer, with its trailing shape and dtype; starts, lengths: [S] int64. The caller
    guarantees the capacity and updates lengths itself (this function does not change lengths).
    """
    first = buffers if isinstance(buffers, torch.Tensor) else next(iter(buffers), None)
    if first is not None and kernel_backend(first) == "triton":
        ragged_append_triton(buffers, starts, lengths, new_rows)
    else:
        ragged_append_reference(buffers, starts, lengths, new_rows)
