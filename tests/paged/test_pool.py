"""The single-head block pool and the per-sequence tables: blocks follow each head's own length, every block comes
back, and the pool is never handed out twice."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastkvzip_press.paged import HeadBlockPool, HeadTables, PoolExhausted, blocks_for

BLOCK = 4


def make_tables(blocks: int = 200, slots: int = 6, layers: int = 2, heads: int = 3, max_blocks: int = 40):
    pool = HeadBlockPool(blocks, first=1)
    return pool, HeadTables(pool, slots, layers, heads, max_blocks, BLOCK)


def test_the_pool_hands_out_distinct_blocks_and_takes_them_back():
    pool = HeadBlockPool(10, first=1)
    first, second = pool.allocate(4), pool.allocate(5)
    assert sorted(np.concatenate([first, second]).tolist()) == list(range(1, 10))
    with pytest.raises(PoolExhausted, match="asked for 1 single-head blocks, 0 free of 9"):
        pool.allocate(1)
    pool.release(first)
    assert pool.num_free == 4
    assert sorted(pool.allocate(4).tolist()) == sorted(first.tolist())


def test_growing_gives_every_head_room_and_positions_map_to_its_own_blocks():
    pool, tables = make_tables()
    a, b = tables.slot("a"), tables.slot("b")
    before = tables.grow(np.array([a, b]), np.array([6, 1]))
    assert before.tolist() == np.zeros((2, 2, 3)).tolist()
    assert tables.blocks_held(a) == 2 * 3 * 2 and tables.blocks_held(b) == 2 * 3
    slots = tables.pool_slots(a, np.arange(2)[:, None, None], np.arange(3)[None, :, None], np.arange(6))
    assert len(set(slots.ravel().tolist())) == 2 * 3 * 6, "no two pairs share a slot"
    assert pool.num_free == pool.capacity - 18


def test_shrinking_frees_the_blocks_past_each_heads_own_length():
    pool, tables = make_tables()
    a = tables.slot("a")
    tables.grow(np.array([a]), np.array([10]))  # 3 blocks per head
    kept = np.array([[1, 4, 9], [10, 0, 5]])
    tables.shrink(a, kept)
    assert tables.blocks_held(a) == int(blocks_for(kept, BLOCK).sum()) == 1 + 1 + 3 + 3 + 0 + 2
    assert pool.num_free == pool.capacity - 10
    tables.grow(np.array([a]), np.array([3]))  # each head appends at its own length
    assert tables.lengths[a].tolist() == (kept + 3).tolist()
    tables.close("a")
    assert pool.num_free == pool.capacity


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("grow shrink close".split()), st.integers(0, 4), st.integers(0, 20)), max_size=40
    )
)
def test_random_growth_compaction_and_closing_never_lose_or_share_a_block(operations):
    pool, tables = make_tables(blocks=400)
    rng = np.random.default_rng(0)
    for kind, key, amount in operations:
        name = f"s{key}"
        if kind == "grow":
            slot = tables.slot(name)
            if blocks_for(tables.lengths[slot] + amount, BLOCK).max() > tables.max_blocks:
                continue
            tables.grow(np.array([slot]), np.array([amount]))
        elif kind == "shrink" and name in tables:
            slot = tables.slot(name)
            tables.shrink(slot, rng.integers(0, tables.lengths[slot] + 1))
        elif kind == "close":
            tables.close(name)
        held = []
        for other in range(5):
            if f"s{other}" in tables:
                slot = tables.slot(f"s{other}")
                used = np.arange(tables.max_blocks) < blocks_for(tables.lengths[slot], BLOCK)[..., None]
                held.append(tables.tables[slot][used])
        held = np.concatenate(held) if held else np.zeros(0, dtype=np.int32)
        assert len(set(held.tolist())) == len(held), "a block is held twice"
        assert len(held) + pool.num_free == pool.capacity, "a block went missing"
        assert 0 not in held.tolist(), "block 0 is reserved"
