"""Triton kernels of ``fastkvzip_press.triton`` against their torch references, and the references against plain
loops; without a GPU the Triton kernels run in Triton's CPU interpreter."""

import contextlib
import importlib.util
import os
import sys
from unittest import mock

import torch

# Triton reads TRITON_INTERPRET when ``triton.jit`` decorates a function, not at launch. The conftest has already
# imported triton (through kvpress) and this package by now, so the kernels of this package are decorated on their
# first launch instead (dispatch.lazy_jit) and call Triton builtins only, not the helpers that triton.language
# decorates at its own import (tl.sum, tl.cumsum). Setting the variable here, before any launch, is then enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastkvzip_press.triton as kernels  # noqa: E402
from fastkvzip_press.triton import dispatch  # noqa: E402
from fastkvzip_press.triton.ragged_append import ragged_append_reference  # noqa: E402
from fastkvzip_press.triton.ragged_compact import ragged_compact_reference  # noqa: E402
from fastkvzip_press.triton.select_threshold import select_smallest_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FEW = settings(max_examples=30, deadline=None)
ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INF = float("inf")


@contextlib.contextmanager
def backend(name: str):
    """Force ``FASTKVZIP_PRESS_KERNELS`` inside a hypothesis example (function-scoped fixtures are not reset there)."""
    with mock.patch.dict(os.environ, {dispatch.KERNELS_ENV: name}):
        yield


@pytest.fixture(scope="module")
def needs_triton():
    pytest.importorskip("triton")


# ------------------------------------------------------------------------------------------------- select_smallest


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
    return values.to(DEVICE), draw(st.integers(0, n))


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
    with backend("triton"):
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
    values = values.to(DEVICE)
    for k in (1, 1023, 1024, 2500, 4999, 5000):
        with backend("triton"):
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
    values = torch.tensor(values, dtype=torch.float32, device=DEVICE)
    with backend(name):
        got, evict = kernels.select_smallest(values, k)
    expected_threshold, expected_evict = stable_argsort_rule(values.cpu(), k)
    assert same_bits(got.cpu(), torch.tensor(threshold))
    assert same_bits(got.cpu(), expected_threshold)
    assert torch.equal(evict.cpu(), expected_evict)


def test_select_large_buffer_torch():
    values = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)).round(decimals=2)  # many ties
    with backend("torch"):
        threshold, evict = kernels.select_smallest(values, 400_000)
    expected_threshold, expected_evict = stable_argsort_rule(values, 400_000)
    assert same_bits(threshold, expected_threshold)
    assert torch.equal(evict, expected_evict)


def test_select_rejects_bad_arguments():
    with pytest.raises(ValueError, match="outside"):
        kernels.select_smallest(torch.zeros(3), 4)
    with pytest.raises(TypeError, match="float32"):
        kernels.select_smallest(torch.zeros(3, dtype=torch.float64), 1)


# ---------------------------------------------------------------------------------------------------- ragged layouts


@st.composite
def ragged_layouts(draw, min_room: int = 0):
    """(starts, lengths, rooms, M): up to 6 segments in shuffled memory order, each followed by ``room`` unused rows
    (at least ``min_room``), with unused rows before the first and after the last segment."""
    n_segments = draw(st.integers(0, 6))
    lengths = draw(st.lists(st.integers(0, 40), min_size=n_segments, max_size=n_segments))
    rooms = draw(st.lists(st.integers(min_room, min_room + 5), min_size=n_segments, max_size=n_segments))
    order = draw(st.permutations(range(n_segments)))
    starts = [0] * n_segments
    row = draw(st.integers(0, 5))
    for s in order:
        starts[s] = row
        row += lengths[s] + rooms[s]
    return starts, lengths, rooms, row + draw(st.integers(0, 3))


