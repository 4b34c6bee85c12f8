"""Attention over the head-wise pool equals attention over each head's own pairs, for decoding and prefill chunks in
one batch, whatever each head's length."""

import numpy as np
import pytest
import torch
from paged_helpers import HeadwiseBatch


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("groups", [1, 3])
def test_decoding_and_prefill_in_one_batch_attend_each_heads_own_pairs(block_size, groups):
    rng = np.random.default_rng(block_size + groups)
    stored = [rng.integers(0, 40, size=(2, 3)) for _ in range(4)]
    stored[1][:] = 0  # a sequence at its first chunk
    batch = HeadwiseBatch(stored, block_size, head_dim=16)
    assert batch.step([1, 7, 1, 3], groups, scale=0.25) < 1e-5
    assert batch.step([1, 1, 1, 1], groups, scale=0.25) < 1e-5  # everyone decoding, heads at their own lengths


def test_a_head_that_kept_nothing_still_attends_to_its_new_tokens():
    stored = [np.array([[0, 5], [12, 0]])]
    batch = HeadwiseBatch(stored, block_size=4, head_dim=8)
    assert batch.step([2], groups=2, scale=0.3) < 1e-5


def test_bfloat16_pairs_attend_within_bfloat16_rounding():
    rng = np.random.default_rng(1)
    batch = HeadwiseBatch([rng.integers(1, 50, size=(1, 2)) for _ in range(3)], 8, 32, dtype=torch.bfloat16)
    assert batch.step([1, 4, 1], groups=2, scale=32**-0.5) < 2e-2
