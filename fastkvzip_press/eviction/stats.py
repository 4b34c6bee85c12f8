"""What a prefill eviction kept, and the summaries the command line and the reports print from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EvictionStats:
    """Outcome of one prefill eviction.

    Attributes:
        context_length: T, positions of the prefilled context (padding included for a padded batch).
        kept_per_head: ``{layer_id: LongTensor [B, H]}`` pairs retained by each gated layer's heads.
        pairs_per_layer: pairs per layer before eviction, padding excluded (``H * T`` per sequence).
        num_layers: all decoder layers, gated or not (ungated layers keep everything).
        sequence_lengths: each sequence's own tokens (``T`` minus its padding); ``None``: all ``T``.
        attention_path: the attention the cache's ragged layers get (``"varlen"``, or ``"per-segment (<why>)"``);
            ``None`` when nothing is stored ragged (masked compaction).
    """

    context_length: int
    kept_per_head: dict[int, torch.Tensor]
    pairs_per_layer: int
    num_layers: int
    sequence_lengths: list[int] | None = None
    attention_path: str | None = None

    @property
    def total_pairs(self) -> int:
        """Pairs of the full cache, over all layers."""
        return self.pairs_per_layer * self.num_layers

    @property
    def gated_pairs(self) -> int:
        """Pairs of the full cache, over the gated layers."""
        return self.pairs_per_layer * len(self.kept_per_head)

    @property
    def gated_kept(self) -> int:
        """Pairs retained over the gated layers."""
        return sum(int(kept.sum()) for kept in self.kept_per_head.values())

    @property
    def kept_pairs(self) -> int:
        """Pairs retained over all layers (ungated layers keep everything)."""
        ungated = self.num_layers - len(self.kept_per_head)
        return self.gated_kept + ungated * self.pairs_per_layer

    @property
    def kept_fraction(self) -> float:
        """Pairs retained over the full cache's pairs, all layers."""
        return self.kept_pairs / self.total_pairs if self.total_pairs else 1.0

    @property
    def compression_ratio(self) -> float:
        """Fraction of gated-layer pairs removed (kvpress convention)."""
        return 1.0 - self.gated_kept / self.gated_pairs if self.gated_pairs else 0.0

    def head_retention(self) -> torch.Tensor:
        """Fraction of its sequence's tokens each (gated layer, sequence, KV head) retained, ``[L, B, H]`` float."""
        kept = torch.stack([kept.float() for kept in self.kept_per_head.values()])
        if self.sequence_lengths is None:
            return kept / self.context_length
        lengths = torch.tensor(self.sequence_lengths, dtype=torch.float32, device=kept.device)
        return kept / lengths.view(1, -1, 1)

    # Names before v0.5 ("entries" for pairs).
    entries_per_layer = property(lambda self: self.pairs_per_layer)
    total_entries = property(lambda self: self.total_pairs)
    gated_entries = property(lambda self: self.gated_pairs)
    kept_entries = property(lambda self: self.kept_pairs)
