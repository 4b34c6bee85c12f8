"""Ragged attention on the GPU at 8B shapes: torch's varlen kernel (one call over every segment) and per-segment SDPA,
both against attention computed in fp32 over each segment's kept keys."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastkvzip_press.cache import RaggedLayer, attention_path_counts, ragged_attention, ragged_attention_path, varlen

pytestmark = pytest.mark.cuda

BATCH, HEADS, GROUP, TOKENS = 2, 8, 4, 3000
ULPS = 4


def ragged_layer(device, dtype: torch.dtype, head_dim: int, n_new: int) -> RaggedLayer:
    """A batch layer holding 40 % of ``TOKENS`` per head (first and last rows kept), then ``n_new`` appended rows."""
    generator = torch.Generator(device).manual_seed(head_dim + n_new)
    keys, values = torch.randn(2, BATCH, HEADS, TOKENS, head_dim, generator=generator, device=device).to(dtype)
    keep = torch.rand(BATCH, HEADS, TOKENS, generator=generator, device=device) < 0.4
    keep[..., 0] = keep[..., -1] = True
    layer = RaggedLayer.from_dense(keys, values, keep)
    new = torch.randn(2, BATCH, HEADS, n_new, head_dim, generator=generator, device=device).to(dtype)
    layer.update(new[0], new[1])
    return layer


def reference(query: torch.Tensor, layer: RaggedLayer, scaling: float) -> torch.Tensor:
    """fp32 attention of every segment's query group over its kept keys, causal from the bottom right;
    ``[B, t, Hq, D]``."""
    bsz, n_q_heads, q_len, head_dim = query.shape
    out = torch.empty(bsz, n_q_heads, q_len, head_dim, device=query.device)
    for b in range(bsz):
        for h in range(HEADS):
            keys, values = layer.head_keys(h, b).float(), layer.head_values(h, b).float()
            n_keys = keys.shape[0]
            visible = torch.ones(q_len, n_keys, dtype=torch.bool, device=query.device).tril(n_keys - q_len)
            group = query[b, h * GROUP : (h + 1) * GROUP].float()
            out[b, h * GROUP : (h + 1) * GROUP] = F.scaled_dot_product_attention(
                group, keys[None].expand(GROUP, -1, -1), values[None].expand(GROUP, -1, -1), attn_mask=visible,
                scale=scaling,
            )  # fmt: skip
    return out.transpose(1, 2)


@pytest.mark.parametrize("n_new", [1, 5])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_varlen_and_per_segment_equal_fp32_attention(device, monkeypatch, dtype, head_dim, n_new):
    path = ragged_attention_path(device, dtype, head_dim)
    if path.name != varlen.VARLEN:
        pytest.skip(f"the varlen path does not run here: {path}")
    layer = ragged_layer(device, dtype, head_dim, n_new)
    generator = torch.Generator(device).manual_seed(5)
    query = torch.randn(BATCH, HEADS * GROUP, n_new, head_dim, generator=generator, device=device).to(dtype)
    scaling = 1 / math.sqrt(head_dim)
    expected = reference(query, layer, scaling)
    tol = ULPS * torch.finfo(dtype).eps * float(expected.abs().max())
    before = attention_path_counts().get(varlen.VARLEN, 0)
    through_varlen = ragged_attention(query, layer, scaling)
    assert attention_path_counts()[varlen.VARLEN] == before + 1
    monkeypatch.setenv(varlen.VARLEN_ENV, "0")
    per_segment = ragged_attention(query, layer, scaling)
    for got in (through_varlen, per_segment):
        assert got.dtype == dtype and got.shape == expected.shape
        torch.testing.assert_close(got.float(), expected, atol=tol, rtol=0)


def test_fp32_takes_the_per_segment_path(device):
    assert ragged_attention_path(device, torch.float32, 128).name == varlen.PER_SEGMENT
