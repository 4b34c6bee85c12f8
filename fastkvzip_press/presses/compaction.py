"""How evicted pairs leave attention: one strategy object per compaction, chosen by a press's ``compaction`` field.

* :class:`RaggedCompaction` frees them: it hands decisions to :mod:`fastkvzip_press.cache.compaction`, which stores
  gated layers head by head, and switches the model to the ragged-aware attention.
* :class:`MaskedCompaction` is the kvpress-style reference: the cache keeps its full size and kvpress's attention patch
  masks the evicted keys. This module is the only writer of kvpress's ``module.masked_key_indices`` (also
  :func:`restore_masked_keys`, which puts a saved masked context's back; :func:`masked_keys` reads them to save).

Prefill presses call :meth:`~Compaction.evict_tail`; the decoding press asks :meth:`~Compaction.rows_before` what
each head holds and calls :meth:`~Compaction.evict_held`. Decisions are ``[B, H, N]`` bool masks of one layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Cache, PreTrainedModel

from fastkvzip_press.cache import compaction as cache_compaction
from fastkvzip_press.cache.attention import enable_ragged_attention
from fastkvzip_press.eviction import TailEviction
from fastkvzip_press.layout import decoder_layers


class Compaction:
    """Applies one layer's eviction decisions to a cache (and to the layer's attention module, for masking)."""

    name = ""
    drops_padding = False  # whether padding leaves the cache when a layer is first compacted

    def prepare(self, model: PreTrainedModel) -> None:
        """Set the model up before the first decision (called when a press is entered)."""

    def evict_tail(self, cache: Cache, module: nn.Module, layer_id: int, tail: TailEviction) -> None:
        """Prefill: apply one layer's decision over the undecided tails of its sequences (see
        :class:`~fastkvzip_press.eviction.TailEviction`)."""
        raise NotImplementedError

    def rows_before(self, cache: Cache, layer_id: int, n_new: int) -> list[int]:
        """Decoding: pairs each (sequence, head) held before this forward appended ``n_new`` tokens."""
        raise NotImplementedError

    def evict_held(
        self, cache: Cache, module: nn.Module, layer_id: int, evicted: torch.Tensor, padding: torch.Tensor | None
    ) -> None:
        """Decoding: ``evicted [B, H, N]`` flags, for every head, its held pairs in order; ``padding [B, N]`` marks
        the held pairs that are padding (only a dense layer holds any)."""
        raise NotImplementedError

    def inherited_scores(self, cache: Cache, layer_id: int) -> list[torch.Tensor] | None:
        """Gate scores a prefill press left with the layer's pairs (per head, in order), taken over by the caller."""
        return None

    def reset(self, modules: dict[int, nn.Module]) -> None:
        """Forget per-generation state before a new cache."""


class RaggedCompaction(Compaction):
    """Evicted pairs are freed: gated layers move to head-wise ragged storage."""

    name = "ragged"
    drops_padding = True

    def prepare(self, model: PreTrainedModel) -> None:
        enable_ragged_attention(model)

    def evict_tail(self, cache, module, layer_id, tail) -> None:
        cache_compaction.evict_from_tail(cache, layer_id, tail.evicted, tail.tail, tail.scores, tail.padding)

    def rows_before(self, cache, layer_id, n_new) -> list[int]:
        return [n - n_new for n in cache_compaction.held_rows(cache, layer_id)]

    def evict_held(self, cache, module, layer_id, evicted, padding) -> None:
        cache_compaction.evict_held(cache, layer_id, evicted, padding)

    def inherited_scores(self, cache, layer_id) -> list[torch.Tensor] | None:
        return cache_compaction.take_scores(cache, layer_id)


class MaskedCompaction(Compaction):
    """Evicted keys are masked by kvpress's attention patch; the cache keeps every pair (the reference path).

    For decoding it remembers, per gated layer, which logical positions are still attended (``[B, H, T]``).
    """

    name = "masked"

    def __init__(self) -> None:
        self._alive: dict[int, torch.Tensor] = {}

    def evict_tail(self, cache, module, layer_id, tail) -> None:
        n_tokens = tail.evicted.shape[-1]
        if any(t != n_tokens for t in tail.tail) or cache.layers[layer_id].keys.shape[2] != n_tokens:
            raise ValueError("masked compaction decides a whole dense prefill at once; chunked prefill needs 'ragged'")
        # Padding stays in the dense cache, masked by the attention mask as it was.
        module.masked_key_indices = torch.nonzero(tail.evicted, as_tuple=True)

    def rows_before(self, cache, layer_id, n_new) -> list[int]:
        bsz, heads, n_tokens = cache.layers[layer_id].keys.shape[:3]
        n_before = n_tokens - n_new
        alive = self._alive.get(layer_id)
        if alive is None:
            return [n_before] * (bsz * heads)
        alive = self._alive[layer_id] = alive[..., :n_before]  # a rollback forgets the decisions after it
        return (alive.sum(-1) + (n_before - alive.shape[-1])).reshape(-1).tolist()

    def evict_held(self, cache, module, layer_id, evicted, padding) -> None:
        bsz, heads, n_tokens = cache.layers[layer_id].keys.shape[:3]
        alive = self._alive.get(layer_id)
        if alive is None:
            alive = torch.ones(bsz, heads, 0, dtype=torch.bool, device=evicted.device)
        alive = torch.cat([alive, alive.new_ones(bsz, heads, n_tokens - alive.shape[-1])], dim=-1)
        for sequence in range(bsz):
            for head in range(heads):
                held = torch.nonzero(alive[sequence, head]).squeeze(1)
                alive[sequence, head, held[evicted[sequence, head, : held.shape[0]]]] = False
        self._alive[layer_id] = alive
        module.masked_key_indices = torch.nonzero(~alive, as_tuple=True)

    def reset(self, modules: dict[int, nn.Module]) -> None:
        self._alive.clear()
        for module in modules.values():
            module.masked_key_indices = None


COMPACTIONS: dict[str, type[Compaction]] = {"ragged": RaggedCompaction, "masked": MaskedCompaction}


def masked_keys(model: PreTrainedModel) -> dict[int, torch.Tensor]:
    """The masked keys kvpress's attention patch reads, per decoder layer that has any, as ``[3, K]`` int64 indices
    (sequence, head, position) on the CPU: a masked context's eviction, which lives on the attention modules."""
    masks = {}
    for index, layer in enumerate(decoder_layers(model)):
        indices = getattr(layer.self_attn, "masked_key_indices", None)
        if indices is not None:
            masks[index] = torch.stack([t.to("cpu", torch.int64) for t in indices])
    return masks


def restore_masked_keys(model: PreTrainedModel, masks: dict[int, torch.Tensor], device: torch.device | str) -> None:
    """Put a saved masked context's positions back on the attention modules (``masks``: decoder layer ->
    ``[3, K]`` indices, as :func:`masked_keys` gives them), moved to ``device``; other layers' stale ones are cleared.
    kvpress's attention patch reads them until the next prefill."""
    for index, layer in enumerate(decoder_layers(model)):
        if index in masks:
            layer.self_attn.masked_key_indices = tuple(row.to(device) for row in masks[index])
        elif getattr(layer.self_attn, "masked_key_indices", None) is not None:
            layer.self_attn.masked_key_indices = None


def make_compaction(name: str) -> Compaction:
    """A fresh strategy for ``compaction=name``, or a ValueError naming the choices."""
    if name not in COMPACTIONS:
        raise ValueError(f"compaction must be one of {tuple(COMPACTIONS)}, got {name!r}")
    return COMPACTIONS[name]()
