"""The Triton kernel of attention over the head-wise pool, compiled, against the torch path on the same GPU: heads of
different lengths up to 8k, 16-token blocks, 8 KV heads of 4 query heads, decoding and prefill chunks together."""

import numpy as np
import pytest
import torch
from paged_helpers import HeadwiseBatch

from fastkvzip_press.paged import plan_step, write_new_tokens
from fastkvzip_press.triton.paged_attention import paged_attention

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_kernel_attends_as_the_torch_path(device, monkeypatch, head_dim, dtype):
    rng = np.random.default_rng(head_dim)
    stored = [rng.integers(0, 8192, size=(1, 8)), rng.integers(0, 600, size=(1, 8)), rng.integers(0, 50, size=(1, 8))]
    batch = HeadwiseBatch(stored, block_size=16, head_dim=head_dim, dtype=dtype)
    pool = batch.pool.to(device)
    step = plan_step(batch.tables, batch.slots, np.array([1, 33, 1]), device)
    tokens = 35
    keys, values = (batch.random(tokens, batch.heads, head_dim).to(device) for _ in range(2))
    write_new_tokens(pool, step, 0, keys, values)
    query = batch.random(tokens, batch.heads * 4, head_dim).to(device)
    kernel = paged_attention(query, pool, step, 0, head_dim**-0.5)
    monkeypatch.setenv("FASTKVZIP_PRESS_KERNELS", "torch")
    reference = paged_attention(query, pool, step, 0, head_dim**-0.5)
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(kernel.float(), reference.float(), atol=tolerance, rtol=tolerance)
