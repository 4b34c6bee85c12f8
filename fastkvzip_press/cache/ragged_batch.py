"""transformers' batch cache API for a ragged layer (beam search, ``num_return_sequences``): reorder, select or repeat
whole sequences. Mixed into :class:`~fastkvzip_press.cache.RaggedLayer`."""

from __future__ import annotations

import torch

from fastkvzip_press.cache.host_read import LastHostRead

# Beam search reorders every layer with the same index tensor at every step: read it on the host once.
_last_order: LastHostRead[list[int]] = LastHostRead()


class RaggedBatch:
    """The batch methods of :class:`~fastkvzip_press.cache.RaggedLayer` (its buffers and segments are the layer's)."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence ``i`` becomes a copy of sequence ``beam_idx[i]``."""
        self._take_sequences(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the sequences ``indices``, in that order."""
        self._take_sequences(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every sequence ``repeats`` times in place (``num_return_sequences``, beams after the prefill)."""
        self._take_sequences(torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats))

    def _take_sequences(self, index: torch.Tensor) -> None:
        """Rebuild the layer from the sequences ``index [B']`` of this one (each segment with its spare rows).

        The index is read on the host once (beam search reorders every layer at every step); everything else the
        host needs is already there.
        """
        order = _last_order.get(index, None, lambda: index.reshape(-1).tolist()) if torch.is_tensor(index) else index
        if any(i < 0 or i >= self.batch_size for i in order):
            raise IndexError(f"sequence indices {order} outside the layer's {self.batch_size} sequences")
        heads = self.num_heads
        segments_host = [i * heads + h for i in order for h in range(heads)]
        capacities_host = [self._capacities_host[s] for s in segments_host]
        segments = torch.as_tensor(index, device=self.device).long().reshape(-1)
        segments = (segments[:, None] * heads + torch.arange(heads, device=self.device)).reshape(-1)
        capacities = self.capacities[segments]
        new_starts = capacities.cumsum(0) - capacities
        total = sum(capacities_host)
        offsets = torch.arange(total, device=self.device)
        rows = torch.repeat_interleave(self.starts[segments] - new_starts, capacities, output_size=total) + offsets
        self.key_buffer = self.key_buffer.index_select(0, rows)
        self.value_buffer = self.value_buffer.index_select(0, rows)
        self.columns = {name: column.index_select(0, rows) for name, column in self.columns.items()}
        self.starts, self.lengths, self.capacities = new_starts, self.lengths[segments], capacities
        self._lengths_host = [self._lengths_host[s] for s in segments_host]
        self._capacities_host = capacities_host
        self.pad_tokens = [self.pad_tokens[i] for i in order]
        self.batch_size = len(order)
