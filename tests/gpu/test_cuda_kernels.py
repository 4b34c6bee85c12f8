"""The compiled Triton kernels against their torch references at the shapes of 8B models on a GPU: head_dim 64, 128
and 256 (several column blocks), 32 KV heads in a batch of 4 (128 segments), segments of up to several thousand rows,
up to 64 appended rows, fp32 / bf16 / fp16 rows with int64 and fp32 side columns, and one selection over every score
of a 128k-token prefill of a 32-layer model."""

import pytest
import torch
from helpers import kernel_backend

from fastkvzip_press.triton import kernel_backend as backend_for
from fastkvzip_press.triton import ragged_append, ragged_compact, select_smallest, select_smallest_rows
from fastkvzip_press.triton.ragged_append import ragged_append_reference
from fastkvzip_press.triton.ragged_compact import ragged_compact_reference
from fastkvzip_press.triton.select_smallest import select_smallest_reference, select_smallest_rows_reference

pytestmark = pytest.mark.cuda

HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KV_HEADS, BATCH = 32, 4
MAX_ROWS = 4096
DECISION = (32, 8, 131072)  # layers, KV heads, tokens
ROW_LENGTH = 200_001  # not a multiple of the block


def segment_layout(device, n_segments: int, max_length: int, room: int, seed: int):
    """``(starts, lengths, M)``: segments in shuffled memory order, each followed by at least ``room`` unused rows,
    one of them empty and one ``max_length`` long."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_length + 1, (n_segments,), generator=generator)
    lengths[0], lengths[1] = 0, max_length
    gaps = torch.randint(room, room + 9, (n_segments,), generator=generator)
    starts = torch.empty(n_segments, dtype=torch.int64)
    row = 3
    for segment in torch.randperm(n_segments, generator=generator).tolist():
        starts[segment] = row
        row += int(lengths[segment] + gaps[segment])
    return starts.to(device), lengths.to(device), row + 5


def rows_of(device, n_rows: int, head_dim: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Keys and values ``[M, D]`` of ``dtype``, scores ``[M]`` fp32 and positions ``[M]`` int64, on the device."""
    generator = torch.Generator(device).manual_seed(seed)
    keys, values = (torch.randn(n_rows, head_dim, generator=generator, device=device).to(dtype) for _ in "kv")
    scores = torch.rand(n_rows, generator=generator, device=device)
    positions = torch.randperm(n_rows, generator=generator, device=device)
    return [keys, values, scores, positions]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_compact_equals_the_reference(device, head_dim, dtype):
    starts, lengths, n_rows = segment_layout(device, BATCH * KV_HEADS, MAX_ROWS, 0, seed=head_dim)
    rows = rows_of(device, n_rows, head_dim, dtype, seed=head_dim)
    generator = torch.Generator(device).manual_seed(1)
    keep = torch.rand(int(lengths.sum()), generator=generator, device=device) < 0.3
    with kernel_backend("triton"):
        assert backend_for(keep) == "triton"
        got = ragged_compact(rows, starts, lengths, keep, spare=16)
    expected = ragged_compact_reference(rows, starts, lengths, keep, spare=16)
    for a, b in zip(got.rows, expected.rows):
        assert a.device == device and a.dtype == b.dtype and torch.equal(a, b)
    for a, b in ((got.starts, expected.starts), (got.lengths, expected.lengths), (got.capacities, expected.capacities)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n_new", [1, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_append_equals_the_reference(device, head_dim, dtype, n_new):
    starts, lengths, n_rows = segment_layout(device, BATCH * KV_HEADS, MAX_ROWS, n_new, seed=n_new)
    buffers = rows_of(device, n_rows, head_dim, dtype, seed=n_new)[::3]  # keys and positions
    generator = torch.Generator(device).manual_seed(2)
    new_keys = torch.randn(len(starts), head_dim, n_new, generator=generator, device=device).to(dtype)
    new_keys = new_keys.transpose(1, 2)  # [S, t, D], not contiguous: the heads of a [B, H, t, D] slice
    new_positions = torch.randint(0, 2**40, (len(starts), n_new), generator=generator, device=device)
    got = [buffer.clone() for buffer in buffers]
    with kernel_backend("triton"):
        ragged_append(got, starts, lengths, [new_keys, new_positions])
    ragged_append_reference(buffers, starts, lengths, [new_keys, new_positions])
    for a, b in zip(got, buffers):
        assert torch.equal(a, b)


def test_select_equals_the_reference_over_one_prefill_decision(device):
    """32 layers x 8 KV heads x 128k tokens of scores with many exact ties (scores on a 1/4096 grid)."""
    generator = torch.Generator(device).manual_seed(3)
    scores = torch.rand(DECISION[0] * DECISION[1] * DECISION[2], generator=generator, device=device)
    scores = scores.mul(4096).floor().div(4096)
    k = int(0.7 * scores.numel())
    with kernel_backend("triton"):
        threshold, evict = select_smallest(scores, k)
    expected_threshold, expected_evict = select_smallest_reference(scores, k)
    assert torch.equal(threshold.view(torch.int32), expected_threshold.view(torch.int32))
    assert torch.equal(evict, expected_evict) and int(evict.sum()) == k


def test_select_rows_equal_the_reference(device):
    """A batch of rows (one per sequence, each its own k, 0 and all included) with -0.0, 0.0, +inf and ties."""
    generator = torch.Generator(device).manual_seed(4)
    n = ROW_LENGTH
    levels = torch.tensor([-2.5, -0.0, 0.0, 0.5, 3.0, float("inf")], device=device)
    tied = levels[torch.randint(len(levels), (2, n), generator=generator, device=device)]
    values = torch.cat([tied, torch.randn(2, n, generator=generator, device=device)])
    k = torch.tensor([0, n // 3, n, n // 16], device=device)
    with kernel_backend("triton"):
        threshold, evict = select_smallest_rows(values, k)
    expected_threshold, expected_evict = select_smallest_rows_reference(values, k)
    assert torch.equal(threshold.view(torch.int32), expected_threshold.view(torch.int32))
    assert torch.equal(evict, expected_evict)
    assert evict.sum(1).tolist() == k.tolist()


def test_auto_picks_triton_for_device_tensors(device):
    with kernel_backend("auto"):
        assert backend_for(torch.empty(0, device=device)) == "triton"
    with kernel_backend("torch"):
        assert backend_for(torch.empty(0, device=device)) == "torch"
