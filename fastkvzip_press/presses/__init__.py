"""kvpress presses backed by Fast KVzip gates."""

from fastkvzip_press.presses.prefill import FastKVzipPress
from fastkvzip_press.presses.scorer import FastKVzipScorerPress

__all__ = ["FastKVzipPress", "FastKVzipScorerPress"]
