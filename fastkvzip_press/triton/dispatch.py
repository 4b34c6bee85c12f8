"""Choice between the Triton kernels and their torch references, and lazy decoration of the Triton kernels.

``FASTKVZIP_PRESS_KERNELS`` selects the implementation: ``auto`` (default: Triton for CUDA tensors when Triton
imports, torch otherwise), ``triton`` (always Triton; CPU tensors need the interpreter, ``TRITON_INTERPRET=1``) or
``torch``. Triton is optional (it ships for Linux only), so nothing here imports it at module level.

Every launch runs under the CUDA device of its tensors (:func:`device_guard`): Triton launches on the current device
and its stream, which need not be the device holding the data (a model split over GPUs, or tensors on ``cuda:1``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch

KERNELS_ENV = "FASTKVZIP_PRESS_KERNELS"
BACKEND_CHOICES = ("auto", "triton", "torch")
_TRUE_VALUES = ("1", "true", "on", "yes")


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works here (cached: the answer does not change within a process)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpret_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter (the values Triton itself accepts as true)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE_VALUES


def kernel_backend(tensor: torch.Tensor) -> Literal["triton", "torch"]:
    """Which implementation runs for data living on ``tensor``'s device, following ``FASTKVZIP_PRESS_KERNELS``."""
    choice = (os.environ.get(KERNELS_ENV) or "auto").strip().lower()
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"{KERNELS_ENV}={choice!r}: expected one of {', '.join(BACKEND_CHOICES)}")
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(f"{KERNELS_ENV}=triton, but triton cannot be imported; use {KERNELS_ENV}=torch")
    if not tensor.is_cuda and not interpret_enabled():
        raise RuntimeError(
            f"{KERNELS_ENV}=triton on a {tensor.device.type} tensor needs the Triton interpreter: "
            f"set TRITON_INTERPRET=1, or use {KERNELS_ENV}=torch"
        )
    return "triton"


def launch_device(args: Iterable[object]) -> torch.device | None:
    """The one device of the tensors among a launch's arguments (``None`` when there are none).

    Raises ValueError when they live on several devices: a kernel reads every pointer on one device, so mixed
    arguments would read foreign memory instead of failing.
    """
    devices = {arg.device for arg in args if isinstance(arg, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"a kernel launch needs all its tensors on one device, got {sorted(map(str, devices))}")
    return devices.pop() if devices else None


def device_guard(device: torch.device | None) -> contextlib.AbstractContextManager:
    """Context under which a launch goes to ``device``: its CUDA device made current, a no-op for other devices."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class LazyKernel:
    """A Triton kernel that is decorated with ``triton.jit`` on its first launch, not at import.

    ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so a kernel decorated at import would ignore a
    ``TRITON_INTERPRET=1`` set afterwards (e.g. by a test module imported after the library). Decorating at launch,
    once per interpreter setting, also keeps the module importable without Triton. The same holds for the helpers
    that triton.language decorates at its own import (``tl.sum``, ``tl.cumsum``, ``tl.zeros``), so kernels meant to
    run under a late ``TRITON_INTERPRET`` call Triton builtins only.
    """

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self._decorated: dict[bool, Any] = {}
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        interpret = interpret_enabled()
        kernel = self._decorated.get(interpret)
        if kernel is None:
            import triton

            kernel = self._decorated[interpret] = triton.jit(self.fn)
        launch = kernel[grid]

        def launch_on_device_of_arguments(*args: Any, **kwargs: Any) -> Any:
            # Every launch of every kernel passes here, so none can run on the wrong (current) device.
            with device_guard(launch_device([*args, *kwargs.values()])):
                return launch(*args, **kwargs)

        return launch_on_device_of_arguments


def lazy_jit(fn: Callable[..., None]) -> LazyKernel:
    """Decorator: ``fn`` is a Triton kernel, decorated with ``triton.jit`` when first launched."""
    return LazyKernel(fn)


def cdiv(a: int, b: int) -> int:
    """Ceiling division for grid sizes (``triton.cdiv`` without importing Triton)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``); Triton block shapes must be powers of two."""
    return 1 << max(n - 1, 0).bit_length()


# Row-copy kernels (compact, append) tile [rows, columns]; one program handles about this many elements.
MAX_BLOCK_W = 128
BLOCK_ELEMENTS = 4096
MAX_BLOCK_ROWS = 1024


def row_block_shape(width: int, max_rows: int | None = None) -> tuple[int, int]:
    """``(block_rows, block_w)`` for copying rows of ``width`` elements, at most ``max_rows`` rows per block."""
    block_w = min(next_power_of_2(width), MAX_BLOCK_W)
    block_rows = min(BLOCK_ELEMENTS // block_w, MAX_BLOCK_ROWS)
    if max_rows is not None:
        block_rows = min(block_rows, next_power_of_2(max_rows))
    return block_rows, block_w
