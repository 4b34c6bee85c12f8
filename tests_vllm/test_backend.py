"""vLLM's CPU attention kernel over single-head blocks (the CPU path of the head-wise store) against the package's
torch path, on the same pairs: heads of different lengths, decoding and prefill chunks in one forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastkvzip_press.paged import HeadBlockPool, HeadTables, plan_step
from fastkvzip_press.vllm.headwise import TorchPath
from fastkvzip_press.vllm.seam.backend import NativeCPUPath, cpu_attention_isa

LAYERS, HEADS, GROUPS, HEAD_DIM = 2, 3, 3, 64


def paths(block_size: int, n_blocks: int):
    isa = cpu_attention_isa(torch.float32, block_size, HEAD_DIM)
    buffers = [torch.zeros(n_blocks, block_size * 2 * HEAD_DIM) for _ in range(2)]
    return NativeCPUPath(buffers[0], block_size, HEAD_DIM, isa), TorchPath(buffers[1], block_size, HEAD_DIM)


@pytest.mark.parametrize("block_size", [32, 128])
def test_the_cpu_kernel_attends_as_the_torch_path(block_size):
    rng = np.random.default_rng(block_size)
    generator = torch.Generator().manual_seed(block_size)
    n_blocks = 400
    native, reference = paths(block_size, n_blocks)
    tables = HeadTables(HeadBlockPool(n_blocks), 4, LAYERS, HEADS, 40, block_size)
    slots = np.array([tables.slot(f"r{i}") for i in range(4)])
    stored = rng.integers(0, 300, size=(4, LAYERS, HEADS))
    stored[1] = 0  # a request at its first prefill chunk
    for slot, lengths in zip(slots, stored):
        tables.grow(np.array([slot]), np.array([int(lengths.max())]))
        tables.shrink(slot, lengths)
        for layer in range(LAYERS):
            for head in range(HEADS):
                n = int(lengths[layer, head])
                where = torch.from_numpy(tables.pool_slots(slot, layer, head, np.arange(n)))
                keys, values = (torch.randn(n, HEAD_DIM, generator=generator) for _ in range(2))
                native.write(where, keys, values)
                reference.write(where, keys, values)
    for query_lens in ([1, 40, 1, 7], [1, 1, 1, 1]):
        step = plan_step(tables, slots, np.array(query_lens), torch.device("cpu"))
        native.prepare(step)
        reference.prepare(step)
        tokens = sum(query_lens)
        for layer in range(LAYERS):
            keys, values = (torch.randn(tokens * HEADS, HEAD_DIM, generator=generator) for _ in range(2))
            native.write(step.write_slots[layer].reshape(-1), keys, values)
            reference.write(step.write_slots[layer].reshape(-1), keys, values)
            query = torch.randn(tokens, HEADS * GROUPS, HEAD_DIM, generator=generator)
            out_native, out_reference = torch.empty_like(query), torch.empty_like(query)
            native.attend(query, step, layer, HEAD_DIM**-0.5, out_native)
            reference.attend(query, step, layer, HEAD_DIM**-0.5, out_reference)
            torch.testing.assert_close(out_native, out_reference, atol=1e-5, rtol=1e-4)
