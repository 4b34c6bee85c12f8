"""Reading a ragged layer: what it shows as ``layer.keys`` / ``layer.values`` (the logical shape, prefix slicing only)
and its real accessors, one head's rows or dense copies."""

from __future__ import annotations

from typing import Any

import torch


class RaggedView:
    """Stand-in for ``layer.keys`` / ``layer.values``: logical shape ``[B, H, T, D]`` and prefix slicing.

    kvpress's pipeline rolls answers back with ``layer.keys = layer.keys[:, :, :n]``; a view sliced that way and
    assigned back truncates the layer to ``n`` logical tokens. Anything else raises with a pointer to the real
    accessors (:meth:`RaggedLayer.head_keys`, :meth:`RaggedLayer.to_padded`).
    """

    def __init__(self, layer: RaggedReads, length: int):
        self.layer = layer
        self.length = length

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.layer.batch_size, self.layer.num_heads, self.length, self.layer.head_dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.dtype

    @property
    def device(self) -> torch.device:
        return self.layer.device

    def __getitem__(self, index: Any) -> RaggedView:
        parts = list(index) if isinstance(index, tuple) else [index]
        if Ellipsis in parts:
            at = parts.index(Ellipsis)
            parts[at : at + 1] = [slice(None)] * (4 - len(parts) + 1)
        parts += [slice(None)] * (4 - len(parts))
        seq = parts[2]
        whole = all(part == slice(None) for i, part in enumerate(parts) if i != 2)
        if not whole or not isinstance(seq, slice) or seq.start not in (None, 0) or seq.step not in (None, 1):
            raise TypeError(
                "a ragged cache layer supports only prefix slices along the sequence, as in keys[:, :, :n]; "
                "use RaggedLayer.head_keys(h) or RaggedLayer.to_padded() to read its tensors"
            )
        stop = self.length if seq.stop is None else seq.stop
        stop = stop + self.length if stop < 0 else stop
        return RaggedView(self.layer, max(0, min(stop, self.length)))

    def __repr__(self) -> str:
        return f"RaggedView(shape={tuple(self.shape)}, dtype={self.dtype})"


class RaggedReads:
    """The read accessors of :class:`~fastkvzip_press.cache.RaggedLayer` (its buffers and segments are the layer's)."""

    def _rows(self, buffer: torch.Tensor, head: int, sequence: int) -> torch.Tensor:
        start, length = self.segment_bounds()[self.segment(head, sequence)]
        return buffer[start : start + length]

    def head_keys(self, head: int, sequence: int = 0) -> torch.Tensor:
        """Keys of one KV head, ``[lengths, D]`` (a view into the buffer)."""
        return self._rows(self.key_buffer, head, sequence)

    def head_values(self, head: int, sequence: int = 0) -> torch.Tensor:
        """Values of one KV head, ``[lengths, D]`` (a view into the buffer)."""
        return self._rows(self.value_buffer, head, sequence)

    def to_padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense copies for inspection: keys, values ``[B, H, max_len, D]`` (zero padded), mask ``[B, H, max_len]``."""
        max_len = max(self._lengths_host, default=0)
        shape = (self.batch_size, self.num_heads, max_len, self.head_dim)
        keys = self.key_buffer.new_zeros(shape)
        values = self.value_buffer.new_zeros(shape)
        mask = torch.zeros(shape[:3], dtype=torch.bool, device=self.device)
        for index, (start, length) in enumerate(self.segment_bounds()):
            sequence, head = divmod(index, self.num_heads)
            keys[sequence, head, :length] = self.key_buffer[start : start + length]
            values[sequence, head, :length] = self.value_buffer[start : start + length]
            mask[sequence, head, :length] = True
        return keys, values, mask
