"""The kernels at the shapes a GPU gives them, against their torch references, bit for bit.

A ragged layer of an 8B model holds 32 KV heads per sequence (a batch of 4: 128 segments) of head_dim 64, 128 or 256
(one or two column blocks of the row-copy kernels), rows of thousands of tokens, and takes up to 64 new tokens per
append (a question or a prefill chunk); the decision selects over rows of layers x heads x pairs scores that came
from bf16 gates (many exact ties). On CPU these run in Triton's interpreter (``TRITON_INTERPRET=1``, set by the
conftest), which is slow: the default run keeps one case per head_dim, dtype and size class, the cross product and
the largest sizes are marked slow. The kernels copy rows, so the results must be bit-equal to the references,
including -0.0, infinities, NaN payloads and subnormals.
"""

import pytest
import torch
from helpers import KERNEL_DEVICE, kernel_backend

import fastkvzip_press.triton as kernels
from fastkvzip_press.triton.ragged_append import ragged_append_reference
from fastkvzip_press.triton.ragged_compact import ragged_compact_reference
from fastkvzip_press.triton.select_smallest import select_smallest_reference, select_smallest_rows_reference

pytestmark = pytest.mark.usefixtures("needs_triton")

HEADS = 32  # KV heads per layer of Llama-3.1-8B / Qwen3-8B
HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dtype_id(value: object) -> str | None:
    """Test ids such as ``bfloat16`` instead of ``dtype1``."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


SAME_SIZE_INTS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_bit_equal(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bits (``torch.equal`` alone would take -0.0 for 0.0 and fail on NaN)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    ints = SAME_SIZE_INTS.get(got.dtype)
    if ints is not None:
        got, expected = got.view(ints), expected.view(ints)
    assert torch.equal(got, expected)


def cache_layout(
    n_segments: int, max_length: int, max_room: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(starts [S], lengths [S], M) of a ragged layer: segments back to back in (sequence, head) order, each of a
    random length in [0, max_length] followed by up to ``max_room`` spare rows. The first segment is the longest
    (``max_length`` rows); one head in 16 holds nothing (emptied by eviction)."""
    lengths = torch.randint(0, max_length + 1, (n_segments,), generator=generator)
    lengths[0] = max_length
    lengths[1 + torch.randperm(n_segments - 1, generator=generator)[: n_segments // 16]] = 0
    capacities = lengths + torch.randint(0, max_room + 1, (n_segments,), generator=generator)
    starts = capacities.cumsum(0) - capacities
    return starts.to(KERNEL_DEVICE), lengths.to(KERNEL_DEVICE), int(capacities.sum())


def key_rows(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random keys or values with a sprinkle of the values a copy must not alter: +-0.0, +-inf, NaN, subnormals."""
    rows = torch.randn(shape, generator=generator).to(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), torch.finfo(dtype).tiny / 4])
    at = torch.rand(shape, generator=generator) < 0.01
    picks = torch.randint(len(special), (int(at.sum()),), generator=generator)
    rows[at] = special[picks].to(dtype)
    return rows.to(KERNEL_DEVICE)


def layer_rows(n_rows: int, head_dim: int, dtype: torch.dtype, generator: torch.Generator) -> list[torch.Tensor]:
    """What a ragged layer compacts: keys and values [M, D], positions [M] int32, scores [M] float32."""
    positions = torch.randint(0, 2**31 - 1, (n_rows,), generator=generator, dtype=torch.int32)
    scores = torch.rand(n_rows, generator=generator)
    return [
        key_rows((n_rows, head_dim), dtype, generator),
        key_rows((n_rows, head_dim), dtype, generator),
        positions.to(KERNEL_DEVICE),
        scores.to(KERNEL_DEVICE),
    ]


def check_compaction(
    n_segments: int, max_length: int, head_dim: int, dtype: torch.dtype, spare: int = 16, seed: int = 0
) -> None:
    generator = torch.Generator().manual_seed(seed)
    starts, lengths, n_rows = cache_layout(n_segments, max_length, max_room=8, generator=generator)
    rows = layer_rows(n_rows, head_dim, dtype, generator)
    keep = (torch.rand(int(lengths.sum()), generator=generator) < 0.3).to(KERNEL_DEVICE)
    with kernel_backend("triton"):
        got = kernels.ragged_compact(rows, starts, lengths, keep, spare)
    expected = ragged_compact_reference(rows, starts, lengths, keep, spare)
    for got_rows, expected_rows in zip(got.rows, expected.rows, strict=True):
        assert_bit_equal(got_rows, expected_rows)
    for name in ("starts", "lengths", "capacities"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert got.host_lengths == expected.lengths.tolist()


def check_append(n_segments: int, n_new: int, head_dim: int, dtype: torch.dtype, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    starts, lengths, n_rows = cache_layout(n_segments, 200, max_room=0, generator=generator)
    # Room for the new rows after every segment: shift each segment by the new rows of the segments before it.
    starts = starts + n_new * torch.arange(n_segments, device=KERNEL_DEVICE)
    n_rows += n_new * n_segments
    keys, values = (key_rows((n_rows, head_dim), dtype, generator) for _ in range(2))
    positions = torch.full((n_rows,), -1, dtype=torch.int32, device=KERNEL_DEVICE)
    # New keys as a model hands them over: [S, t, D] heads of a [t, S, D] projection, not contiguous.
    new_keys, new_values = (key_rows((n_new, n_segments, head_dim), dtype, generator).transpose(0, 1) for _ in "kv")
    new_positions = (1000 + torch.arange(n_new, dtype=torch.int32, device=KERNEL_DEVICE)).expand(n_segments, -1)
    buffers, new_rows = [keys, values, positions], [new_keys, new_values, new_positions.contiguous()]
    got, expected = [t.clone() for t in buffers], [t.clone() for t in buffers]
    with kernel_backend("triton"):
        kernels.ragged_append(got, starts, lengths, new_rows)
    ragged_append_reference(expected, starts, lengths, new_rows)
    for got_rows, expected_rows in zip(got, expected, strict=True):
        assert_bit_equal(got_rows, expected_rows)


def gate_scores(n_rows: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """[R, N] float32 scores as the decision sees them: sigmoid outputs of bf16 gates (few distinct values, many
    exact ties), with the protected pairs (sink, window, padding) at +inf."""
    scores = torch.sigmoid(torch.randn(n_rows, n, generator=generator) * 3).bfloat16().float()
    scores[torch.rand(n_rows, n, generator=generator) < 0.05] = float("inf")
    return scores.to(KERNEL_DEVICE)


def check_selection(n_rows: int, n: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    values = gate_scores(n_rows, n, generator)
    # No row, every row, and ratios around the usual compression ratios.
    counts = [0, n, *(int(r * n) for r in torch.rand(n_rows, generator=generator).mul(0.9).tolist())][:n_rows]
    with kernel_backend("triton"):
        thresholds, evict = kernels.select_smallest_rows(values, counts)
    expected_thresholds, expected = select_smallest_rows_reference(values, counts)
    assert torch.equal(evict, expected)
    assert_bit_equal(thresholds, expected_thresholds)
    assert evict.sum(1).tolist() == counts


# ------------------------------------------------------------------------------------------------ default run
# Together: each head_dim and dtype, 128 segments (4 x 32 heads), rows of 4096, n_new of 1 and 64, 64k-entry rows.


def test_compact_a_batch_of_32_heads():
    """4 sequences x 32 heads = 128 segments of up to 64 rows."""
    check_compaction(4 * HEADS, 64, 128, torch.bfloat16)


@pytest.mark.parametrize(("head_dim", "dtype"), [(64, torch.float32), (256, torch.float16)], ids=dtype_id)
def test_compact_other_head_dims(head_dim, dtype):
    """One sequence's 32 heads; head_dim 256 takes two column blocks per row."""
    check_compaction(HEADS, 64, head_dim, dtype)


@pytest.mark.parametrize(("head_dim", "dtype"), [(128, torch.bfloat16), (256, torch.float32)], ids=dtype_id)
def test_compact_long_rows(head_dim, dtype):
    """A head of 4096 rows (128 row blocks) beside a shorter one."""
    check_compaction(2, 4096, head_dim, dtype)


@pytest.mark.parametrize(
    ("head_dim", "dtype", "n_new"), [(64, torch.float16, 64), (128, torch.bfloat16, 1)], ids=dtype_id
)
def test_append_to_a_batch_of_32_heads(head_dim, dtype, n_new):
    """A 64-token chunk and a decoding step, into 4 sequences x 32 heads."""
    check_append(4 * HEADS, n_new, head_dim, dtype)


def test_append_wide_heads():
    """head_dim 256: two column blocks per row."""
    check_append(HEADS, 64, 256, torch.float32)


def test_select_over_layers_and_heads():
    """One row per sequence over 32 layers x 8 KV heads x 256 pairs (64 blocks per row)."""
    check_selection(4, 32 * 8 * 256)


# ------------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_compact_every_head_dim_and_dtype(head_dim, dtype):
    check_compaction(4 * HEADS, 300, head_dim, dtype, seed=head_dim)


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_compact_32_heads_of_thousands_of_rows(head_dim):
    check_compaction(HEADS, 3000, head_dim, torch.bfloat16, spare=64)


@pytest.mark.slow
@pytest.mark.parametrize("n_new", [1, 17, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_append_every_head_dim_dtype_and_size(head_dim, dtype, n_new):
    check_append(4 * HEADS, n_new, head_dim, dtype, seed=n_new)


@pytest.mark.slow
def test_select_rows_of_a_million():
    """32 layers x 8 heads x 4096 pairs per sequence."""
    check_selection(3, 32 * 8 * 4096)


@pytest.mark.slow
def test_select_one_large_buffer():
    values = gate_scores(1, 1 << 20, torch.Generator().manual_seed(3))[0]
    for k in (1, 300_000, 1 << 20):
        with kernel_backend("triton"):
            threshold, evict = kernels.select_smallest(values, k)
        expected_threshold, expected = select_smallest_reference(values, k)
        assert torch.equal(evict, expected)
        assert_bit_equal(threshold, expected_threshold)
