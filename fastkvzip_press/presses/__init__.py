"""kvpress presses backed by Fast KVzip gates."""

from fastkvzip_press.presses.decoding import DecodingStats, FastKVzipDecodingPress
from fastkvzip_press.presses.prefill import FastKVzipPress
from fastkvzip_press.presses.scorer import FastKVzipScorerPress

__all__ = ["DecodingStats", "FastKVzipDecodingPress", "FastKVzipPress", "FastKVzipScorerPress"]
