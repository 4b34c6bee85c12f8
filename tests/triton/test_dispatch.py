"""Which implementation runs (FASTKVZIP_PRESS_KERNELS), and the references without Triton installed."""

import importlib.util
import os
import sys

import pytest
import torch
from helpers import as_index

import fastkvzip_press.triton as kernels
from fastkvzip_press.triton import dispatch


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
    for name in ("dispatch", "select_smallest", "ragged_compact", "ragged_append"):
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
    threshold, evict = loaded["select_smallest"].select_smallest(values, 2)
    assert float(threshold) == 1.0 and evict.tolist() == [False, True, False, True]
    packed = loaded["ragged_compact"].ragged_compact([values], as_index([0]).cpu(), as_index([4]).cpu(), evict)
    assert packed.rows[0].tolist() == [1.0, 1.0]
    buffer = torch.zeros(4)
    loaded["ragged_append"].ragged_append(buffer, torch.tensor([0]), torch.tensor([1]), values[None, :2])
    assert buffer.tolist() == [0.0, 3.0, 1.0, 0.0]
