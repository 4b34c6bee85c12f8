"""One forward of a batch over the head-wise pool: where each new token goes in every head, and what each head
attends to.

Shapes: ``R`` sequences in the batch, ``T`` new tokens (sequence after sequence, ``m_r`` each), ``L`` layers, ``H``
KV heads, ``B`` block-table columns (the most any head of the batch needs this step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastkvzip_press.paged.pool import HeadTables, blocks_for


@dataclass
class StepLayout:
    """What every layer of one forward needs (tensors on the model's device).

    Attributes:
        query_lens: ``[R]`` int32, new tokens per sequence (``m_r``).
        query_start: ``[R + 1]`` int32, where each sequence's tokens start among the ``T``.
        lengths_before: ``[L, R, H]`` int32, pairs each head stored before this forward; a head attends to those and
            to its sequence's new tokens up to the query (causal).
        block_tables: ``[L, R, H, B]`` int32 single-head block ids of each head.
        write_slots: ``[L, T, H]`` int64 flat pool slot (``block * block_size + offset``) of each new token's pair in
            every head.
        max_query_len: ``max(m_r)``.
        num_tokens: ``T`` (on the host: no device read per layer).
        block_size: tokens per single-head block.
    """

    query_lens: torch.Tensor
    query_start: torch.Tensor
    lengths_before: torch.Tensor
    block_tables: torch.Tensor
    write_slots: torch.Tensor
    max_query_len: int
    num_tokens: int
    block_size: int

    @property
    def num_sequences(self) -> int:
        return self.query_lens.shape[0]

    def seq_lens(self, layer: int) -> torch.Tensor:
        """``[R, H]`` pairs each head attends to at its last new token."""
        return self.lengths_before[layer] + self.query_lens[:, None]


def plan_step(tables: HeadTables, slots: np.ndarray, query_lens: np.ndarray, device: torch.device) -> StepLayout:
    """Grow the heads of ``slots`` (the batch's sequences, in batch order) by ``query_lens`` tokens each, and lay out
    the forward that writes and attends to them."""
    slots = np.asarray(slots, dtype=np.int64)
    query_lens = np.asarray(query_lens, dtype=np.int64)
    before = tables.grow(slots, query_lens)  # [R, L, H]
    after = before + query_lens[:, None, None]
    width = max(int(blocks_for(after, tables.block_size).max(initial=1)), 1)
    block_tables = tables.tables[slots][..., :width].transpose(1, 0, 2, 3)  # [L, R, H, B]
    sequence = np.repeat(np.arange(len(slots)), query_lens)  # [T] sequence of each new token
    starts = np.concatenate([[0], np.cumsum(query_lens)])
    offset = np.arange(len(sequence)) - starts[sequence]  # j: the token's index among its sequence's new ones
    layer = np.arange(tables.num_layers)[:, None, None]
    head = np.arange(tables.num_heads)[None, None, :]
    positions = before[sequence].transpose(1, 0, 2) + offset[None, :, None]  # [L, T, H]
    write_slots = tables.pool_slots(slots[sequence][None, :, None], layer, head, positions)
    return StepLayout(
        query_lens=torch.from_numpy(query_lens.astype(np.int32)).to(device),
        query_start=torch.from_numpy(starts.astype(np.int32)).to(device),
        lengths_before=torch.from_numpy(before.transpose(1, 0, 2).astype(np.int32)).to(device),
        block_tables=torch.from_numpy(np.ascontiguousarray(block_tables)).to(device),
        write_slots=torch.from_numpy(write_slots).to(device),
        max_query_len=int(query_lens.max(initial=0)),
        num_tokens=int(query_lens.sum()),
        block_size=tables.block_size,
    )
