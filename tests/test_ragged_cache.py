"""The ragged head-wise cache layer and the attention over it, without a model."""

import math

import pytest
import torch

from fastkvzip_press.attention import bottom_right_causal_mask, ragged_attention
from fastkvzip_press.cache import RaggedLayer

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
    assert min(c - n for c, n in zip(layer._capacities_host, layer.head_lengths)) >= 4
    for head in range(HEADS):
        expected = torch.cat([keys[0, head, keep[0, head]], new_keys[0, head], more_keys[0, head]])
        assert torch.equal(layer.head_keys(head), expected)
    assert layer.get_seq_length() == TOKENS + 5


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
    with pytest.raises(NotImplementedError, match="beam search"):
        layer.reorder_cache(torch.tensor([0]))
    with pytest.raises(ValueError, match="batch size 2"):
        RaggedLayer.from_dense(keys.expand(2, -1, -1, -1), values.expand(2, -1, -1, -1), keep.expand(2, -1, -1))


def reference_attention(query, keys, values, keep, n_new, scaling):
    """Eager softmax attention over dense keys ``[1, H, T, D]`` where evicted keys and the future are masked."""
    _, n_q_heads, q_len, _ = query.shape
    group = n_q_heads // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    allowed = keep.repeat_interleave(group, dim=1)[:, :, None, :] & bottom_right_causal_mask(
        q_len, keys.shape[2], query.device
    )
    logits = (query @ keys.transpose(-1, -2)) * scaling
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (weights @ values).transpose(1, 2)


@pytest.mark.parametrize("n_new", [1, 4])
def test_ragged_attention_equals_masked_dense_attention(n_new):
    keys, values, keep = dense_kv(seed=3)
    layer = RaggedLayer.from_dense(keys, values, keep)
    new_keys, new_values = torch.randn(2, 1, HEADS, n_new, DIM).unbind(0)
    layer.update(new_keys, new_values)
    query = torch.randn(1, HEADS * 3, n_new, DIM)
    scaling = 1 / math.sqrt(DIM)
    out = ragged_attention(query, layer, scaling)
    all_keys = torch.cat([keys, new_keys], dim=2)
    all_values = torch.cat([values, new_values], dim=2)
    all_keep = torch.cat([keep, torch.ones(1, HEADS, n_new, dtype=torch.bool)], dim=2)
    expected = reference_attention(query, all_keys, all_values, all_keep, n_new, scaling)
    assert out.shape == (1, n_new, HEADS * 3, DIM)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
