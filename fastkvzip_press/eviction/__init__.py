"""The eviction decision: gate scores + a budget + protection → the pairs to evict, and what could not be met.

Core package: plain tensors in and out; imports neither kvpress, transformers nor the presses.
"""

from fastkvzip_press.eviction.chunk_plan import ChunkPlan, TailEviction, span_budget
from fastkvzip_press.eviction.decision import (
    Budget,
    Decision,
    HeadTargetBudget,
    Protection,
    RatioBudget,
    SpanBudget,
    ThresholdBudget,
    decide,
    keep_largest,
)
from fastkvzip_press.eviction.stats import EvictionStats

__all__ = [
    "Budget",
    "ChunkPlan",
    "Decision",
    "EvictionStats",
    "HeadTargetBudget",
    "Protection",
    "RatioBudget",
    "TailEviction",
    "SpanBudget",
    "ThresholdBudget",
    "decide",
    "keep_largest",
    "span_budget",
]
