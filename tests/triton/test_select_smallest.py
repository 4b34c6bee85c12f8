"""select_smallest: the Triton radix select against its torch reference, and the reference against a stable
argsort."""

import pytest
import torch
from helpers import FEW, KERNEL_DEVICE, kernel_backend
from hypothesis import given
from hypothesis import strategies as st

import fastkvzip_press.triton as kernels
from fastkvzip_press.triton.select_smallest import (
    check_counts,
    select_smallest_reference,
    select_smallest_rows_reference,
)

INF = float("inf")


def stable_argsort_rule(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold and mask from a stable ascending argsort of the values with -0.0 read as 0.0."""
    canonical = torch.where(values == 0, torch.zeros_like(values), values)
    order = torch.argsort(canonical, stable=True)
    evict = torch.zeros_like(values, dtype=torch.bool)
    evict[order[:k]] = True
    threshold = canonical[order[k - 1]] if k else torch.tensor(-INF)
    return threshold, evict


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both 0-dim float32 with the same bit pattern (tells -0.0 from 0.0)."""
    a, b = a.cpu(), b.cpu()
    return (
        a.dtype == b.dtype == torch.float32
        and a.shape == b.shape == ()
        and torch.equal(a.view(torch.int32), b.view(torch.int32))
    )


@st.composite
def selections(draw, max_n: int = 300):
    """Values with many ties (a few levels, including -0.0, 0.0 and +inf) or continuous values, and a k."""
    n = draw(st.integers(0, max_n))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        levels = torch.tensor(
            draw(st.lists(st.sampled_from([-2.5, -1.0, -0.0, 0.0, 0.5, 3.0, INF]), min_size=1, max_size=4))
        )
        values = levels[torch.randint(len(levels), (n,), generator=generator)]
    else:
        values = torch.randn(n, generator=generator)
        values[torch.rand(n, generator=generator) < 0.1] = INF
    return values.to(KERNEL_DEVICE), draw(st.integers(0, n))


@FEW
@given(selections())
def test_select_reference_is_the_stable_argsort_rule(case):
    values, k = case
    threshold, evict = select_smallest_reference(values, k)
    expected_threshold, expected_evict = stable_argsort_rule(values.cpu(), k)
    assert same_bits(threshold.cpu(), expected_threshold)
    assert torch.equal(evict.cpu(), expected_evict)
    assert int(evict.sum()) == k


@FEW
@given(selections())
def test_select_triton_matches_reference(needs_triton, case):
    values, k = case
    with kernel_backend("triton"):
        threshold, evict = kernels.select_smallest(values, k)
    expected_threshold, expected_evict = select_smallest_reference(values, k)
    assert same_bits(threshold, expected_threshold)
    assert torch.equal(evict, expected_evict)


@pytest.mark.parametrize("levels", [3, None])
def test_select_triton_across_blocks(needs_triton, levels):
    """Several kernel blocks: histogram atomics and tie ranks carried from block to block."""
    generator = torch.Generator().manual_seed(levels or 0)
    if levels:
        values = torch.randint(levels, (5000,), generator=generator).float()
    else:
        values = torch.randn(5000, generator=generator)
    values = values.to(KERNEL_DEVICE)
    for k in (1, 1023, 1024, 2500, 4999, 5000):
        with kernel_backend("triton"):
            threshold, evict = kernels.select_smallest(values, k)
        expected_threshold, expected_evict = select_smallest_reference(values, k)
        assert same_bits(threshold, expected_threshold)
        assert torch.equal(evict, expected_evict)


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize(
    ("values", "k", "threshold"),
    [
        ([], 0, -INF),
        ([1.0, 2.0], 0, -INF),
        ([7.0] * 5, 3, 7.0),
        ([INF] * 4, 4, INF),
        ([INF, 1.0, INF], 3, INF),
        ([-0.0, 0.0, -0.0], 2, 0.0),
        ([2.0, -1.0, 2.0, 5.0], 4, 5.0),
        ([-3.5, 1e-45, -1e-45, 0.0], 2, -1e-45),
    ],
)
def test_select_edge_cases(name, values, k, threshold):
    if name == "triton":
        pytest.importorskip("triton")
    values = torch.tensor(values, dtype=torch.float32, device=KERNEL_DEVICE)
    with kernel_backend(name):
        got, evict = kernels.select_smallest(values, k)
    expected_threshold, expected_evict = stable_argsort_rule(values.cpu(), k)
    assert same_bits(got.cpu(), torch.tensor(threshold))
    assert same_bits(got.cpu(), expected_threshold)
    assert torch.equal(evict.cpu(), expected_evict)


def test_select_large_buffer_torch():
    values = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)).round(decimals=2)  # many ties
    with kernel_backend("torch"):
        threshold, evict = kernels.select_smallest(values, 400_000)
    expected_threshold, expected_evict = stable_argsort_rule(values, 400_000)
    assert same_bits(threshold, expected_threshold)
    assert torch.equal(evict, expected_evict)


