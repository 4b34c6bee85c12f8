"""ragged_append: the Triton kernel against its torch reference, and the reference against a loop."""

import pytest
import torch
from helpers import FEW, KERNEL_DEVICE, ROW_DTYPES, as_index, batch_layouts, kernel_backend, ragged_layouts
from hypothesis import given
from hypothesis import strategies as st

import fastkvzip_press.triton as kernels
from fastkvzip_press.triton.ragged_append import ragged_append_reference


@st.composite
def appends(draw):
    n_new = draw(st.integers(0, 6))
    starts, lengths, _, n_rows = draw(ragged_layouts(min_room=n_new))
    width = draw(st.sampled_from([1, 8, 16]))
    dtype = draw(st.sampled_from((*ROW_DTYPES, torch.int64)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    buffer = torch.randn(n_rows, width, generator=generator).mul(100).to(dtype)
    new_rows = torch.randn(len(starts), width, n_new, generator=generator).mul(100).to(dtype)
    new_rows = new_rows.transpose(1, 2)  # [S, t, D] and not contiguous, like the heads of a [1, H, t, D] slice
    if width == 1 and draw(st.booleans()):
        buffer, new_rows = buffer[:, 0], new_rows[..., 0]  # per-token data [M]
    return buffer.to(KERNEL_DEVICE), as_index(starts), as_index(lengths), new_rows.to(KERNEL_DEVICE)


def assert_triton_matches_reference(buffer, starts, lengths, new_rows):
    got, expected = buffer.clone(), buffer.clone()
    with kernel_backend("triton"):
        kernels.ragged_append(got, starts, lengths, new_rows)
    ragged_append_reference(expected, starts, lengths, new_rows)
    assert torch.equal(got, expected)


@FEW
@given(appends())
def test_append_reference_matches_loop(case):
    buffer, starts, lengths, new_rows = case
    got, expected = buffer.clone(), buffer.clone()
    ragged_append_reference(got, starts, lengths, new_rows)
    for s, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        expected[start + length : start + length + new_rows.shape[1]] = new_rows[s]
    assert torch.equal(got, expected)


@FEW
@given(appends())
def test_append_triton_matches_reference(needs_triton, case):
    assert_triton_matches_reference(*case)


def test_append_writes_into_a_view(needs_triton):
    """The buffer may be a view (here every other column of a wider tensor): the rows land in the base tensor."""
    base = torch.zeros(10, 8, device=KERNEL_DEVICE)
    new_rows = torch.arange(1, 13, dtype=torch.float32, device=KERNEL_DEVICE).reshape(2, 3, 2)
    with kernel_backend("triton"):
        kernels.ragged_append(base[:, ::2][:, :2], as_index([0, 5]), as_index([1, 0]), new_rows)
    assert torch.equal(base[1:4, [0, 2]], new_rows[0]) and torch.equal(base[5:8, [0, 2]], new_rows[1])
    assert int(base.count_nonzero()) == 12


def test_append_one_dimensional_positions(needs_triton):
    """Per-row side data such as int32 positions [M] appends like keys (the ragged cache's position buffer)."""
    buffer = torch.full((12,), -1, dtype=torch.int32, device=KERNEL_DEVICE)
    starts, lengths = as_index([0, 6]), as_index([2, 4])
    new_rows = torch.tensor([[7, 8], [9, 10]], dtype=torch.int32, device=KERNEL_DEVICE)
    expected = buffer.clone()
    ragged_append_reference(expected, starts, lengths, new_rows)
    with kernel_backend("triton"):
        kernels.ragged_append(buffer, starts, lengths, new_rows)
    assert torch.equal(buffer, expected) and expected[[2, 3, 10, 11]].tolist() == [7, 8, 9, 10]


def test_append_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="new_rows"):
        kernels.ragged_append(torch.zeros(8, 4), as_index([0]), as_index([0]), torch.zeros(1, 2, 3))
    with pytest.raises(TypeError, match="dtype"):
        kernels.ragged_append(torch.zeros(8, 4), as_index([0]), as_index([0]), torch.zeros(1, 2, 4).half())
    with pytest.raises(ValueError, match="starts and lengths must be"):
        kernels.ragged_append(torch.zeros(8, 4), as_index([0, 4]), as_index([0]), torch.zeros(1, 2, 4))


def test_triton_append_needs_a_buffer_it_can_write_in_place(needs_triton):
    buffer = torch.zeros(8, 4, 3, device=KERNEL_DEVICE).transpose(1, 2)  # [8, 3, 4] rows that do not flatten
    with kernel_backend("triton"), pytest.raises(ValueError, match="flatten without a copy"):
        kernels.ragged_append(buffer, as_index([0]), as_index([0]), torch.ones(1, 1, 3, 4, device=KERNEL_DEVICE))


@st.composite
def batch_appends(draw):
    """New tokens [B * H, t, D] for a batch's ragged layer with room for them."""
    n_new = draw(st.integers(1, 5))
    starts, lengths, _, n_rows = draw(batch_layouts(min_room=n_new))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from(ROW_DTYPES))
    buffer = torch.randn(n_rows, 8, generator=generator).to(dtype)
    new_rows = torch.randn(len(starts), n_new, 8, generator=generator).to(dtype)
    return buffer.to(KERNEL_DEVICE), as_index(starts), as_index(lengths), new_rows.to(KERNEL_DEVICE)


@FEW
@given(batch_appends())
def test_append_to_a_batch_triton_matches_reference(needs_triton, case):
    assert_triton_matches_reference(*case)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@FEW
@given(case=appends())
def test_one_call_appends_to_every_buffer_of_a_layout(request, backend, case):
    """Keys, values and side columns share one layout: appending to all of them in one call (one target index)
    writes what one call per buffer writes."""
    if backend == "triton":
        request.getfixturevalue("needs_triton")
    buffer, starts, lengths, new_rows = case
    other, other_rows = buffer.flip(0).clone(), new_rows.flip(0).clone()
    expected = [buffer.clone(), other.clone()]
    ragged_append_reference(expected[0], starts, lengths, new_rows)
    ragged_append_reference(expected[1], starts, lengths, other_rows)
    got = [buffer.clone(), other.clone()]
    with kernel_backend(backend):
        kernels.ragged_append(got, starts, lengths, [new_rows, other_rows])
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_buffers_and_new_rows_must_pair_up():
    buffers = [torch.zeros(8, 4), torch.zeros(8, 4)]
    with pytest.raises(ValueError, match="one tensor of new rows per buffer"):
        kernels.ragged_append(buffers, as_index([0]), as_index([0]), [torch.zeros(1, 1, 4)])
    with pytest.raises(ValueError, match="one tensor of new rows per buffer"):
        kernels.ragged_append(buffers, as_index([0]), as_index([0]), torch.zeros(1, 1, 4))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_append_to_no_buffers_does_nothing(request, backend):
    if backend == "triton":
        request.getfixturevalue("needs_triton")
    with kernel_backend(backend):
        kernels.ragged_append([], as_index([0]), as_index([0]), [])
