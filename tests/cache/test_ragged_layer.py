"""The ragged head-wise cache layer: storage, side columns, appends, rollback, without a model."""

import pytest
import torch

from fastkvzip_press.cache import RaggedLayer
from fastkvzip_press.cache.ragged_layer import GROWTH

HEADS, TOKENS, DIM = 3, 20, 8


def dense_kv(seed: int = 0, tokens: int = TOKENS, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, HEADS, tokens, DIM, generator=generator, dtype=dtype)
    values = torch.randn(1, HEADS, tokens, DIM, generator=generator, dtype=dtype)
    keep = torch.rand(1, HEADS, tokens, generator=generator) < 0.6
    keep[0, 0] = True  # one head keeps everything, one keeps little
    keep[0, 1, 2:] = False
    return keys, values, keep


def test_from_dense_keeps_each_heads_pairs_in_order():
    keys, values, keep = dense_kv()
    layer = RaggedLayer.from_dense(keys, values, keep, spare_tokens=4)
    assert layer.head_lengths == keep[0].sum(-1).tolist()
    for head in range(HEADS):
        torch.testing.assert_close(layer.head_keys(head), keys[0, head, keep[0, head]], rtol=0, atol=0)
        torch.testing.assert_close(layer.head_values(head), values[0, head, keep[0, head]], rtol=0, atol=0)
    padded_keys, _, mask = layer.to_padded()
    assert torch.equal(mask.sum(-1)[0], keep[0].sum(-1))
    assert layer.get_seq_length() == TOKENS  # logical length: positions are unchanged by eviction


def test_memory_is_retained_plus_spare():
    keys, values, keep = dense_kv()
    layer = RaggedLayer.from_dense(keys, values, keep, spare_tokens=4)
    row_bytes = 2 * DIM * 4
    assert layer.used_bytes() == int(keep.sum()) * row_bytes
    assert layer.spare_bytes() == HEADS * 4 * row_bytes
    assert layer.key_buffer.nbytes + layer.value_buffer.nbytes == layer.used_bytes() + layer.spare_bytes()
    assert layer.nbytes() == layer.used_bytes() + layer.spare_bytes() + 3 * HEADS * 8  # + starts/lengths/capacities


def test_append_fills_spare_room_in_place_then_regrows_once():
    keys, values, keep = dense_kv()
    layer = RaggedLayer.from_dense(keys, values, keep, spare_tokens=4)
    before = layer.key_buffer.data_ptr()
    lengths = layer.head_lengths
    new_keys, new_values = torch.randn(2, 1, HEADS, 3, DIM).unbind(0)
    layer.update(new_keys, new_values)
    assert layer.key_buffer.data_ptr() == before  # 3 tokens fit in 4 spare rows: no copy of the layer
    more_keys, more_values = torch.randn(2, 1, HEADS, 2, DIM).unbind(0)
    layer.update(more_keys, more_values)
    assert layer.key_buffer.data_ptr() != before  # out of room: rebuilt once, with fresh spare room
    assert layer.head_lengths == [n + 5 for n in lengths]
    assert min(c - n for c, n in zip(layer.head_capacities, layer.head_lengths)) >= 4
    for head in range(HEADS):
        expected = torch.cat([keys[0, head, keep[0, head]], new_keys[0, head], more_keys[0, head]])
        assert torch.equal(layer.head_keys(head), expected)
    assert layer.get_seq_length() == TOKENS + 5


def test_decoding_regrows_in_proportion_to_what_is_held():
    """One token at a time, a rebuild leaves room for GROWTH of the mean segment length: few copies of a long
    layer over a long answer, and a bounded share of spare rows. Longer appends (a question, a prefill chunk) keep
    the configured room."""
    keys, values, keep = dense_kv(tokens=400)
    layer = RaggedLayer.from_dense(keys, values, keep, spare_tokens=4)
    buffers, steps = {layer.key_buffer.data_ptr()}, 200
    for _ in range(steps):
        layer.update(*torch.randn(2, 1, HEADS, 1, DIM).unbind(0))
        buffers.add(layer.key_buffer.data_ptr())
        mean = sum(layer.head_lengths) / HEADS
        assert max(c - n for c, n in zip(layer.head_capacities, layer.head_lengths)) <= GROWTH * mean + 2
    assert len(buffers) - 1 <= 8  # a fixed room of 4 rows: 40 copies
    for head in range(HEADS):
        assert layer.head_keys(head).shape[0] == int(keep[0, head].sum()) + steps
    layer.update(*torch.randn(2, 1, HEADS, 100, DIM).unbind(0))  # past any room left: rebuilt for 100 plus 4
    assert min(c - n for c, n in zip(layer.head_capacities, layer.head_lengths)) == 4