def test_select_rejects_bad_arguments():
    with pytest.raises(ValueError, match="outside"):
        kernels.select_smallest(torch.zeros(3), 4)
    with pytest.raises(TypeError, match="float32"):
        kernels.select_smallest(torch.zeros(3, dtype=torch.float64), 1)


@st.composite
def row_batches(draw):
    """A batch of rows (one per sequence, or per (sequence, layer)) with a count each, some rows tied, some k = 0."""
    n_rows, n = draw(st.integers(1, 5)), draw(st.integers(1, 400))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    values = torch.randn(n_rows, n, generator=generator)
    if draw(st.booleans()):
        values = values.round()  # many ties
    values[torch.rand(n_rows, n, generator=generator) < 0.1] = INF  # protected pairs
    k = torch.tensor([draw(st.integers(0, n)) for _ in range(n_rows)])
    return values.to(KERNEL_DEVICE), k


@FEW
@given(row_batches())
def test_rows_select_each_rows_own_k_smallest(case):
    values, k = case
    thresholds, evict = select_smallest_rows_reference(values, k)
    for row, count, threshold, chosen in zip(values, k.tolist(), thresholds, evict):
        expected_threshold, expected = select_smallest_reference(row, count)
        assert torch.equal(chosen, expected) and int(chosen.sum()) == count
        assert same_bits(threshold, expected_threshold)


@FEW
@given(row_batches())
def test_rows_triton_matches_reference(needs_triton, case):
    values, k = case
    with kernel_backend("triton"):
        thresholds, evict = kernels.select_smallest_rows(values, k)
    expected_thresholds, expected = select_smallest_rows_reference(values, k)
    assert torch.equal(evict, expected)
    assert all(same_bits(a, b) for a, b in zip(thresholds, expected_thresholds))


def test_rows_reject_bad_arguments():
    with pytest.raises(ValueError, match="one count per row"):
        kernels.select_smallest_rows(torch.zeros(2, 3), torch.tensor([1]))
    with pytest.raises(ValueError, match="outside"):
        kernels.select_smallest_rows(torch.zeros(2, 3), torch.tensor([1, 4]))
    with pytest.raises(TypeError, match="2-D float32"):
        kernels.select_smallest_rows(torch.zeros(3), torch.tensor([1]))


@pytest.mark.parametrize("counts", [[1, 3], (1, 3), torch.tensor([1, 3]), torch.tensor([1.0, 3.0])])
def test_rows_take_counts_known_on_the_host(counts):
    """A list, a tuple or a CPU tensor of counts: checked on the host, the same selection as the reference."""
    values = torch.tensor([[3.0, 1.0, 2.0], [0.5, 0.5, 0.5]], device=KERNEL_DEVICE)
    _, evict = kernels.select_smallest_rows(values, counts)
    assert evict.tolist() == [[False, True, False], [True, True, True]]
    with pytest.raises(ValueError, match="outside"):
        kernels.select_smallest_rows(values, [1, 4] if isinstance(counts, list) else torch.tensor([-1, 0]))


def test_counts_on_the_device_are_checked_without_reading_them():
    """Counts already on the device are checked for shape only: reading their values waits for the device (a host
    synchronisation in the decoding loop). Meta tensors stand in for them: any read of their values raises."""
    values = torch.zeros(2, 5)
    on_device = torch.tensor([1, 9], device="meta")  # 9 > 5: out of range, but only the device knows
    assert check_counts(values, on_device).device.type == "meta"
    with pytest.raises(ValueError, match="one count per row"):
        check_counts(values, torch.tensor([1, 2, 3], device="meta"))
    with pytest.raises(ValueError, match="outside"):
        check_counts(values, torch.tensor([1, 9]))  # on the host the range is checked


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rows_select_on_cuda_without_host_synchronisation(needs_triton):
    values = torch.rand(3, 5000, device="cuda")
    for counts in ([0, 10, 5000], torch.tensor([0, 10, 5000], device="cuda")):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _, evict = kernels.select_smallest_rows(values, counts)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert evict.sum(1).tolist() == [0, 10, 5000]
