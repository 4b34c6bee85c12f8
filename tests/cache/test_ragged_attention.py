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
