"""ragged_compact: the Triton row scatter against its torch reference, and the reference against a loop."""

import pytest
import torch
from helpers import FEW, KERNEL_DEVICE, ROW_DTYPES, as_index, batch_layouts, kernel_backend, ragged_layouts
from hypothesis import given
from hypothesis import strategies as st

import fastkvzip_press.triton as kernels
from fastkvzip_press.triton.ragged_compact import ragged_compact_reference


def row_tensors(n_rows: int, width: int, dtype: torch.dtype, generator: torch.Generator) -> list[torch.Tensor]:
    """Keys and values [M, D], scores [M] float32, positions [M] int64."""
    keys, values = (torch.randn(n_rows, width, generator=generator).to(dtype) for _ in range(2))
    scores = torch.rand(n_rows, generator=generator)
    positions = torch.randperm(n_rows, generator=generator)
    return [t.to(KERNEL_DEVICE) for t in (keys, values, scores, positions)]


def compact_by_loop(rows, starts, lengths, keep, spare):
    """Each segment's kept rows, then ``spare`` zero rows, segment after segment."""
    flags = keep.cpu().split(lengths.tolist())
    packed = []
    for t in rows:
        parts = [t.new_zeros((0, *t.shape[1:]))]
        for start, length, kept in zip(starts.tolist(), lengths.tolist(), flags):
            parts += [t[start : start + length][kept.to(t.device)], t.new_zeros((spare, *t.shape[1:]))]
        packed.append(torch.cat(parts))
    return packed


def assert_same_compaction(got: kernels.CompactedRows, expected: kernels.CompactedRows) -> None:
    assert len(got.rows) == len(expected.rows)
    for a, b in zip(got.rows, expected.rows):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    for name in ("starts", "lengths", "capacities"):
        a, b = getattr(got, name), getattr(expected, name)
        assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b), name
    assert got.host_lengths == expected.host_lengths == expected.lengths.tolist()


@st.composite
def compactions(draw):
    starts, lengths, _, n_rows = draw(ragged_layouts())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    rows = row_tensors(n_rows, draw(st.sampled_from([1, 8, 16])), draw(st.sampled_from(ROW_DTYPES)), generator)
    keep_ratio = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    keep = (torch.rand(sum(lengths), generator=generator) < keep_ratio).to(KERNEL_DEVICE)
    return rows, as_index(starts), as_index(lengths), keep, draw(st.integers(0, 4))


@FEW
@given(compactions())
def test_compact_reference_matches_loop(case):
    rows, starts, lengths, keep, spare = case
    packed = ragged_compact_reference(rows, starts, lengths, keep, spare)
    for got, expected in zip(packed.rows, compact_by_loop(rows, starts, lengths, keep, spare)):
        assert torch.equal(got, expected)
    kept = torch.tensor([int(flags.sum()) for flags in keep.cpu().split(lengths.tolist())], dtype=torch.int64)
    assert torch.equal(packed.lengths.cpu(), kept)
    assert torch.equal(packed.capacities.cpu(), kept + spare)
    assert torch.equal(packed.starts.cpu(), (kept + spare).cumsum(0) - (kept + spare))


