"""What an eviction kept, and what the KV cache weighs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, PreTrainedModel

from fastkvzip_press.layout import ModelLayout


@dataclass
class EvictionStats:
    """Outcome of one prefill eviction.

    Attributes:
        context_length: T, tokens in the prefilled context.
        kept_per_head: ``{layer_id: LongTensor [B, H]}`` pairs retained by each gated layer's heads.
        entries_per_layer: ``B * H * T`` pairs per layer before eviction.
        num_layers: all decoder layers, gated or not (ungated layers keep everything).
    """

    context_length: int
    kept_per_head: dict[int, torch.Tensor]
    entries_per_layer: int
    num_layers: int

    @property
    def total_entries(self) -> int:
        return self.entries_per_layer * self.num_layers

    @property
    def gated_kept(self) -> int:
        """Pairs retained over the gated layers."""
        return sum(int(kept.sum()) for kept in self.kept_per_head.values())

    @property
    def kept_entries(self) -> int:
        """Pairs retained over all layers (ungated layers keep everything)."""
        ungated = self.num_layers - len(self.kept_per_head)
        return self.gated_kept + ungated * self.entries_per_layer

    @property
    def gated_entries(self) -> int:
        return self.entries_per_layer * len(self.kept_per_head)

    @property
    def compression_ratio(self) -> float:
        """Fraction of gated-layer pairs removed (kvpress convention)."""
        return 1.0 - self.gated_kept / self.gated_entries if self.gated_entries else 0.0


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes held by the keys and values of every layer of a transformers cache (physical storage).

    Ragged layers count their whole buffers, spare rows included (``RaggedLayer.nbytes``).
    """
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes()
            continue
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def full_cache_bytes(model: PreTrainedModel, n_tokens: int) -> int:
    """Bytes of an uncompressed dense KV cache of ``n_tokens`` tokens for ``model`` (keys and values, all layers)."""
    layout = ModelLayout.from_model(model)
    element = next(model.parameters()).element_size()
    return 2 * n_tokens * layout.num_layers * layout.num_kv_heads * layout.head_dim * element