def test_pipeline_style_rollback_truncates_appended_tokens():
    keys, values, keep = dense_kv()
    layer = RaggedLayer.from_dense(keys, values, keep)
    lengths = layer.head_lengths
    n = layer.get_seq_length()
    layer.update(*torch.randn(2, 1, HEADS, 5, DIM).unbind(0))
    # kvpress's pipeline: cache.layers[i].keys = cache.layers[i].keys[:, :, :n], then the same for values
    layer.keys = layer.keys[:, :, :n]
    layer.values = layer.values[:, :, :n]
    assert layer.head_lengths == lengths and layer.get_seq_length() == n
    assert layer.keys.shape == (1, HEADS, n, DIM)
    layer.update(*torch.randn(2, 1, HEADS, 40, DIM).unbind(0))  # outgrows the spare rows: rebuilt with more room
    layer.keys = layer.keys[:, :, :n]
    assert layer.head_lengths == lengths and layer.spare_bytes() == HEADS * 16 * 2 * DIM * 4  # room given back
    with pytest.raises(ValueError, match="cannot roll back"):
        layer.crop(n - 1)  # evicted tokens are gone; only appended ones can be rolled back


def test_unsupported_uses_fail_clearly():
    keys, values, keep = dense_kv()
    layer = RaggedLayer.from_dense(keys, values, keep)
    with pytest.raises(TypeError, match="prefix slices"):
        layer.keys[:, 0]
    with pytest.raises(TypeError, match="cannot be replaced"):
        layer.keys = torch.zeros(1)
    with pytest.raises(IndexError, match="outside the layer's 1 sequences"):
        layer.reorder_cache(torch.tensor([1]))
    with pytest.raises(ValueError, match="holds 1 sequence"):
        layer.update(*torch.randn(2, 2, HEADS, 1, DIM).unbind(0))  # a batch of 2 into a layer of 1


def test_ragged_layer_rolls_back_by_position_after_decoding_eviction():
    keys = torch.randn(1, 2, 10, 4)
    keep = torch.ones(1, 2, 10, dtype=torch.bool)
    keep[0, 0, 3:6] = False
    layer = RaggedLayer.from_dense(keys, keys.clone(), keep, track_positions=True)
    assert layer.head_positions(0).tolist() == [0, 1, 2, 6, 7, 8, 9]
    layer.append(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))  # positions 10..14
    layer.compact(torch.cat([torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1]), torch.ones(15)]).bool())
    assert layer.head_positions(0).tolist() == [0, 1, 2, 6, 7, 8, 9, 11, 13, 14]
    layer.keys = layer.keys[:, :, :12]  # kvpress's rollback: not a uniform tail any more
    assert layer.head_positions(0).tolist() == [0, 1, 2, 6, 7, 8, 9, 11]
    assert layer.head_positions(1).tolist() == list(range(12)) and layer.get_seq_length() == 12
    torch.testing.assert_close(layer.head_keys(0)[:3], keys[0, 0, :3])
    plain = RaggedLayer.from_dense(keys, keys.clone(), keep)
    assert not plain.tracks_positions and plain.nbytes() < layer.nbytes()
    plain.track_positions()
    assert plain.head_positions(0).tolist() == [-1] * 7  # held before tracking: older than any rollback


def test_side_columns_follow_their_rows_through_compaction_append_and_rollback():
    keys, values, keep = dense_kv(seed=4)
    scores = torch.rand(1, HEADS, TOKENS)
    layer = RaggedLayer.from_dense(keys, values, keep, spare_tokens=2, columns={"scores": (scores, float("nan"))})
    for head in range(HEADS):
        assert torch.equal(layer.column("scores", head), scores[0, head, keep[0, head]])
    n = layer.get_seq_length()
    layer.append(*torch.randn(2, 1, HEADS, 5, DIM).unbind(0))  # outgrows 2 spare rows: rebuilt with the column
    assert all(torch.isnan(layer.column("scores", head)[-5:]).all() for head in range(HEADS))
    layer.write_column_tail("scores", torch.full((1, HEADS, 5), 0.5))
    assert all(torch.equal(layer.column("scores", h)[-5:], torch.full((5,), 0.5)) for h in range(HEADS))
    drop_first = torch.cat([torch.tensor([False] + [True] * (length - 1)) for length in layer.head_lengths])
    layer.compact(drop_first)
    for head in range(HEADS):
        expected = torch.cat([scores[0, head, keep[0, head]][1:], torch.full((5,), 0.5)])
        assert torch.equal(layer.column("scores", head), expected)
    assert layer.column_bytes() == layer.columns["scores"].nbytes  # counted apart from keys and values
    layer.drop_column("scores")
    assert not layer.has_column("scores")
    with pytest.raises(KeyError, match="no column 'scores'"):
        layer.column("scores", 0)
    assert layer.get_seq_length() == n + 5


def test_add_column_needs_one_value_per_retained_row():
    keys, values, keep = dense_kv()
    layer = RaggedLayer.from_dense(keys, values, keep)
    layer.add_column("weights", torch.arange(sum(layer.head_lengths)).float(), fill=-1.0)
    assert layer.column("weights", 1).tolist() == list(range(layer.head_lengths[0], sum(layer.head_lengths[:2])))
    with pytest.raises(ValueError, match="one value per retained row"):
        layer.add_column("bad", torch.zeros(3), fill=0.0)
    with pytest.raises(ValueError, match="track_positions"):
        layer.add_column("positions", torch.zeros(sum(layer.head_lengths)), fill=0.0)


