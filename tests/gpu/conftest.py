"""The GPU acceptance tests (``make test-gpu``): every module here is marked ``cuda``; its tests take the ``device``
fixture, which skips them without a CUDA device.

They run on ``FASTKVZIP_PRESS_TEST_DEVICE`` (default ``cuda``, the current device; ``cuda:1`` runs them on a second
GPU, which checks that nothing assumes the current one) with the Triton kernels compiled, never interpreted.
"""

import os

import pytest
import torch

DEVICE_ENV = "FASTKVZIP_PRESS_TEST_DEVICE"


@pytest.fixture(scope="session")
def device() -> torch.device:
    device = torch.device(os.environ.get(DEVICE_ENV) or "cuda")
    if device.type != "cuda":
        pytest.skip(f"{DEVICE_ENV}={device}: the acceptance tests need a CUDA device")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if (device.index or 0) >= torch.cuda.device_count():
        pytest.skip(f"{device} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    # With its index, so that it compares equal to the device of the tensors made on it.
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


@pytest.fixture(autouse=True)
def compiled_triton(device, monkeypatch):
    """Triton compiled for the device: an interpreter setting left in the environment would test something else."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTKVZIP_PRESS_KERNELS", raising=False)
