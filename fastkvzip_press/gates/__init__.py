"""Gates: the per-layer sink-attention gates that score every KV pair, and their files.

Core package: imports neither kvpress nor the presses.
"""

from fastkvzip_press.gates.formats import (
    GateFileError,
    GateFileNotFoundError,
    read_native,
    read_released,
    write_native,
    write_released,
)
from fastkvzip_press.gates.gate import GateBank, GateMetadata, GateMismatchError, SinkGate
from fastkvzip_press.gates.loading import RELEASED_HUB_REPO, GateSource, load_gates, load_shipped, save_gates

__all__ = [
    "RELEASED_HUB_REPO",
    "GateBank",
    "GateFileError",
    "GateFileNotFoundError",
    "GateMetadata",
    "GateMismatchError",
    "GateSource",
    "SinkGate",
    "load_gates",
    "load_shipped",
    "read_native",
    "read_released",
    "save_gates",
    "write_native",
    "write_released",
]
