"""Applying eviction decisions to a transformers cache: masked (kvpress-style) or ragged (memory freed)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Cache

from fastkvzip_press.cache import RaggedLayer

COMPACTIONS = ("ragged", "masked")


def apply_masked(attention: dict[int, nn.Module], evicted: dict[int, torch.Tensor]) -> None:
    """Hand ``evicted [B, H, T]`` masks to kvpress's attention patch (the cache keeps its full size)."""
    for layer_id, layer_evicted in evicted.items():
        attention[layer_id].masked_key_indices = torch.nonzero(layer_evicted, as_tuple=True)


def check_ragged_batch(batch_size: int) -> None:
    if batch_size != 1:
        raise ValueError(
            f"ragged compaction holds one sequence per cache, got batch size {batch_size}; run sequences one at a "
            "time (kvpress's pipeline does) or use FastKVzipPress(compaction='masked') for batches"
        )


def evict_pending(cache: Cache, layer_id: int, span_evicted: torch.Tensor, n_pending: int) -> RaggedLayer:
    """Evict from the undecided tail of one layer and store it ragged.

    Every head's last ``n_pending`` tokens are undecided; ``span_evicted [H, n]`` (``n <= n_pending``) flags the
    first ``n`` of them. Earlier tokens stay, as do the rest of the tail. A dense layer (no eviction yet, so all its
    tokens are pending) is converted to a :class:`RaggedLayer`.
    """
    layer = cache.layers[layer_id]
    heads, n_span = span_evicted.shape
    tail_kept = torch.ones(heads, n_pending - n_span, dtype=torch.bool, device=span_evicted.device)
    pending_keep = torch.cat([~span_evicted, tail_kept], dim=1)  # [H, n_pending]
    if not isinstance(layer, RaggedLayer):
        check_ragged_batch(layer.keys.shape[0])
        if layer.keys.shape[2] != n_pending:
            raise RuntimeError(f"layer {layer_id}: dense cache of {layer.keys.shape[2]} tokens, {n_pending} pending")
        cache.layers[layer_id] = RaggedLayer.from_dense(layer.keys, layer.values, pending_keep.unsqueeze(0))
        return cache.layers[layer_id]
    decided = [length - n_pending for length in layer.head_lengths]
    keep = torch.cat(
        [
            torch.cat([torch.ones(n, dtype=torch.bool, device=span_evicted.device), pending_keep[head]])
            for head, n in enumerate(decided)
        ]
    )
    layer.compact(keep)
    return layer


def apply_ragged(cache: Cache, evicted: dict[int, torch.Tensor]) -> None:
    """Replace each dense layer by a ragged one without its ``evicted [1, H, T]`` pairs."""
    for layer_id, layer_evicted in evicted.items():
        check_ragged_batch(layer_evicted.shape[0])
        evict_pending(cache, layer_id, layer_evicted[0], layer_evicted.shape[-1])
