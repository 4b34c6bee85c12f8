"""Head-wise paged memory for serving engines: a pool of single-head blocks shared by every layer and KV head, a
length and a block table per (sequence, layer, head), and attention over it.

Core package: plain tensors and numpy arrays; imports neither kvpress, transformers nor any engine. An engine adapter
(:mod:`fastkvzip_press.vllm`) allocates the pool in its own KV memory and calls these pieces.
"""

from fastkvzip_press.paged.attention import paged_attention, write_new_tokens, write_pairs
from fastkvzip_press.paged.pool import HeadBlockPool, HeadTables, PoolExhausted, blocks_for
from fastkvzip_press.paged.step import StepLayout, plan_step

__all__ = [
    "HeadBlockPool",
    "HeadTables",
    "PoolExhausted",
    "StepLayout",
    "blocks_for",
    "paged_attention",
    "plan_step",
    "write_new_tokens",
    "write_pairs",
]
