"""Compaction strategies: ragged frees pairs through the cache package, masked writes kvpress's indices and follows
rollbacks."""

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from fastkvzip_press.cache import RaggedLayer
from fastkvzip_press.eviction import TailEviction
from fastkvzip_press.presses.compaction import MaskedCompaction, RaggedCompaction, make_compaction

HEADS, DIM = 2, 4


def cache_of(tokens: int) -> DynamicCache:
    cache = DynamicCache()
    keys = torch.randn(1, HEADS, tokens, DIM)
    cache.update(keys, keys, 0)
    return cache


def test_names_pick_strategies():
    assert isinstance(make_compaction("ragged"), RaggedCompaction)
    assert isinstance(make_compaction("masked"), MaskedCompaction)
    with pytest.raises(ValueError, match="compaction must be one of"):
        make_compaction("dense")


def test_masked_prefill_masks_the_evicted_pairs_and_keeps_the_cache():
    cache, module = cache_of(6), nn.Module()
    evicted = torch.zeros(1, HEADS, 6, dtype=torch.bool)
    evicted[0, 1, [0, 4]] = True
    MaskedCompaction().evict_tail(cache, module, 0, TailEviction.whole(evicted, None, torch.rand(1, HEADS, 6)))
    assert [t.tolist() for t in module.masked_key_indices] == [[0, 0], [1, 1], [0, 4]]
    assert cache.layers[0].keys.shape[2] == 6
    with pytest.raises(ValueError, match="needs 'ragged'"):
        span = TailEviction(evicted[..., :4], None, [6], None)  # a chunk span: not the whole dense layer
        MaskedCompaction().evict_tail(cache, module, 0, span)


def test_masked_decoding_tracks_held_positions_across_a_rollback():
    strategy, module = MaskedCompaction(), nn.Module()
    cache = cache_of(8)
    assert strategy.rows_before(cache, 0, 2) == [6, 6]
    evicted = torch.zeros(1, HEADS, 8, dtype=torch.bool)
    evicted[0, 0, [1, 7]] = True
    strategy.evict_held(cache, module, 0, evicted, None)
    assert [t.tolist() for t in module.masked_key_indices] == [[0, 0], [0, 0], [1, 7]]
    assert strategy.rows_before(cache, 0, 0) == [6, 8]
    cache.crop(5)  # a rollback removes position 7 and what came after
    new = torch.randn(1, HEADS, 1, DIM)
    cache.update(new, new, 0)
    assert strategy.rows_before(cache, 0, 1) == [4, 5]  # position 7's decision is forgotten
    strategy.reset({0: module})
    assert module.masked_key_indices is None and strategy.rows_before(cache, 0, 0) == [6, 6]


def test_ragged_decoding_frees_pairs_and_counts_held_rows():
    strategy, module = RaggedCompaction(), nn.Module()
    cache = cache_of(8)
    evicted = torch.zeros(1, HEADS, 8, dtype=torch.bool)
    evicted[0, 1, :3] = True
    strategy.evict_held(cache, module, 0, evicted, None)
    assert isinstance(cache.layers[0], RaggedLayer) and strategy.rows_before(cache, 0, 0) == [8, 5]
    assert not hasattr(module, "masked_key_indices")
