"""The Triton kernel of attention over the head-wise pool, in Triton's interpreter on CPU, against the torch path:
tiny shapes and GPU shapes (head_dim 64 / 128, 8 KV heads, 4 query heads each, 16-token blocks, heads of different
lengths up to 8k)."""

import numpy as np
import pytest
import torch
from paged_helpers import HeadwiseBatch

from fastkvzip_press.paged import paged_attention as torch_path
from fastkvzip_press.paged import plan_step, write_new_tokens
from fastkvzip_press.triton.paged_attention import paged_attention


def both_paths(batch: HeadwiseBatch, query_lens: list[int], groups: int, monkeypatch) -> tuple:
    step = plan_step(batch.tables, batch.slots, np.array(query_lens), torch.device("cpu"))
    n_tokens = sum(query_lens)
    keys, values = (batch.random(n_tokens, batch.heads, batch.head_dim) for _ in range(2))
    write_new_tokens(batch.pool, step, 0, keys, values)
    query = batch.random(n_tokens, batch.heads * groups, batch.head_dim)
    scale = batch.head_dim**-0.5
    monkeypatch.setenv("FASTKVZIP_PRESS_KERNELS", "triton")
    kernel = paged_attention(query, batch.pool, step, 0, scale)
    monkeypatch.setenv("FASTKVZIP_PRESS_KERNELS", "torch")
    return kernel, torch_path(query, batch.pool, step, 0, scale)


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [5, 1, 17], [40, 3, 1]])
def test_the_kernel_attends_as_the_torch_path_at_tiny_shapes(needs_triton, monkeypatch, query_lens):
    rng = np.random.default_rng(len(query_lens) + sum(query_lens))
    batch = HeadwiseBatch([rng.integers(0, 70, size=(1, 2)) for _ in query_lens], block_size=16, head_dim=16)
    kernel, reference = both_paths(batch, query_lens, groups=3, monkeypatch=monkeypatch)
    torch.testing.assert_close(kernel, reference, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_kernel_attends_as_the_torch_path_at_gpu_shapes(needs_triton, monkeypatch, head_dim):
    rng = np.random.default_rng(head_dim)
    stored = [rng.integers(0, 8192, size=(1, 8)), rng.integers(0, 600, size=(1, 8))]
    stored[0][0, :2] = [8191, 3]  # heads far apart in one sequence
    batch = HeadwiseBatch(stored, block_size=16, head_dim=head_dim)
    kernel, reference = both_paths(batch, [1, 20], groups=4, monkeypatch=monkeypatch)
    torch.testing.assert_close(kernel, reference, atol=2e-6, rtol=1e-5)


def test_bfloat16_pairs_give_the_torch_paths_result_within_bfloat16_rounding(needs_triton, monkeypatch):
    rng = np.random.default_rng(3)
    batch = HeadwiseBatch(
        [rng.integers(0, 300, size=(1, 8)) for _ in range(2)], block_size=16, head_dim=64, dtype=torch.bfloat16
    )
    kernel, reference = both_paths(batch, [1, 9], groups=4, monkeypatch=monkeypatch)
    torch.testing.assert_close(kernel.float(), reference.float(), atol=2e-2, rtol=2e-2)
