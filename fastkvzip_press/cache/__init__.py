"""The cache: head-wise ragged storage, attention over it, and applying eviction decisions to a transformers cache.

Core package: imports neither kvpress nor the presses. :mod:`fastkvzip_press.cache.compaction` is the only code that
replaces a cache's layers.
"""

from fastkvzip_press.cache.accounting import full_cache_bytes, kv_cache_bytes
from fastkvzip_press.cache.attention import (
    attention_implementation,
    cache_attention_path,
    enable_ragged_attention,
    ragged_attention,
    register_ragged_attention,
)
from fastkvzip_press.cache.compaction import (
    SCORES,
    evict_from_tail,
    evict_held,
    held_rows,
    ragged_layer_ids,
    take_scores,
)
from fastkvzip_press.cache.ragged_layer import POSITIONS, RaggedLayer, RaggedView
from fastkvzip_press.cache.varlen import AttentionPath, attention_path_counts, ragged_attention_path

__all__ = [
    "AttentionPath",
    "POSITIONS",
    "SCORES",
    "RaggedLayer",
    "RaggedView",
    "attention_implementation",
    "attention_path_counts",
    "cache_attention_path",
    "enable_ragged_attention",
    "evict_from_tail",
    "evict_held",
    "full_cache_bytes",
    "held_rows",
    "kv_cache_bytes",
    "ragged_attention",
    "ragged_attention_path",
    "ragged_layer_ids",
    "register_ragged_attention",
    "take_scores",
]
