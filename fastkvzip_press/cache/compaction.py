"""Applying an eviction decision to a transformers cache: the only code that replaces ``cache.layers[i]``.

A dense layer (transformers' ``DynamicLayer``) becomes a :class:`~fastkvzip_press.cache.ragged_layer.RaggedLayer`
without the evicted pairs; a ragged layer is compacted in place. Rollback is the layer's own ``truncate``. A cache
read back from a file gets its ragged layers through :func:`replace_layer`.
"""

from __future__ import annotations

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from fastkvzip_press.cache.ragged_layer import RaggedLayer

SCORES = "scores"  # the side column of gate scores, kept for a press that evicts again later (decoding)


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
    tail: int | list[int],
    scores: torch.Tensor | None = None,
    padding: torch.Tensor | None = None,
) -> RaggedLayer:
    """Evict from the undecided tails of one layer (prefill, in one pass or chunk by chunk) and store it ragged.

    The last ``tail[b]`` rows of every segment of sequence ``b`` are undecided; they match the last ``tail[b]``
    columns of ``evicted [B, H, P]``, which flags the pairs to evict (earlier rows stay). ``padding [B, P]`` marks
    padding in the same columns: dropped as well, and counted in the layer's ``pad_tokens``. ``scores [B, H, P]``, the
    gate scores of the same columns, go to the layer's :data:`SCORES` column with the rows they belong to. A dense
    layer (nothing decided yet, so all its tokens are the tail) becomes a :class:`RaggedLayer`.
    """
    layer = cache.layers[layer_id]
    bsz, heads, n_columns = evicted.shape
    tails = [tail] * bsz if isinstance(tail, int) else list(tail)
    dropped = evicted if padding is None else evicted | padding[:, None, :].to(evicted.device)
    n_pad = [0] * bsz
    if padding is not None:
        n_pad = [int(padding[b, n_columns - tails[b] :].sum()) for b in range(bsz)]
    if not isinstance(layer, RaggedLayer):
        if layer.keys.shape[2] != n_columns or any(t != n_columns for t in tails):
            raise RuntimeError(f"layer {layer_id}: a dense cache of {layer.keys.shape[2]} tokens, tails {tails}")
        columns = None if scores is None else {SCORES: (scores.float(), float("nan"))}
        cache.layers[layer_id] = RaggedLayer.from_dense(
            layer.keys, layer.values, ~dropped, columns=columns, pad_tokens=n_pad
        )
        return cache.layers[layer_id]
    segment_tails = [tails[segment // heads] for segment in range(bsz * heads)]
    if scores is not None:
        if not layer.has_column(SCORES):
            layer.add_column(SCORES, torch.full((sum(layer.head_lengths),), float("nan")), float("nan"))
        flat_scores = scores.reshape(bsz * heads, n_columns)
        layer.write_column_tail(SCORES, [row[n_columns - t :] for row, t in zip(flat_scores, segment_tails)])
    keep_columns = ~dropped.reshape(bsz * heads, n_columns)
    keep = torch.cat(
        [
            torch.cat([torch.ones(length - t, dtype=torch.bool, device=evicted.device), flags[n_columns - t :]])
            for length, t, flags in zip(layer.head_lengths, segment_tails, keep_columns)
        ]
    )
    layer.compact(keep.to(layer.device))
    layer.pad_tokens = [before + now for before, now in zip(layer.pad_tokens, n_pad)]
    return layer


def evict_held(cache: Cache, layer_id: int, evicted: torch.Tensor, padding: torch.Tensor | None = None) -> RaggedLayer:
    """Evict among all the rows each head holds (decoding) and store the layer ragged.

    ``evicted [B, H, N]`` flags, for every head, its held rows in order (entries past a head's held count are
    ignored). ``padding [B, T]`` marks the padding of a dense layer's tokens, dropped as it becomes ragged (a ragged
    layer holds none). The layer tracks positions from now on, so rolling an answer back stays exact although its
    tokens are no longer a uniform tail.
    """
    layer = cache.layers[layer_id]
    bsz, heads, _ = evicted.shape
    if not isinstance(layer, RaggedLayer):
        n_tokens = layer.keys.shape[2]
        keep = ~evicted[..., :n_tokens].to(layer.keys.device)
        if padding is not None:
            keep &= ~padding[:, None, :n_tokens].to(keep.device)
        n_pad = [0] * bsz if padding is None else padding[:, :n_tokens].sum(-1).tolist()
        cache.layers[layer_id] = RaggedLayer.from_dense(
            layer.keys, layer.values, keep, track_positions=True, pad_tokens=n_pad
        )
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


def replace_layer(cache: Cache, layer_id: int, layer: CacheLayerMixin) -> None:
    """Put ``layer`` in place of ``cache.layers[layer_id]`` (a cache restored from a file)."""
    cache.layers[layer_id] = layer


def keep_first_tokens(cache: Cache, length: int) -> None:
    """Cut every dense layer of ``cache`` to its first ``length`` tokens (a replayed chunk dropped again)."""
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


class Rollback:
    """Puts a cache back to the context it held when made: each layer cropped, sliding-window layers restored."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.length = cache.get_seq_length()
        self.sliding = {
            i: (layer.keys, layer.values, layer.cumulative_length)
            for i, layer in enumerate(cache.layers)
            if getattr(layer, "is_sliding", False)
        }

    def __call__(self) -> None:
        for index, layer in enumerate(self.cache.layers):
            if index in self.sliding:
                layer.keys, layer.values, layer.cumulative_length = self.sliding[index]
            else:
                layer.crop(self.length)
