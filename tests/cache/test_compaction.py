"""Applying decisions to a transformers cache: dense to ragged, compaction of an undecided tail or of held rows,
and the prefill's scores handed to whoever evicts next."""

import torch
from transformers import DynamicCache

from fastkvzip_press.cache import evict_from_tail, evict_held, held_rows, ragged_layer_ids, take_scores

HEADS, DIM = 2, 4


def dense_cache(tokens: int, layers: int = 2, batch: int = 1, seed: int = 0) -> DynamicCache:
    generator = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for layer_id in range(layers):
        keys = torch.randn(batch, HEADS, tokens, DIM, generator=generator)
        cache.update(keys, keys + 1, layer_id)
    return cache


def test_one_pass_turns_a_dense_layer_ragged_with_its_scores():
    cache = dense_cache(10)
    keys = cache.layers[1].keys.clone()
    evicted = torch.zeros(1, HEADS, 10, dtype=torch.bool)
    evicted[0, 0, [2, 3]] = True
    evicted[0, 1, 5:] = True
    scores = torch.rand(1, HEADS, 10)
    layer = evict_from_tail(cache, 1, evicted, 10, scores)
    assert cache.layers[1] is layer and ragged_layer_ids(cache) == [1]
    assert layer.head_lengths == [8, 5] and held_rows(cache, 1) == [8, 5] and held_rows(cache, 0) == [10, 10]
    assert torch.equal(layer.head_keys(0), keys[0, 0, ~evicted[0, 0]])
    handed = take_scores(cache, 1)
    assert [s.tolist() for s in handed] == [scores[0, h, ~evicted[0, h]].tolist() for h in range(HEADS)]
    assert take_scores(cache, 1) is None and take_scores(cache, 0) is None  # taken once; dense layers have none


def test_chunks_decide_the_undecided_tail_only():
    cache = dense_cache(6, layers=1)
    tail_scores = torch.rand(1, HEADS, 6)
    evicted = torch.zeros(1, HEADS, 6, dtype=torch.bool)
    evicted[0, 0, 1] = True
    evict_from_tail(cache, 0, evicted, 6, tail_scores)  # 4 decided, the last 2 deferred (never evicted now)
    layer = cache.layers[0]
    assert layer.head_lengths == [5, 6]
    new = torch.randn(1, HEADS, 3, DIM)
    layer.update(new, new)  # the next chunk: 2 deferred + 3 new undecided tokens
    next_scores = torch.rand(1, HEADS, 5)
    evicted = torch.zeros(1, HEADS, 5, dtype=torch.bool)
    evicted[0, 1, 0] = True  # the first deferred token of head 1
    evict_from_tail(cache, 0, evicted, 5, next_scores)
    assert layer.head_lengths == [8, 8]
    expected_1 = torch.cat([tail_scores[0, 1, :4], next_scores[0, 1, 1:]])
    assert torch.equal(take_scores(cache, 0)[1], expected_1)


def test_decoding_evicts_among_held_rows_and_tracks_positions():
    cache = dense_cache(8, layers=1)
    evicted = torch.zeros(1, HEADS, 8, dtype=torch.bool)
    evicted[0, 0, [1, 6]] = True
    layer = evict_held(cache, 0, evicted)
    assert layer.tracks_positions and layer.head_positions(0).tolist() == [0, 2, 3, 4, 5, 7]
    new = torch.randn(1, HEADS, 2, DIM)
    layer.update(new, new)
    evicted = torch.zeros(1, HEADS, 10, dtype=torch.bool)
    evicted[0, 1, 9] = True  # the newest row of head 1
    evicted[0, 0, 9] = True  # past head 0's 8 held rows: ignored
    evict_held(cache, 0, evicted)
    assert layer.head_lengths == [8, 9] and layer.head_positions(1).tolist() == list(range(9))


def test_sequences_of_a_batch_keep_their_own_tails_and_drop_their_padding():
    cache = dense_cache(6, layers=1, batch=2)
    keys = cache.layers[0].keys.clone()
    padding = torch.tensor([[True, True, False, False, False, False], [False] * 6])  # sequence 0: left padding
    evicted = torch.zeros(2, HEADS, 6, dtype=torch.bool)
    evicted[1, 0, 3] = True
    layer = evict_from_tail(cache, 0, evicted, 6, torch.rand(2, HEADS, 6), padding)
    assert layer.head_lengths == [4, 4, 5, 6] and layer.pad_tokens == [2, 0]
    assert torch.equal(layer.head_keys(1, sequence=0), keys[0, 1, 2:])
    new = torch.randn(2, HEADS, 2, DIM)
    layer.update(new, new)
    # Sequence 0 has 3 undecided tokens, sequence 1 has 2: right-aligned columns of one [B, H, 3] decision.
    evicted = torch.zeros(2, HEADS, 3, dtype=torch.bool)
    evicted[0, :, 0] = True  # sequence 0's oldest undecided token, in both heads
    evicted[1, 1, 1] = True  # sequence 1's first undecided token (column 0 is not in its tail)
    evict_from_tail(cache, 0, evicted, [3, 2], torch.rand(2, HEADS, 3))
    assert layer.head_lengths == [5, 5, 7, 7]
    assert torch.equal(layer.head_keys(0, sequence=0)[-3:], torch.cat([keys[0, 0, 4:5], new[0, 0]]))  # 5 evicted
    assert torch.equal(layer.head_keys(1, sequence=1)[-1:], new[1, 1, 1:])


def test_a_dense_batch_turns_ragged_in_decoding_without_its_padding():
    cache = dense_cache(5, layers=1, batch=2)
    padding = torch.tensor([[True, False, False, False, False], [False] * 5])
    evicted = torch.zeros(2, HEADS, 5, dtype=torch.bool)
    evicted[1, :, 2] = True
    layer = evict_held(cache, 0, evicted, padding)
    assert layer.head_lengths == [4, 4, 4, 4] and layer.pad_tokens == [1, 0]
    assert layer.head_positions(0, sequence=0).tolist() == [1, 2, 3, 4]
    assert layer.head_positions(0, sequence=1).tolist() == [0, 1, 3, 4]
