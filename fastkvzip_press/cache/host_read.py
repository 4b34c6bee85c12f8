"""Reading device data on the host once per tensor, not once per layer.

Every layer of a forward gets the same attention mask, and beam search hands every layer the same ``beam_idx``. What
the host needs from them (is there padding? which sequences?) costs a device synchronisation per read, so the last
answer is kept for the tensor object it came from, until that tensor is modified in place or freed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class LastHostRead(Generic[T]):
    """The last value computed from a tensor, returned again for the same tensor, version and ``key``."""

    def __init__(self) -> None:
        self._source: weakref.ref | None = None
        self._stamp: tuple[int, Hashable] | None = None
        self._value: T | None = None

    def get(self, tensor: torch.Tensor, key: Hashable, compute: Callable[[], T]) -> T:
        stamp = (tensor._version, key)
        if self._source is not None and self._source() is tensor and self._stamp == stamp:
            return self._value  # type: ignore[return-value]
        value = compute()
        self._source, self._stamp, self._value = weakref.ref(tensor), stamp, value
        return value
