"""Sequences whose KV heads store different numbers of pairs in a head-wise pool, and a dense per-head reference."""

import numpy as np
import torch

from fastkvzip_press.paged import HeadBlockPool, HeadTables, paged_attention, plan_step, write_new_tokens, write_pairs


def dense_reference(query, keys, values, before, scale):
    """Per (sequence, KV head): softmax over the head's stored pairs and the new tokens up to each query, in fp64.

    query ``[m, Hq, D]``; keys/values: list over heads of ``[before_h + m, D]``."""
    heads = len(keys)
    groups = query.shape[1] // heads
    out = torch.empty(query.shape, dtype=torch.float64)
    for h in range(heads):
        for i in range(query.shape[0]):
            seen = before[h] + i + 1
            k, v = keys[h][:seen].double(), values[h][:seen].double()
            for g in range(groups):
                q = query[i, h * groups + g].double()
                out[i, h * groups + g] = torch.softmax(k @ q * scale, 0) @ v
    return out


class HeadwiseBatch:
    """Sequences whose heads store different numbers of pairs in a pool, and the dense copy of the same pairs."""

    def __init__(self, stored: list[np.ndarray], block_size: int, head_dim: int, dtype=torch.float32, seed: int = 0):
        self.layers, self.heads = stored[0].shape
        self.block_size, self.head_dim, self.dtype = block_size, head_dim, dtype
        self.generator = torch.Generator().manual_seed(seed)
        # room for every head at its sequence's longest length (how the tables are filled) and for new tokens
        n_blocks = 1 + sum(self.layers * self.heads * (-(-int(s.max()) // block_size) + 8) for s in stored)
        self.pool = torch.zeros(n_blocks, 2, block_size, head_dim, dtype=dtype)
        self.tables = HeadTables(
            HeadBlockPool(n_blocks, first=1), len(stored), self.layers, self.heads, 512, block_size
        )
        self.slots = np.array([self.tables.slot(f"r{i}") for i in range(len(stored))])
        self.keys, self.values = {}, {}  # (sequence, layer, head) -> [n, D]
        for r, lengths in enumerate(stored):
            slot = self.slots[r]
            self.tables.grow(np.array([slot]), np.array([int(lengths.max())]))
            self.tables.shrink(slot, lengths)
            for layer in range(self.layers):
                for head in range(self.heads):
                    n = int(lengths[layer, head])
                    k, v = self.random(n, head_dim), self.random(n, head_dim)
                    self.keys[r, layer, head], self.values[r, layer, head] = k, v
                    write_pairs(
                        self.pool, torch.from_numpy(self.tables.pool_slots(slot, layer, head, np.arange(n))), k, v
                    )

    def random(self, *shape):
        return torch.randn(*shape, generator=self.generator).to(self.dtype)

    def step(self, query_lens: list[int], groups: int, scale: float):
        """Plan a forward of ``query_lens`` new tokens, write them in every layer, attend; compare with the dense
        reference per layer. Returns the largest difference."""
        before_all = self.tables.lengths[self.slots].copy()  # [R, L, H]
        step = plan_step(self.tables, self.slots, np.array(query_lens), torch.device("cpu"))
        n_tokens = sum(query_lens)
        starts = np.concatenate([[0], np.cumsum(query_lens)])
        worst = 0.0
        for layer in range(self.layers):
            new_keys = self.random(n_tokens, self.heads, self.head_dim)
            new_values = self.random(n_tokens, self.heads, self.head_dim)
            query = self.random(n_tokens, self.heads * groups, self.head_dim)
            write_new_tokens(self.pool, step, layer, new_keys, new_values)
            out = paged_attention(query, self.pool, step, layer, scale)
            for r, m in enumerate(query_lens):
                rows = slice(starts[r], starts[r] + m)
                keys = [torch.cat([self.keys[r, layer, h], new_keys[rows, h]]) for h in range(self.heads)]
                values = [torch.cat([self.values[r, layer, h], new_values[rows, h]]) for h in range(self.heads)]
                for h in range(self.heads):
                    self.keys[r, layer, h], self.values[r, layer, h] = keys[h], values[h]
                expected = dense_reference(query[rows], keys, values, before_all[r, layer], scale)
                worst = max(worst, float((out[rows].double() - expected).abs().max()))
        return worst
