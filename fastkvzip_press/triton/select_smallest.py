"""Exact selection of the k smallest entries of float32 rows: Triton radix select and its torch reference.

The Triton path finds each row's k-th smallest value without sorting: float32 values map to order-preserving 32-bit
keys, and four passes fix one 8-bit digit of the threshold's key each, from a histogram of that digit over the entries
that share the digits fixed so far. One launch covers all rows (a batch: one row per sequence, each with its own k).
The bookkeeping between passes runs as small torch ops on the device, so the whole selection needs no host
synchronisation. A last kernel compares every key with its row's threshold key; the tie rule (the first equal entries
in index order) is a torch cumsum over the equality mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastkvzip_press.triton.dispatch import cdiv, kernel_backend, lazy_jit

try:
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; the torch reference covers the other platforms.
    tl = None

_BLOCK = 1024
_RADIX_BITS = 8
_NUM_BINS = 1 << _RADIX_BITS
_SHIFTS = (24, 16, 8, 0)  # most significant digit first

# The kernels read the values as int32 bit patterns and compare keys, never floats, so that no flush of subnormals
# to zero can change a comparison. Keys are kept in the int32 view of the order-preserving uint32 key
# (uint32 key = signed key ^ 0x80000000): every constant, prefix and comparison then stays in int32, which Triton,
# its interpreter and torch treat alike. The kernels call Triton builtins only: the helpers that triton.language
# itself jit-compiles (tl.sum, tl.cumsum, ...) are fixed to compiled or interpreted mode when triton is imported, so
# they would break the interpreter whenever TRITON_INTERPRET is set after that import.


@lazy_jit
def _radix_histogram_kernel(
    bits_ptr,
    n,
    prefix_ptr,
    hist_ptr,
    HI_MASK: tl.constexpr,
    SHIFT: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    """Program (block, row): add to ``hist[row] [NUM_BINS]`` the counts of key digit ``SHIFT`` over the row's entries
    whose key matches the row's prefix (rows of ``n`` entries, back to back)."""
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n
    bits = tl.load(bits_ptr + row.to(tl.int64) * n + offs, mask=in_bounds, other=0)
    bits = tl.where((bits << 1) == 0, 0, bits)  # -0.0 -> 0.0
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed int32 key, ordered like the floats
    match = in_bounds & ((key & HI_MASK) == tl.load(prefix_ptr + row))
    digit = (key >> SHIFT) & (NUM_BINS - 1)
    if SHIFT == 24:
        digit = digit ^ (NUM_BINS // 2)  # the unsigned key's top digit has the sign bit flipped
    # Entries outside the prefix go to an overflow bin instead of using histogram's mask argument, which older
    # Triton releases lack; the overflow half of the histogram is never added, nor are empty bins.
    counts = tl.histogram(tl.where(match, digit, NUM_BINS), 2 * NUM_BINS)
    bins = tl.arange(0, 2 * NUM_BINS)
    tl.atomic_add(hist_ptr + row * NUM_BINS + bins, counts, mask=(bins < NUM_BINS) & (counts > 0))


@lazy_jit
def _compare_kernel(bits_ptr, n, threshold_key_ptr, below_ptr, ties_ptr, BLOCK: tl.constexpr):
    """Program (block, row): ``below``: the row's values under its threshold; ``ties``: values equal to it."""
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n
    at = row.to(tl.int64) * n + offs
    bits = tl.load(bits_ptr + at, mask=in_bounds, other=0)
    bits = tl.where((bits << 1) == 0, 0, bits)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    threshold_key = tl.load(threshold_key_ptr + row)
    tl.store(below_ptr + at, key < threshold_key, mask=in_bounds)
    tl.store(ties_ptr + at, key == threshold_key, mask=in_bounds)


def _check(values: torch.Tensor, k: int) -> None:
    if values.dtype != torch.float32 or values.dim() != 1:
        raise TypeError(f"values must be a 1-D float32 tensor, got {values.dtype} of shape {tuple(values.shape)}")
    if not 0 <= k <= values.numel():
        raise ValueError(f"k={k} outside [0, {values.numel()}]")


def _nothing_selected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    threshold = torch.tensor(float("-inf"), dtype=torch.float32, device=values.device)
    return threshold, torch.zeros(values.shape, dtype=torch.bool, device=values.device)


def select_smallest_reference(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch implementation of :func:`select_smallest` (same contract, same results bit for bit)."""
    _check(values, k)
    if k == 0:
        return _nothing_selected(values)
    values = torch.where(values == 0, torch.zeros_like(values), values)  # -0.0 -> 0.0
    threshold = torch.kthvalue(values, k).values
    below = values < threshold
    ties = values == threshold
    ties_taken = k - below.sum()
    return threshold, below | (ties & (ties.cumsum(0) <= ties_taken))


Counts = torch.Tensor | Sequence[int]


def check_counts(values: torch.Tensor, k: Counts) -> torch.Tensor:
    """``k`` as an int64 tensor [R], checked against ``values [R, N]`` without waiting for the device.

    Counts known on the host (a list or tuple of ints, or a CPU tensor) are checked to lie in [0, N]. Counts in a
    device tensor are checked for shape only: reading them would wait for every queued kernel (a host
    synchronisation), so their range is the caller's promise; pass host counts to have it checked.
    """
    if values.dtype != torch.float32 or values.dim() != 2:
        raise TypeError(f"values must be a 2-D float32 tensor, got {values.dtype} of shape {tuple(values.shape)}")
    counts = torch.as_tensor(k, dtype=torch.int64)  # a list becomes a CPU tensor; a tensor keeps its device
    if counts.shape != values.shape[:1]:
        raise ValueError(f"k needs one count per row ({values.shape[0]}), got shape {tuple(counts.shape)}")
    if counts.device.type == "cpu" and counts.numel():
        low, high = int(counts.min()), int(counts.max())
        if low < 0 or high > values.shape[1]:
            raise ValueError(f"k={counts.tolist()} outside [0, {values.shape[1]}]")
    return counts


def select_smallest_rows_reference(values: torch.Tensor, k: Counts) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch implementation of :func:`select_smallest_rows` (same contract, same results bit for bit)."""
    counts = check_counts(values, k).tolist()  # one count per row on the host: this path selects row by row
    rows = [select_smallest_reference(row, count) for row, count in zip(values, counts)]
    if not rows:
        return values.new_empty(0), torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    return torch.stack([threshold for threshold, _ in rows]), torch.stack([evict for _, evict in rows])


def select_smallest_rows_triton(values: torch.Tensor, k: Counts) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`select_smallest_rows` (same contract, same results bit for bit): five
    launches for all rows, and no host synchronisation."""
    counts = check_counts(values, k)
    n_rows, n = values.shape
    bits = values.contiguous().view(torch.int32)
    device = values.device
    grid = (cdiv(n, _BLOCK), n_rows)
    counts = counts.to(device, non_blocking=True)  # host counts: a copy to the device, not a synchronisation
    key = torch.zeros(n_rows, dtype=torch.int64, device=device)  # unsigned key of each threshold, digits fixed so far
    rank = counts.clone()  # 1-based rank of the threshold among the row's matches
    prefix = torch.zeros(n_rows, dtype=torch.int32, device=device)  # ``key`` in the kernels' signed view
    hist = torch.empty(n_rows, _NUM_BINS, dtype=torch.int32, device=device)
    for shift in _SHIFTS:
        hi_mask = (0xFFFFFFFF << (shift + _RADIX_BITS)) & 0xFFFFFFFF
        hist.zero_()
        _radix_histogram_kernel[grid](
            bits,
            n,
            prefix,
            hist,
            HI_MASK=hi_mask - (1 << 32) if hi_mask >= 1 << 31 else hi_mask,
            SHIFT=shift,
            BLOCK=_BLOCK,
            NUM_BINS=_NUM_BINS,
        )
        cumulative = hist.cumsum(1)
        digit = (cumulative < rank[:, None]).sum(1)  # first bin whose cumulative count reaches the rank
        # minus the matches in lower bins (clamped: a row with k = 0 has no bin reaching its rank)
        at = digit.clamp(max=_NUM_BINS - 1)[:, None]
        rank = rank - (cumulative.gather(1, at) - hist.gather(1, at))[:, 0]
        key = key | (digit << shift)
        prefix.copy_(key - (1 << 31))
    # The prefix is now each threshold's full key, and ``rank`` says how many entries equal to it are selected.
    below = torch.empty(n_rows, n, dtype=torch.bool, device=device)
    ties = torch.empty(n_rows, n, dtype=torch.bool, device=device)
    _compare_kernel[grid](bits, n, prefix, below, ties, BLOCK=_BLOCK)
    evict = below | (ties & (ties.cumsum(1, dtype=torch.int32) <= rank[:, None]))
    signed = key - (1 << 31)
    threshold = torch.where(signed < 0, signed ^ 0x7FFFFFFF, signed).to(torch.int32).view(torch.float32)
    nothing = counts == 0
    evict = evict & ~nothing[:, None]
    threshold = torch.where(nothing, torch.full_like(threshold, float("-inf")), threshold)
    return threshold, evict


def select_smallest_rows(values: torch.Tensor, k: Counts) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact selection of the ``k[r]`` smallest entries of every row ``r`` of ``values``, in one launch.

    values: [R, N] float32 (finite or +inf; no NaN). k: [R] counts, 0 <= k[r] <= N: a list or tuple of ints, or a
    tensor. Host counts (a list, or a CPU tensor) are range-checked; counts already on the GPU are not, since reading
    them would synchronise (see :func:`check_counts`).
    Returns (threshold [R], evict [R, N]): per row what :func:`select_smallest` returns for it.
    Triton path: N < 2**31, no host synchronisation.
    """
    if values.numel() and kernel_backend(values) == "triton":  # each implementation checks its arguments
        return select_smallest_rows_triton(values, k)
    return select_smallest_rows_reference(values, k)


def _select_smallest_triton(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    threshold, evict = select_smallest_rows_triton(values[None], [k])
    return threshold[0], evict[0]


def select_smallest(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact selection of the k smallest entries of a flat float32 buffer.

    values: [N] float32 (finite or +inf; no NaN). -0.0 is treated as 0.0.
    k: number of entries to select, 0 <= k <= N.
    Returns (threshold, evict): threshold is a 0-dim float32 tensor, the k-th smallest value (1-based; -inf when
    k == 0); evict is a [N] bool mask with exactly k True entries: every value < threshold, plus the first
    (k - count(values < threshold)) entries equal to threshold in index order (ties go to the lower index), i.e. the
    first k entries of a stable ascending argsort.
    Triton path: N < 2**31.
    """
    _check(values, k)
    if k == 0:
        return _nothing_selected(values)
    if kernel_backend(values) == "triton":
        return _select_smallest_triton(values, k)
    return select_smallest_reference(values, k)
