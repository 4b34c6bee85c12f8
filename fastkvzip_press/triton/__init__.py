"""Triton kernels for ragged KV-cache bookkeeping, each next to its torch reference.

``kernel_backend`` picks the implementation per call (``FASTKVZIP_PRESS_KERNELS``: auto, triton or torch); the torch
references work without Triton installed.
"""

from fastkvzip_press.triton.dispatch import kernel_backend
from fastkvzip_press.triton.ragged_append import ragged_append
from fastkvzip_press.triton.ragged_compact import CompactedRows, ragged_compact
from fastkvzip_press.triton.select_smallest import select_smallest, select_smallest_rows

__all__ = [
    "CompactedRows",
    "kernel_backend",
    "ragged_append",
    "ragged_compact",
    "select_smallest",
    "select_smallest_rows",
]