@FEW
@given(compactions())
def test_compact_triton_matches_reference(needs_triton, case):
    rows, starts, lengths, keep, spare = case
    with kernel_backend("triton"):
        got = kernels.ragged_compact(rows, starts, lengths, keep, spare)
    assert_same_compaction(got, ragged_compact_reference(rows, starts, lengths, keep, spare))


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_compact_dense_cache(name):
    """A dense cache [H, T, D] viewed as [H*T, D], plus side data of other trailing shapes and dtypes."""
    if name == "triton":
        pytest.importorskip("triton")
    heads, n_tokens, head_dim = 4, 33, 16
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(heads, n_tokens, head_dim, generator=generator).bfloat16().to(KERNEL_DEVICE)
    rows = [
        keys.reshape(heads * n_tokens, head_dim),
        torch.randn(heads * n_tokens, 2, 3, generator=generator).half().to(KERNEL_DEVICE),
        torch.rand(heads * n_tokens, generator=generator).to(KERNEL_DEVICE) < 0.5,
        torch.arange(heads * n_tokens, device=KERNEL_DEVICE),
    ]
    starts = torch.arange(heads, device=KERNEL_DEVICE) * n_tokens
    lengths = torch.full((heads,), n_tokens, device=KERNEL_DEVICE)
    keep = torch.rand(heads, n_tokens, generator=generator).to(KERNEL_DEVICE) < 0.6
    with kernel_backend(name):
        got = kernels.ragged_compact(rows, starts, lengths, keep.reshape(-1), spare=5)
    assert_same_compaction(got, ragged_compact_reference(rows, starts, lengths, keep.reshape(-1), spare=5))
    for got_rows, expected in zip(got.rows, compact_by_loop(rows, starts, lengths, keep.reshape(-1), 5)):
        assert torch.equal(got_rows, expected)
    first = got.starts[1] - 5  # the first head's kept keys end where its spare rows begin
    assert torch.equal(got.rows[0][:first], keys[0][keep[0]])


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_compact_degenerate_layouts(name):
    if name == "triton":
        pytest.importorskip("triton")
    rows = [torch.arange(6, device=KERNEL_DEVICE), torch.ones(6, 3, device=KERNEL_DEVICE)]
    none = as_index([])
    with kernel_backend(name):
        empty = kernels.ragged_compact(
            rows, none, none, torch.zeros(0, dtype=torch.bool, device=KERNEL_DEVICE), spare=2
        )
        dropped = kernels.ragged_compact(
            rows, as_index([0, 3]), as_index([3, 3]), torch.zeros(6, dtype=torch.bool, device=KERNEL_DEVICE), spare=2
        )
        no_rows = kernels.ragged_compact([], as_index([0]), as_index([2]), torch.ones(2, dtype=torch.bool))
    assert [tuple(t.shape) for t in empty.rows] == [(0,), (0, 3)] and empty.starts.numel() == 0
    assert torch.equal(dropped.rows[0], torch.zeros(4, dtype=torch.int64, device=KERNEL_DEVICE))
    assert dropped.starts.tolist() == [0, 2] and dropped.lengths.tolist() == [0, 0]
    assert no_rows.rows == [] and no_rows.capacities.tolist() == [2]


def test_compact_rejects_bad_layouts():
    rows = [torch.zeros(4, 2)]
    with pytest.raises(ValueError, match="flags"):
        kernels.ragged_compact(rows, as_index([0]), as_index([3]), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="outside"):
        kernels.ragged_compact(rows, as_index([2]), as_index([3]), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="starts and lengths must be"):
        kernels.ragged_compact(rows, as_index([0, 1]), as_index([3]), torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="keep must be a 1-D bool tensor"):
        kernels.ragged_compact(rows, as_index([0]), as_index([3]), torch.ones(3))
    with pytest.raises(ValueError, match="spare=-1"):
        kernels.ragged_compact(rows, as_index([0]), as_index([3]), torch.ones(3, dtype=torch.bool), spare=-1)
    with pytest.raises(ValueError, match="share their leading dimension"):
        kernels.ragged_compact([*rows, torch.zeros(5)], as_index([0]), as_index([3]), torch.ones(3, dtype=torch.bool))


@st.composite
def batch_compactions(draw):
    """A batch's ragged layer (B x H segments with spare rows), its keys, values and side columns, and a keep mask."""
    starts, lengths, _, n_rows = draw(batch_layouts())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    rows = row_tensors(n_rows, draw(st.sampled_from([4, 16])), draw(st.sampled_from(ROW_DTYPES)), generator)
    keep = (torch.rand(sum(lengths), generator=generator) < draw(st.sampled_from([0.2, 0.6, 1.0]))).to(KERNEL_DEVICE)
    return rows, as_index(starts), as_index(lengths), keep, draw(st.integers(0, 4))


@FEW
@given(batch_compactions())
def test_compact_a_batch_triton_matches_reference(needs_triton, case):
    rows, starts, lengths, keep, spare = case
    with kernel_backend("triton"):
        got = kernels.ragged_compact(rows, starts, lengths, keep, spare)
    assert_same_compaction(got, ragged_compact_reference(rows, starts, lengths, keep, spare))
