"""Attention over a ragged layer against eager attention over the dense cache with evicted keys masked."""

import math

import pytest
import torch

from fastkvzip_press.cache import RaggedLayer
from fastkvzip_press.cache.attention import bottom_right_causal_mask, ragged_attention

HEADS, TOKENS, DIM = 3, 20, 8


def dense_kv(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, HEADS, TOKENS, DIM, generator=generator)
    values = torch.randn(1, HEADS, TOKENS, DIM, generator=generator)
    keep = torch.rand(1, HEADS, TOKENS, generator=generator) < 0.6
    keep[0, 0] = True
    keep[0, 1, 2:] = False
    return keys, values, keep


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


def batch_layer(seed: int = 5, bsz: int = 3, tokens: int = 24):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(bsz, HEADS, tokens, DIM, generator=generator)
    values = torch.randn(bsz, HEADS, tokens, DIM, generator=generator)
    keep = torch.rand(bsz, HEADS, tokens, generator=generator) < 0.5
    keep[..., -1] = True
    return keys, values, keep


@pytest.mark.parametrize("n_new", [1, 3])
def test_a_batch_attends_per_sequence_and_head(n_new):
    keys, values, keep = batch_layer()
    layer = RaggedLayer.from_dense(keys, values, keep)
    new_keys, new_values = torch.randn(2, 3, HEADS, n_new, DIM).unbind(0)
    layer.update(new_keys, new_values)
    query = torch.randn(3, HEADS * 2, n_new, DIM)
    out = ragged_attention(query, layer, 1 / math.sqrt(DIM))
    for b in range(3):
        expected = reference_attention(
            query[b : b + 1],
            torch.cat([keys[b : b + 1], new_keys[b : b + 1]], dim=2),
            torch.cat([values[b : b + 1], new_values[b : b + 1]], dim=2),
            torch.cat([keep[b : b + 1], torch.ones(1, HEADS, n_new, dtype=torch.bool)], dim=2),
            n_new,
            1 / math.sqrt(DIM),
        )
        torch.testing.assert_close(out[b : b + 1], expected, atol=1e-5, rtol=1e-5)


def test_padding_among_the_new_rows_is_read_from_the_mask():
    keys, values, keep = batch_layer(bsz=2)
    layer = RaggedLayer.from_dense(keys, values, keep)
    n_new = 4
    new_keys, new_values = torch.randn(2, 2, HEADS, n_new, DIM).unbind(0)
    layer.update(new_keys, new_values)
    logical = layer.get_seq_length()
    # sequence 0: its first 2 new tokens are padding (the end of its left padding); sequence 1 has none
    mask = bottom_right_causal_mask(n_new, logical, "cpu").expand(2, 1, n_new, logical).clone()
    mask[0, :, :, logical - n_new : logical - n_new + 2] = False
    query = torch.randn(2, HEADS * 2, n_new, DIM)
    out = ragged_attention(query, layer, 1 / math.sqrt(DIM), attention_mask=mask)
    new_keep = torch.ones(2, HEADS, n_new, dtype=torch.bool)
    new_keep[0, :, :2] = False
    for b in range(2):
        expected = reference_attention(
            query[b : b + 1],
            torch.cat([keys[b : b + 1], new_keys[b : b + 1]], dim=2),
            torch.cat([values[b : b + 1], new_values[b : b + 1]], dim=2),
            torch.cat([keep[b : b + 1], new_keep[b : b + 1]], dim=2),
            n_new,
            1 / math.sqrt(DIM),
        )
        rows = slice(2, None) if b == 0 else slice(None)  # padding queries' outputs are never used
        torch.testing.assert_close(out[b : b + 1, rows], expected[:, rows], atol=1e-5, rtol=1e-5)


def test_ragged_attention_works_under_kvpress_masking_patch():
    """kvpress wraps every registered attention function when it is imported; when that happens after the ragged
    attention was registered, its wrapper reads ``key.shape`` from the ragged layer and must pass it through."""
    from kvpress.attention_patch import attention_patch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from fastkvzip_press.cache import register_ragged_attention

    keys, values, keep = dense_kv(seed=5)
    layer = RaggedLayer.from_dense(keys, values, keep)
    layer.append(*torch.randn(2, 1, HEADS, 1, DIM).unbind(0))
    assert layer.shape == (1, HEADS, TOKENS + 1, DIM)
    query = torch.randn(1, 2 * HEADS, 1, DIM)
    wrapped = attention_patch(ALL_ATTENTION_FUNCTIONS[register_ragged_attention("sdpa")])
    out, _ = wrapped(torch.nn.Module(), query, layer, layer, None, 0.0, scaling=0.3)
    torch.testing.assert_close(out, ragged_attention(query, layer, 0.3))


def test_a_flash_attention_padding_mask_marks_the_same_new_rows():
    """flash-attention layers get the 2-D padding mask ``[B, kv]`` instead of sdpa's 4-D mask."""
    keys, values, keep = batch_layer(bsz=2)
    layer = RaggedLayer.from_dense(keys, values, keep)
    n_new = 4
    layer.update(*torch.randn(2, 2, HEADS, n_new, DIM).unbind(0))
    logical = layer.get_seq_length()
    four_d = bottom_right_causal_mask(n_new, logical, "cpu").expand(2, 1, n_new, logical).clone()
    four_d[0, :, :, logical - n_new : logical - n_new + 2] = False
    two_d = torch.ones(2, logical, dtype=torch.long)
    two_d[0, logical - n_new : logical - n_new + 2] = 0
    query = torch.randn(2, HEADS * 2, n_new, DIM)
    torch.testing.assert_close(
        ragged_attention(query, layer, 0.2, attention_mask=two_d)[:, 2:],
        ragged_attention(query, layer, 0.2, attention_mask=four_d)[:, 2:],
    )


def test_ragged_layers_refuse_what_they_cannot_attend():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from fastkvzip_press.cache import register_ragged_attention

    keys, values, keep = dense_kv()
    layer = RaggedLayer.from_dense(keys, values, keep)
    attention = ALL_ATTENTION_FUNCTIONS[register_ragged_attention("sdpa")]
    query = torch.randn(1, HEADS, 1, DIM)
    with pytest.raises(NotImplementedError, match="full attention without logit soft-capping"):
        attention(torch.nn.Module(), query, layer, layer, None, sliding_window=8)
    with pytest.raises(ValueError, match="holds 1 sequence"):
        ragged_attention(torch.randn(2, HEADS, 1, DIM), layer, 0.1)
    with pytest.raises(ValueError, match="attn_implementation in"):
        register_ragged_attention("eager")
