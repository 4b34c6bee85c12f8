"""Fast KVzip gated KV-cache eviction as a kvpress plugin."""

from fastkvzip_press.cache import RaggedLayer
from fastkvzip_press.gate import GateBank, GateMismatchError, SinkGate
from fastkvzip_press.gate_io import GateFileError, load_gates, save_gates
from fastkvzip_press.layout import ModelLayout
from fastkvzip_press.presses import FastKVzipDecodingPress, FastKVzipPress, FastKVzipScorerPress
from fastkvzip_press.stats import EvictionStats, kv_cache_bytes

__all__ = [
    "EvictionStats",
    "FastKVzipDecodingPress",
    "FastKVzipPress",
    "FastKVzipScorerPress",
    "GateBank",
    "GateFileError",
    "GateMismatchError",
    "ModelLayout",
    "RaggedLayer",
    "SinkGate",
    "kv_cache_bytes",
    "load_gates",
    "save_gates",
]
__version__ = "0.4.0"