def batch_kv(seed: int = 0, batch: int = 3):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, HEADS, TOKENS, DIM, generator=generator)
    keep = torch.rand(batch, HEADS, TOKENS, generator=generator) < 0.5
    keep[:, :, :2] = True
    return keys, keys + 1, keep


def test_a_batch_holds_one_segment_per_sequence_and_head():
    keys, values, keep = batch_kv()
    layer = RaggedLayer.from_dense(keys, values, keep, spare_tokens=3, pad_tokens=[0, 2, 5])
    assert layer.batch_size == 3 and layer.num_heads == HEADS
    assert layer.head_lengths == keep.sum(-1).reshape(-1).tolist()
    assert layer.sequence_lengths == [TOKENS, TOKENS - 2, TOKENS - 5]
    for b in range(3):
        for h in range(HEADS):
            assert torch.equal(layer.head_keys(h, sequence=b), keys[b, h, keep[b, h]])
    new = torch.randn(3, HEADS, 2, DIM)
    layer.update(new, new)
    assert torch.equal(layer.head_keys(1, sequence=2)[-2:], new[2, 1])
    assert layer.keys.shape == (3, HEADS, TOKENS + 2, DIM) and layer.sequence_lengths[2] == TOKENS - 3


def test_beam_search_and_batch_expansion_take_whole_sequences():
    keys, values, keep = batch_kv(seed=1)
    layer = RaggedLayer.from_dense(keys, values, keep, pad_tokens=[1, 0, 2])
    layer.track_positions()
    expected = {(b, h): layer.head_keys(h, sequence=b).clone() for b in range(3) for h in range(HEADS)}
    positions = {(b, h): layer.head_positions(h, sequence=b).clone() for b in range(3) for h in range(HEADS)}
    layer.reorder_cache(torch.tensor([2, 2, 0]))
    assert layer.pad_tokens == [2, 2, 1]
    for new, old in enumerate([2, 2, 0]):
        for h in range(HEADS):
            assert torch.equal(layer.head_keys(h, sequence=new), expected[(old, h)])
            assert torch.equal(layer.head_positions(h, sequence=new), positions[(old, h)])
    layer.batch_repeat_interleave(2)
    assert layer.batch_size == 6 and torch.equal(layer.head_keys(0, sequence=5), expected[(0, 0)])
    layer.batch_select_indices(torch.tensor([4]))
    assert layer.batch_size == 1 and torch.equal(layer.head_values(1), expected[(0, 1)] + 1)
    new = torch.randn(1, HEADS, 20, DIM)
    layer.update(new, new)  # appends still find room (a rebuild) after the reorder
    assert torch.equal(layer.head_keys(0)[-20:], new[0, 0])


def test_appended_rows_read_the_column_fill_in_every_state_of_the_layer():
    """Appending writes keys and values only: a column's spare rows hold its fill value after construction,
    compaction, regrowth, rollback and beam reordering, so rows appended later read it."""
    keys, values, keep = dense_kv(seed=6)
    layer = RaggedLayer.from_dense(
        keys, values, keep, spare_tokens=3, columns={"scores": (torch.rand(1, HEADS, TOKENS), -2.0)}
    )
    layer.add_column("other", torch.rand(sum(layer.head_lengths)), 7.0)

    def append_and_check(n_new: int) -> None:
        layer.append(*torch.randn(2, layer.batch_size, HEADS, n_new, DIM).unbind(0))
        for head in range(HEADS):
            assert torch.equal(layer.column("scores", head)[-n_new:], torch.full((n_new,), -2.0))
            assert torch.equal(layer.column("other", head)[-n_new:], torch.full((n_new,), 7.0))

    append_and_check(2)  # within the spare rows of construction
    append_and_check(4)  # outgrows them: regrown
    layer.truncate(layer.get_seq_length() - 3)  # rolled back
    append_and_check(1)
    layer.compact(torch.cat([torch.arange(length) % 2 == 0 for length in layer.head_lengths]))
    append_and_check(3)
    layer.batch_repeat_interleave(2)
    append_and_check(2)


def test_the_cache_layer_contract_of_either_transformers_version():
    """transformers < 5.3 asks for mask sizes with the queries' cache positions and for ``get_max_cache_shape``;
    5.19 (vLLM's) with their number and for ``get_max_length``, which it declares abstract."""
    keys, values, keep = dense_kv()
    layer = RaggedLayer.from_dense(keys, values, keep)
    assert layer.get_mask_sizes(torch.arange(TOKENS, TOKENS + 3)) == layer.get_mask_sizes(3) == (TOKENS + 3, 0)
    assert layer.get_max_cache_shape() == layer.get_max_length() == -1
