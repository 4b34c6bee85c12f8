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


class CudaLooking(torch.Tensor):
    """A CPU tensor that answers ``is_cuda`` like a tensor on a GPU: what the dispatcher reads to choose."""

    @property
    def is_cuda(self) -> bool:
        return True


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    """The auto branch for CUDA, on CPU: a CUDA-looking tensor gets Triton when Triton imports, torch otherwise."""
    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert kernels.kernel_backend(torch.zeros(1).as_subclass(CudaLooking)) == "triton"
    assert kernels.kernel_backend(torch.zeros(1)) == "torch"
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert kernels.kernel_backend(torch.zeros(1).as_subclass(CudaLooking)) == "torch"


class LauncherReached(Exception):
    pass


def test_public_functions_call_their_triton_launcher_for_cuda_tensors(monkeypatch):
    """Under auto, every public kernel function hands CUDA tensors to its Triton launcher (recorded, not run)."""
    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    launchers = {
        "ragged_compact": "ragged_compact_triton",
        "ragged_append": "ragged_append_triton",
        "select_smallest": "select_smallest_rows_triton",
    }
    for module, launcher in launchers.items():

        def record(*args, launcher=launcher, **kwargs):
            raise LauncherReached(launcher)

        monkeypatch.setattr(importlib.import_module(f"fastkvzip_press.triton.{module}"), launcher, record)

    def on_gpu(t: torch.Tensor) -> torch.Tensor:
        return t.as_subclass(CudaLooking)

    starts, lengths = torch.tensor([0, 4]), torch.tensor([2, 3])
    calls = {
        "ragged_compact_triton": lambda: kernels.ragged_compact(
            [on_gpu(torch.zeros(8, 4))], starts, lengths, torch.ones(5, dtype=torch.bool)
        ),
        "ragged_append_triton": lambda: kernels.ragged_append(
            [on_gpu(torch.zeros(8, 4))], starts, lengths, [torch.ones(2, 1, 4)]
        ),
        "select_smallest_rows_triton": lambda: kernels.select_smallest_rows(on_gpu(torch.rand(2, 5)), [1, 2]),
    }
    calls["select_smallest_rows_triton (one row)"] = lambda: kernels.select_smallest(on_gpu(torch.rand(5)), 2)
    for launcher, call in calls.items():
        with pytest.raises(LauncherReached, match=launcher.split()[0]):
            call()


class DeviceRecorder:
    """Stands in for ``torch.cuda.device``: records the device each ``with`` makes current, and what ``probe``
    (some output of the launch) reads when it is entered and left."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.probe = lambda: ""

    def __call__(self, device: torch.device) -> "DeviceRecorder":
        self.device = device
        return self

    def __enter__(self) -> None:
        self.log.append(f"enter {self.device}{self.probe()}")

    def __exit__(self, *exc) -> None:
        self.log.append(f"exit {self.device}{self.probe()}")


def test_device_guard_makes_the_tensors_gpu_current(monkeypatch):
    """Triton launches on the current CUDA device: the guard makes the data's device current, cuda:1 included."""
    log: list[str] = []
    monkeypatch.setattr(torch.cuda, "device", DeviceRecorder(log))
    with dispatch.device_guard(torch.device("cuda", 1)):
        log.append("launch")
    with dispatch.device_guard(torch.device("cpu")), dispatch.device_guard(None):
        log.append("launch on cpu")
    assert log == ["enter cuda:1", "launch", "exit cuda:1", "launch on cpu"]


def test_launch_device_is_the_one_device_of_the_tensors():
    assert dispatch.launch_device([torch.zeros(1), 3, torch.ones(2)]) == torch.device("cpu")
    assert dispatch.launch_device([3, "x"]) is None
    with pytest.raises(ValueError, match="one device"):
        dispatch.launch_device([torch.zeros(1), torch.zeros(1, device="meta")])


def test_every_kernel_launch_runs_under_its_tensors_device(needs_triton, monkeypatch):
    """Each launch of compact (one per row tensor), append (one per buffer) and select (five) enters the device of
    its tensors around the launch. The CPU tensors the interpreter runs on stand in for tensors on cuda:1."""
    log: list[str] = []
    recorder = DeviceRecorder(log)
    monkeypatch.setattr(torch.cuda, "device", recorder)
    located = dispatch.launch_device
    monkeypatch.setattr(dispatch, "launch_device", lambda args: torch.device("cuda", 1) if located(args) else None)
    monkeypatch.setenv(dispatch.KERNELS_ENV, "triton")
    rows = [torch.rand(8, 4), torch.arange(8)]
    starts, lengths = torch.tensor([0, 4]), torch.tensor([2, 3])
    packed = kernels.ragged_compact(rows, starts, lengths, torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool))
    assert packed.rows[1].tolist() == [0, 4, 5]
    assert log == ["enter cuda:1", "exit cuda:1"] * 2
    log.clear()
    buffers = [torch.zeros(8, 4), torch.zeros(8, dtype=torch.int64)]
    recorder.probe = lambda: f" {int(buffers[0].sum())} {int(buffers[1].sum())}"  # the rows written so far
    kernels.ragged_append(buffers, starts, lengths, [torch.ones(2, 1, 4), torch.tensor([[7], [9]])])
    assert buffers[1].tolist() == [0, 0, 7, 0, 0, 0, 0, 9]
    assert log == ["enter cuda:1 0 0", "exit cuda:1 8 0", "enter cuda:1 8 0", "exit cuda:1 8 16"]
    recorder.probe = lambda: ""
    log.clear()
    _, evict = kernels.select_smallest_rows(torch.tensor([[3.0, 1.0, 2.0]]), [2])
    assert evict.tolist() == [[False, True, True]]
    assert log == ["enter cuda:1", "exit cuda:1"] * 5
