"""Writing pairs to the head-wise pool and attending over it: the torch path (any device; the reference of the
Triton kernel).

The pool is one tensor ``[N, 2, block_size, D]``: block ``n`` holds the keys (``[n, 0]``) and values (``[n, 1]``) of
``block_size`` consecutive pairs of one (layer, KV head) of one sequence. A flat slot ``s`` is row ``s % block_size``
of block ``s // block_size``.

Attention is causal per head: the ``j``-th new token of a sequence sees the ``lengths_before`` pairs its head stored
and the sequence's new tokens up to itself. Queries are ``[T, Hq, D]`` with ``Hq = H x G`` (grouped-query attention:
query head ``h * G + g`` reads KV head ``h``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkvzip_press.paged.step import StepLayout


def write_pairs(pool: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Store ``keys`` / ``values`` ``[n, D]`` at flat pool ``slots`` ``[n]`` (in place)."""
    block_size = pool.shape[2]
    slots = slots.to(pool.device, torch.int64)
    blocks, rows = slots // block_size, slots % block_size
    pool[blocks, 0, rows] = keys.to(pool.dtype)
    pool[blocks, 1, rows] = values.to(pool.dtype)


def write_new_tokens(pool: torch.Tensor, step: StepLayout, layer: int, keys: torch.Tensor, values: torch.Tensor):
    """Store a forward's new ``keys`` / ``values`` ``[T, H, D]`` of ``layer`` in every head."""
    head_dim = keys.shape[-1]
    write_pairs(pool, step.write_slots[layer].reshape(-1), keys.reshape(-1, head_dim), values.reshape(-1, head_dim))


def paged_attention(
    query: torch.Tensor, pool: torch.Tensor, step: StepLayout, layer: int, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention of ``layer``'s queries ``[T, Hq, D]`` over each head's pairs (the new tokens written already);
    returns ``[T, Hq, D]`` (into ``out`` when given).

    Sequences with one new token (decoding) are computed together, the others (prefill chunks) together, each
    group in one batched call over its heads' gathered blocks.
    """
    out = torch.empty_like(query) if out is None else out
    single = step.query_lens == 1
    for group in (torch.nonzero(single).flatten(), torch.nonzero(~single).flatten()):
        if group.numel():
            _attend_group(query, pool, step, layer, scale, group, out)
    return out


def _attend_group(
    query: torch.Tensor,
    pool: torch.Tensor,
    step: StepLayout,
    layer: int,
    scale: float,
    group: torch.Tensor,
    out: torch.Tensor,
) -> None:
    n_tokens, n_query_heads, head_dim = query.shape
    block_size = pool.shape[2]
    query_lens = step.query_lens[group].long()  # [r]
    before = step.lengths_before[layer, group].long()  # [r, H]
    heads = before.shape[1]
    groups = n_query_heads // heads
    width = int(query_lens.max())
    n_keys = int((before + query_lens[:, None]).max())
    n_blocks = -(-n_keys // block_size)
    # Keys and values of each head's blocks, [r * H, 1, n_blocks * block_size, D].
    blocks = pool[step.block_tables[layer, group, :, :n_blocks].long()]  # [r, H, n_blocks, 2, bs, D]
    keys = blocks[:, :, :, 0].reshape(-1, 1, n_blocks * block_size, head_dim)
    values = blocks[:, :, :, 1].reshape(-1, 1, n_blocks * block_size, head_dim)
    # Queries of each head's group, rows (g, i): [r * H, 1, G * width, D]; rows past a sequence's tokens are padding.
    offsets = torch.arange(width, device=query.device)
    index = (step.query_start[group].long()[:, None] + offsets).clamp(max=n_tokens - 1)  # [r, width]
    valid = offsets < query_lens[:, None]  # [r, width]
    grouped = query[index].view(-1, width, heads, groups, head_dim).permute(0, 2, 3, 1, 4)  # [r, H, G, width, D]
    queries = grouped.reshape(-1, 1, groups * width, head_dim)
    visible = before[:, :, None] + offsets[None, None, :] + 1  # [r, H, width]: keys each query row sees
    columns = torch.arange(n_blocks * block_size, device=query.device)
    mask = columns < visible.repeat(1, 1, groups)[..., None]  # [r, H, G * width, keys]
    attended = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=mask.view(-1, 1, *mask.shape[2:]), scale=scale
    )
    result = attended.view(-1, heads, groups, width, head_dim).permute(0, 3, 1, 2, 4)  # [r, width, H, G, D]
    out[index[valid]] = result.reshape(-1, width, n_query_heads, head_dim)[valid].to(out.dtype)
