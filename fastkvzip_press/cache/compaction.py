"""Applying an eviction decision to a transformers cache: the only code that replaces ``cache.layers[i]``.

A dense layer (transformers' ``DynamicLayer``) becomes a :class:`~fastkvzip_press.cache.ragged_layer.RaggedLayer`
without the evicted pairs; a ragged layer is compacted in place. Rollback is the layer's own ``truncate``.
"""

from __future__ import annotations

import torch
from transformers import Cache

from fastkvzip_press.cache.ragged_layer import RaggedLayer

SCORES = "scores"  # the side column of gate scores, kept for a press that evicts again later (decoding)


def check_one_sequence(batch_size: int) -> None:
    """The ragged cache holds one sequence today; say so, with what to do instead."""
    if batch_size != 1:
        raise ValueError(
            f"ragged compaction holds one sequence per cache, got batch size {batch_size}; run sequences one at a "
            "time (kvpress's pipeline does) or use FastKVzipPress(compaction='masked') for batches"
        )


def ragged_layer_ids(cache: Cache) -> list[int]:
    """Indices of the cache's layers that are ragged."""
    return [i for i, layer in enumerate(cache.layers) if isinstance(layer, RaggedLayer)]


def held_rows(cache: Cache, layer_id: int) -> list[int]:
    """Pairs each (sequence, KV head) of layer ``layer_id`` holds: its ragged lengths, or the dense length."""
    layer = cache.layers[layer_id]
    if isinstance(layer, RaggedLayer):
        return layer.head_lengths
    bsz, heads, n_tokens = layer.keys.shape[:3]
    return [n_tokens] * (bsz * heads)


def evict_from_tail(
    cache: Cache,
    layer_id: int,
    evicted: torch.Tensor,
    n_tail: int,
    scores: torch.Tensor | None = None,
) -> RaggedLayer:
    """Evict from the undecided tail of one layer (prefill, in one pass or chunk by chunk) and store it ragged.

    Every head's last ``n_tail`` rows are undecided; ``evicted [B, H, n]`` (``n <= n_tail``) flags the first ``n`` of
    them. Earlier rows stay, as does the rest of the tail. ``scores [B, H, n_tail]``, the gate scores of the tail, go
    to the layer's :data:`SCORES` column with the rows they belong to. A dense layer (nothing decided yet, so all its
    tokens are the tail) becomes a :class:`RaggedLayer`.
    """
    layer = cache.layers[layer_id]
    bsz, heads, n_span = evicted.shape
    tail_kept = torch.ones(bsz, heads, n_tail - n_span, dtype=torch.bool, device=evicted.device)
    tail_keep = torch.cat([~evicted, tail_kept], dim=-1)  # [B, H, n_tail]
    if not isinstance(layer, RaggedLayer):
        check_one_sequence(layer.keys.shape[0])
        if layer.keys.shape[2] != n_tail:
            raise RuntimeError(f"layer {layer_id}: dense cache of {layer.keys.shape[2]} tokens, {n_tail} undecided")
        columns = None if scores is None else {SCORES: (scores.float(), float("nan"))}
        cache.layers[layer_id] = RaggedLayer.from_dense(layer.keys, layer.values, tail_keep, columns=columns)
        return cache.layers[layer_id]
    if scores is not None:
        if not layer.has_column(SCORES):
            layer.add_column(SCORES, torch.full((sum(layer.head_lengths),), float("nan")), float("nan"))
        layer.write_column_tail(SCORES, scores)
    tail_keep = tail_keep.reshape(-1, n_tail)
    keep = torch.cat(
        [
            torch.cat([torch.ones(length - n_tail, dtype=torch.bool, device=evicted.device), segment_keep])
            for length, segment_keep in zip(layer.head_lengths, tail_keep)
        ]
    )
    layer.compact(keep.to(layer.device))
    return layer


def evict_held(cache: Cache, layer_id: int, evicted: torch.Tensor) -> RaggedLayer:
    """Evict among all the rows each head holds (decoding) and store the layer ragged.

    ``evicted [B, H, N]`` flags, for every head, its held rows in order (entries past a head's held count are
    ignored). The layer tracks positions from now on, so rolling an answer back stays exact although its tokens are
    no longer a uniform tail.
    """
    layer = cache.layers[layer_id]
    bsz, heads, _ = evicted.shape
    if not isinstance(layer, RaggedLayer):
        check_one_sequence(bsz)
        n_tokens = layer.keys.shape[2]
        keep = ~evicted[..., :n_tokens].to(layer.keys.device)
        cache.layers[layer_id] = RaggedLayer.from_dense(layer.keys, layer.values, keep, track_positions=True)
        return cache.layers[layer_id]
    flags = evicted.reshape(bsz * heads, -1)
    keep = torch.cat([~flags[segment, :length] for segment, length in enumerate(layer.head_lengths)])
    layer.track_positions()
    layer.compact(keep.to(layer.device))
    return layer


def take_scores(cache: Cache, layer_id: int) -> list[torch.Tensor] | None:
    """The gate scores a prefill left in layer ``layer_id``'s :data:`SCORES` column, per (sequence, head) in segment
    order (NaN for rows appended since), and drop the column: the caller keeps them from now on. ``None`` when the
    layer has none."""
    layer = cache.layers[layer_id]
    if not isinstance(layer, RaggedLayer) or not layer.has_column(SCORES):
        return None
    scores = [
        layer.column(SCORES, head, sequence).clone()
        for sequence in range(layer.batch_size)
        for head in range(layer.num_heads)
    ]
    layer.drop_column(SCORES)
    return scores