def as_index(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


def row_tensors(n_rows: int, width: int, dtype: torch.dtype, generator: torch.Generator) -> list[torch.Tensor]:
    """Keys and values [M, D], scores [M] float32, positions [M] int64."""
    keys, values = (torch.randn(n_rows, width, generator=generator).to(dtype) for _ in range(2))
    scores = torch.rand(n_rows, generator=generator)
    positions = torch.randperm(n_rows, generator=generator)
    return [t.to(DEVICE) for t in (keys, values, scores, positions)]


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


@st.composite
def compactions(draw):
    starts, lengths, _, n_rows = draw(ragged_layouts())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    rows = row_tensors(n_rows, draw(st.sampled_from([1, 8, 16])), draw(st.sampled_from(ROW_DTYPES)), generator)
    keep_ratio = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    keep = (torch.rand(sum(lengths), generator=generator) < keep_ratio).to(DEVICE)
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
    with backend("triton"):
        got = kernels.ragged_compact(rows, starts, lengths, keep, spare)
    assert_same_compaction(got, ragged_compact_reference(rows, starts, lengths, keep, spare))


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_compact_dense_cache(name):
    """A dense cache [H, T, D] viewed as [H*T, D], plus side data of other trailing shapes and dtypes."""
    if name == "triton":
        pytest.importorskip("triton")
    heads, n_tokens, head_dim = 4, 33, 16
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(heads, n_tokens, head_dim, generator=generator).bfloat16().to(DEVICE)
    rows = [
        keys.reshape(heads * n_tokens, head_dim),
        torch.randn(heads * n_tokens, 2, 3, generator=generator).half().to(DEVICE),
        torch.rand(heads * n_tokens, generator=generator).to(DEVICE) < 0.5,
        torch.arange(heads * n_tokens, device=DEVICE),
    ]
    starts = torch.arange(heads, device=DEVICE) * n_tokens
    lengths = torch.full((heads,), n_tokens, device=DEVICE)
    keep = torch.rand(heads, n_tokens, generator=generator).to(DEVICE) < 0.6
    with backend(name):
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
    rows = [torch.arange(6, device=DEVICE), torch.ones(6, 3, device=DEVICE)]
    none = as_index([])
    with backend(name):
        empty = kernels.ragged_compact(rows, none, none, torch.zeros(0, dtype=torch.bool, device=DEVICE), spare=2)
        dropped = kernels.ragged_compact(
            rows, as_index([0, 3]), as_index([3, 3]), torch.zeros(6, dtype=torch.bool, device=DEVICE), spare=2
        )
        no_rows = kernels.ragged_compact([], as_index([0]), as_index([2]), torch.ones(2, dtype=torch.bool))
    assert [tuple(t.shape) for t in empty.rows] == [(0,), (0, 3)] and empty.starts.numel() == 0
    assert torch.equal(dropped.rows[0], torch.zeros(4, dtype=torch.int64, device=DEVICE))
    assert dropped.starts.tolist() == [0, 2] and dropped.lengths.tolist() == [0, 0]
    assert no_rows.rows == [] and no_rows.capacities.tolist() == [2]


def test_compact_rejects_bad_layouts():
    rows = [torch.zeros(4, 2)]
    with pytest.raises(ValueError, match="flags"):
        kernels.ragged_compact(rows, as_index([0]), as_index([3]), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="outside"):
        kernels.ragged_compact(rows, as_index([2]), as_index([3]), torch.ones(3, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------- ragged_append


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
    return buffer.to(DEVICE), as_index(starts), as_index(lengths), new_rows.to(DEVICE)


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
    buffer, starts, lengths, new_rows = case
    got, expected = buffer.clone(), buffer.clone()
    with backend("triton"):
        kernels.ragged_append(got, starts, lengths, new_rows)
    ragged_append_reference(expected, starts, lengths, new_rows)
    assert torch.equal(got, expected)


def test_append_writes_into_a_view(needs_triton):
    """The buffer may be a view (here every other column of a wider tensor): the rows land in the base tensor."""
    base = torch.zeros(10, 8, device=DEVICE)
    new_rows = torch.arange(1, 13, dtype=torch.float32, device=DEVICE).reshape(2, 3, 2)
    with backend("triton"):
        kernels.ragged_append(base[:, ::2][:, :2], as_index([0, 5]), as_index([1, 0]), new_rows)
    assert torch.equal(base[1:4, [0, 2]], new_rows[0]) and torch.equal(base[5:8, [0, 2]], new_rows[1])
    assert int(base.count_nonzero()) == 12


def test_append_one_dimensional_positions(needs_triton):
    """Per-row side data such as int32 positions [M] appends like keys (the ragged cache's position buffer)."""
    buffer = torch.full((12,), -1, dtype=torch.int32, device=DEVICE)
    starts, lengths = as_index([0, 6]), as_index([2, 4])
    new_rows = torch.tensor([[7, 8], [9, 10]], dtype=torch.int32, device=DEVICE)
    expected = buffer.clone()
    ragged_append_reference(expected, starts, lengths, new_rows)
    with backend("triton"):
        kernels.ragged_append(buffer, starts, lengths, new_rows)
    assert torch.equal(buffer, expected) and expected[[2, 3, 10, 11]].tolist() == [7, 8, 9, 10]


def test_append_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="new_rows"):
        kernels.ragged_append(torch.zeros(8, 4), as_index([0]), as_index([0]), torch.zeros(1, 2, 3))
    with pytest.raises(TypeError, match="dtype"):
        kernels.ragged_append(torch.zeros(8, 4), as_index([0]), as_index([0]), torch.zeros(1, 2, 4).half())


# -------------------------------------------------------------------------------------------------------- dispatcher


def test_backend_choice(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    assert kernels.kernel_backend(cpu) == "torch"  # auto: Triton only for CUDA tensors
    monkeypatch.setenv(dispatch.KERNELS_ENV, "torch")
    assert kernels.kernel_backend(cpu) == "torch"
    monkeypatch.setenv(dispatch.KERNELS_ENV, "fast")
    with pytest.raises(ValueError, match="auto, triton, torch"):
        kernels.kernel_backend(cpu)
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    monkeypatch.setenv(dispatch.KERNELS_ENV, "triton")
    with pytest.raises(RuntimeError, match="cannot be imported"):
        kernels.kernel_backend(cpu)


def test_forced_triton_on_cpu_needs_the_interpreter(needs_triton, monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv(dispatch.KERNELS_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.kernel_backend(cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.kernel_backend(cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_triton_on_cuda(needs_triton, monkeypatch):
    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    assert kernels.kernel_backend(torch.zeros(1, device="cuda")) == "triton"


def test_references_work_without_triton(monkeypatch):
    """The kernel modules import, and dispatch to torch, where ``import triton`` fails."""
    for name in ("triton", "triton.language"):
        monkeypatch.setitem(sys.modules, name, None)  # makes ``import triton`` raise ImportError
    package = os.path.dirname(kernels.__file__)
    loaded = {}
    for name in ("dispatch", "select_threshold", "ragged_compact", "ragged_append"):
        spec = importlib.util.spec_from_file_location(f"_without_triton_{name}", os.path.join(package, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        loaded[name] = module
    assert not loaded["dispatch"].triton_available()
    # The kernel modules share the package's dispatch module; make it see no Triton either.
    monkeypatch.setattr(dispatch, "triton_available", loaded["dispatch"].triton_available)
    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    values = torch.tensor([3.0, 1.0, 2.0, 1.0])
    threshold, evict = loaded["select_threshold"].select_smallest(values, 2)
    assert float(threshold) == 1.0 and evict.tolist() == [False, True, False, True]
    packed = loaded["ragged_compact"].ragged_compact([values], as_index([0]).cpu(), as_index([4]).cpu(), evict)
    assert packed.rows[0].tolist() == [1.0, 1.0]
    buffer = torch.zeros(4)
    loaded["ragged_append"].ragged_append(buffer, torch.tensor([0]), torch.tensor([1]), values[None, :2])
    assert buffer.tolist() == [0.0, 3.0, 1.0, 0.0]
