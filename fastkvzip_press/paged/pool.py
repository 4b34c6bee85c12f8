"""A KV pool of single-head blocks shared by every layer and KV head, and each sequence's block tables over it.

A serving engine's paged memory holds, per block, one token range of *every* head of a layer, so all heads of a
sequence must keep the same number of pairs. Here a block holds ``block_size`` tokens of *one* (layer, KV head), so
each head of each sequence keeps its own number of pairs and memory follows what each head keeps.

Host-side bookkeeping only (numpy): which blocks are free, and per sequence slot a length and a block table per
(layer, KV head). Shapes: ``S`` sequence slots, ``L`` layers, ``H`` KV heads, ``B`` blocks per head at most.
"""

from __future__ import annotations

import numpy as np


class PoolExhausted(RuntimeError):
    """More single-head blocks were asked for than the pool has free: the engine's accounting was wrong."""


class HeadBlockPool:
    """Free single-head blocks ``[first, num_blocks)`` of a pool, handed out and taken back as arrays of ids."""

    def __init__(self, num_blocks: int, first: int = 0):
        if not 0 <= first < num_blocks:
            raise ValueError(f"a pool of {num_blocks} blocks cannot start at block {first}")
        self.num_blocks = num_blocks
        # A stack: the most recently freed blocks are reused first (warm in cache).
        self._free = np.arange(num_blocks - 1, first - 1, -1, dtype=np.int64)
        self._top = len(self._free)

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def capacity(self) -> int:
        """Blocks this pool can hand out at once."""
        return len(self._free)

    def allocate(self, count: int) -> np.ndarray:
        """``count`` free block ids; raises :class:`PoolExhausted` when fewer are free."""
        if count > self._top:
            raise PoolExhausted(f"asked for {count} single-head blocks, {self._top} free of {self.capacity}")
        self._top -= count
        return self._free[self._top : self._top + count][::-1].copy()

    def release(self, ids: np.ndarray) -> None:
        """Take blocks back (each must have been handed out and not released since)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if self._top + len(ids) > self.capacity:
            raise RuntimeError(f"releasing {len(ids)} blocks into a pool with {self.capacity - self._top} handed out")
        self._free[self._top : self._top + len(ids)] = ids[::-1]
        self._top += len(ids)


def blocks_for(lengths: np.ndarray, block_size: int) -> np.ndarray:
    """Blocks holding ``lengths`` pairs, elementwise."""
    return -(-np.asarray(lengths, dtype=np.int64) // block_size)


class HeadTables:
    """Per sequence slot, the pairs each (layer, KV head) stores and the single-head blocks holding them.

    Attributes:
        lengths: ``[S, L, H]`` pairs stored per (slot, layer, head).
        tables: ``[S, L, H, B]`` block ids; entries past ``ceil(length / block_size)`` are meaningless.
    """

    def __init__(
        self, pool: HeadBlockPool, max_slots: int, num_layers: int, num_heads: int, max_blocks: int, block_size: int
    ):
        self.pool = pool
        self.block_size = block_size
        self.lengths = np.zeros((max_slots, num_layers, num_heads), dtype=np.int64)
        self.tables = np.zeros((max_slots, num_layers, num_heads, max_blocks), dtype=np.int32)
        self._slots: dict[str, int] = {}
        self._free_slots = list(range(max_slots - 1, -1, -1))

    @property
    def num_layers(self) -> int:
        return self.lengths.shape[1]

    @property
    def num_heads(self) -> int:
        return self.lengths.shape[2]

    @property
    def max_blocks(self) -> int:
        return self.tables.shape[3]

    def __contains__(self, key: str) -> bool:
        return key in self._slots

    def slot(self, key: str) -> int:
        """The slot of sequence ``key``, opened (empty) on first use."""
        slot = self._slots.get(key)
        if slot is None:
            if not self._free_slots:
                raise RuntimeError(f"no free sequence slot for {key!r}: {len(self._slots)} open")
            slot = self._slots[key] = self._free_slots.pop()
            self.lengths[slot] = 0
        return slot

    def close(self, key: str) -> None:
        """Return every block of sequence ``key`` to the pool and free its slot (nothing if it has none)."""
        slot = self._slots.pop(key, None)
        if slot is None:
            return
        self._shrink_slot(slot, np.zeros_like(self.lengths[slot]))
        self._free_slots.append(slot)

    def blocks_held(self, slot: int) -> int:
        """Single-head blocks slot ``slot`` holds."""
        return int(blocks_for(self.lengths[slot], self.block_size).sum())

    def grow(self, slots: np.ndarray, new_tokens: np.ndarray) -> np.ndarray:
        """Give every head of each of ``slots`` room for its sequence's ``new_tokens``; returns the lengths
        ``[R, L, H]`` before (where the new tokens go)."""
        slots = np.asarray(slots, dtype=np.int64)
        before = self.lengths[slots].copy()
        after = before + np.asarray(new_tokens, dtype=np.int64)[:, None, None]
        have, need = blocks_for(before, self.block_size), blocks_for(after, self.block_size)
        if need.size and need.max(initial=0) > self.max_blocks:
            raise ValueError(f"a head would need {need.max()} blocks; tables hold {self.max_blocks}")
        counts = (need - have).ravel()
        total = int(counts.sum())
        if total:
            ids = self.pool.allocate(total)
            # Flat (slot, layer, head, block) entries to fill: each head's blocks [have, need).
            owner = np.repeat(np.arange(counts.size), counts)
            first = np.repeat(np.cumsum(counts) - counts, counts)
            column = have.ravel()[owner] + np.arange(total) - first
            s, layer, head = np.unravel_index(owner, have.shape)
            self.tables[slots[s], layer, head, column] = ids
        self.lengths[slots] = after
        return before

    def shrink(self, slot: int, lengths: np.ndarray) -> None:
        """Cut every head of ``slot`` to ``lengths [L, H]`` pairs (never longer than now) and free the blocks past
        them."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if (lengths > self.lengths[slot]).any() or (lengths < 0).any():
            raise ValueError("shrink keeps at most the pairs a head stores")
        self._shrink_slot(slot, lengths)

    def _shrink_slot(self, slot: int, lengths: np.ndarray) -> None:
        have = blocks_for(self.lengths[slot], self.block_size)
        keep = blocks_for(lengths, self.block_size)
        columns = np.arange(self.max_blocks)
        freed = (columns >= keep[..., None]) & (columns < have[..., None])  # [L, H, B]
        if freed.any():
            self.pool.release(self.tables[slot][freed])
        self.lengths[slot] = lengths

    def pool_slots(
        self, slot: int | np.ndarray, layer: np.ndarray, head: np.ndarray, position: np.ndarray
    ) -> np.ndarray:
        """Flat pool slots (``block * block_size + offset``) of pairs at ``position`` of (``layer``, ``head``) of
        ``slot``; all arrays broadcast together."""
        position = np.asarray(position, dtype=np.int64)
        blocks = self.tables[slot, layer, head, position // self.block_size].astype(np.int64)
        return blocks * self.block_size + position % self.block_size
