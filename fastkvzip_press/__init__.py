"""Fast KVzip gated KV-cache eviction as a kvpress plugin.

The core (:mod:`~fastkvzip_press.gates`, :mod:`~fastkvzip_press.eviction`, :mod:`~fastkvzip_press.cache`,
:mod:`~fastkvzip_press.triton`) imports no kvpress; the presses (:mod:`~fastkvzip_press.presses`) adapt it to kvpress.
Names below are imported on first use, so importing a core package alone never loads kvpress.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.6.0"

_EXPORTS = {
    "EvictionStats": "fastkvzip_press.eviction",
    "FastKVzipDecodingPress": "fastkvzip_press.presses",
    "FastKVzipPress": "fastkvzip_press.presses",
    "FastKVzipScorerPress": "fastkvzip_press.presses",
    "GateBank": "fastkvzip_press.gates",
    "GateFileError": "fastkvzip_press.gates",
    "GateFileNotFoundError": "fastkvzip_press.gates",
    "GateMismatchError": "fastkvzip_press.gates",
    "ModelLayout": "fastkvzip_press.layout",
    "RaggedLayer": "fastkvzip_press.cache",
    "SinkGate": "fastkvzip_press.gates",
    "kv_cache_bytes": "fastkvzip_press.cache",
    "load_gates": "fastkvzip_press.gates",
    "save_gates": "fastkvzip_press.gates",
}
__all__ = [
    "EvictionStats",
    "FastKVzipDecodingPress",
    "FastKVzipPress",
    "FastKVzipScorerPress",
    "GateBank",
    "GateFileError",
    "GateFileNotFoundError",
    "GateMismatchError",
    "ModelLayout",
    "RaggedLayer",
    "SinkGate",
    "kv_cache_bytes",
    "load_gates",
    "save_gates",
]

if TYPE_CHECKING:
    from fastkvzip_press.cache import RaggedLayer, kv_cache_bytes
    from fastkvzip_press.eviction import EvictionStats
    from fastkvzip_press.gates import (
        GateBank,
        GateFileError,
        GateFileNotFoundError,
        GateMismatchError,
        SinkGate,
        load_gates,
        save_gates,
    )
    from fastkvzip_press.layout import ModelLayout
    from fastkvzip_press.presses import FastKVzipDecodingPress, FastKVzipPress, FastKVzipScorerPress


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastkvzip_press' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
