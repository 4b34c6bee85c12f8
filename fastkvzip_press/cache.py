"""Head-wise ragged KV cache layer: every KV head keeps its own number of tokens, and memory really shrinks.

Layout of one layer (batch size 1): keys and values are two buffers ``[M, D]``. KV head ``h`` owns the rows
``starts[h] : starts[h] + capacities[h]``; its first ``lengths[h]`` rows hold its retained tokens in their original
order, the rest is spare room for tokens appended later (questions, generated tokens). Appending therefore copies
only the new rows until a head runs out of spare room; then the layer is rebuilt once with fresh spare room.

The layer plugs into transformers' ``DynamicCache`` in place of a ``DynamicLayer``. It reports the *logical*
sequence length (every token ever appended, evicted or not) so that positions, ``cache_position`` and the masks of
dense layers stay what they would be without eviction. ``update`` returns the layer itself instead of key/value
tensors: only the attention function registered by :mod:`fastkvzip_press.attention` consumes it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from fastkvzip_press.triton import ragged_append, ragged_compact

DEFAULT_SPARE_TOKENS = 16


class RaggedView:
    """Stand-in for ``layer.keys`` / ``layer.values``: logical shape ``[1, H, T, D]`` and prefix slicing.

    kvpress's pipeline rolls answers back with ``layer.keys = layer.keys[:, :, :n]``; a view sliced that way and
    assigned back truncates the layer to ``n`` logical tokens. Anything else raises with a pointer to the real
    accessors (:meth:`RaggedLayer.head_keys`, :meth:`RaggedLayer.to_padded`).
    """

    def __init__(self, layer: RaggedLayer, length: int):
        self.layer = layer
        self.length = length

    @property
    def shape(self) -> torch.Size:
        return torch.Size((1, self.layer.num_heads, self.length, self.layer.head_dim))

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


class RaggedLayer(CacheLayerMixin):
    """One attention layer's KV cache stored head by head (batch size 1).

    Attributes:
        key_buffer, value_buffer: ``[M, D]``, all heads' rows (retained tokens and spare room).
        starts, lengths, capacities: ``[H]`` int64 on the buffers' device (segment start, used rows, owned rows).
        logical_length: tokens appended over the layer's life, evicted or not (what ``get_seq_length`` reports).
        spare_tokens: spare rows given to every head whenever the layer is (re)built.
        row_scores: per head, gate scores ``[lengths[h]]`` of the retained pairs when the press that built the
            layer knew them (:class:`~fastkvzip_press.FastKVzipPress` sets them for the decoding press), else None.
        position_buffer: ``[M]`` int32 logical position of every row, or None (the default: no overhead). Eviction
            during decoding turns it on (:meth:`track_positions`), so that rolling back to a logical length can drop
            exactly the rows at or after it even when they are no longer a uniform tail. Rows that were already held
            when tracking started and were not in the uniform tail read -1 (older than any rollback point).
    """

    is_sliding = False
    is_compileable = False

    def __init__(
        self,
        key_buffer: torch.Tensor,
        value_buffer: torch.Tensor,
        starts: torch.Tensor,
        lengths: torch.Tensor,
        capacities: torch.Tensor,
        logical_length: int,
        spare_tokens: int = DEFAULT_SPARE_TOKENS,
    ):
        self.is_initialized = True
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self.starts, self.lengths, self.capacities = starts, lengths, capacities
        self._lengths_host: list[int] = lengths.tolist()
        self._capacities_host: list[int] = capacities.tolist()
        self.logical_length = logical_length
        self.spare_tokens = spare_tokens
        # Tokens appended to every head since the last eviction: only these can be rolled back by truncation.
        self._uniform_tail = 0
        self.row_scores: list[torch.Tensor] | None = None
        self.position_buffer: torch.Tensor | None = None
        self.dtype, self.device = key_buffer.dtype, key_buffer.device

    # ------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_dense(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: torch.Tensor,
        spare_tokens: int = DEFAULT_SPARE_TOKENS,
        track_positions: bool = False,
    ) -> RaggedLayer:
        """Build from dense ``keys``/``values [1, H, T, D]`` keeping the pairs where ``keep [1, H, T]`` is True.

        ``track_positions`` also stores every row's logical position (see ``position_buffer``).
        """
        if keys.shape[0] != 1:
            raise ValueError(
                f"the ragged cache holds one sequence, got batch size {keys.shape[0]}; run one sequence at a time "
                "or use FastKVzipPress(compaction='masked') for batches"
            )
        _, heads, n_tokens, head_dim = keys.shape
        starts = torch.arange(heads, device=keys.device, dtype=torch.int64) * n_tokens
        lengths = torch.full((heads,), n_tokens, device=keys.device, dtype=torch.int64)
        flat_keys = keys[0].reshape(heads * n_tokens, head_dim)
        flat_values = values[0].reshape(heads * n_tokens, head_dim)
        rows = [flat_keys, flat_values]
        if track_positions:
            rows.append(torch.arange(n_tokens, device=keys.device, dtype=torch.int32).repeat(heads))
        packed = ragged_compact(rows, starts, lengths, keep.reshape(-1), spare=spare_tokens)
        key_buffer, value_buffer = packed.rows[:2]
        layer = cls(key_buffer, value_buffer, packed.starts, packed.lengths, packed.capacities, n_tokens, spare_tokens)
        layer.position_buffer = packed.rows[2] if track_positions else None
        return layer

    def track_positions(self) -> None:
        """Start recording every row's logical position (a no-op when already on).

        The uniform tail (tokens appended to every head since the last eviction) gets its true positions; older
        rows get -1, which keeps them through any rollback to a length after them.
        """
        if self.position_buffer is not None:
            return
        positions = torch.full((self.key_buffer.shape[0],), -1, dtype=torch.int32, device=self.device)
        for start, length in self.segment_bounds():
            tail = min(self._uniform_tail, length)
            positions[start + length - tail : start + length] = torch.arange(
                self.logical_length - tail, self.logical_length, dtype=torch.int32, device=self.device
            )
        self.position_buffer = positions

    def head_positions(self, head: int) -> torch.Tensor:
        """Logical positions ``[lengths[head]]`` of one head's rows (-1: held before tracking started)."""
        if self.position_buffer is None:
            raise RuntimeError("this layer does not track positions; call track_positions() first")
        start, length = self.segment_bounds()[head]
        return self.position_buffer[start : start + length]

    # ----------------------------------------------------------------------------------------------- geometry

    @property
    def num_heads(self) -> int:
        return len(self._lengths_host)

    @property
    def head_dim(self) -> int:
        return self.key_buffer.shape[-1]

    @property
    def head_lengths(self) -> list[int]:
        """Retained tokens of each KV head (host copy, no device sync)."""
        return list(self._lengths_host)

    def head_keys(self, head: int) -> torch.Tensor:
        """Keys of one KV head, ``[lengths[head], D]`` (a view into the buffer)."""
        start, length = self.segment_bounds()[head]
        return self.key_buffer[start : start + length]

    def head_values(self, head: int) -> torch.Tensor:
        """Values of one KV head, ``[lengths[head], D]`` (a view into the buffer)."""
        start, length = self.segment_bounds()[head]
        return self.value_buffer[start : start + length]

    def segment_bounds(self) -> list[tuple[int, int]]:
        """``(start, length)`` of every head's retained rows, read from host copies (no device sync)."""
        bounds, start = [], 0
        for length, capacity in zip(self._lengths_host, self._capacities_host):
            bounds.append((start, length))
            start += capacity
        return bounds

    def to_padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense copies for inspection: keys, values ``[1, H, max_len, D]`` (zero padded), mask ``[1, H, max_len]``."""
        max_len = max(self._lengths_host, default=0)
        shape = (1, self.num_heads, max_len, self.head_dim)
        keys = self.key_buffer.new_zeros(shape)
        values = self.value_buffer.new_zeros(shape)
        mask = torch.zeros(shape[:3], dtype=torch.bool, device=self.device)
        for head, (start, length) in enumerate(self.segment_bounds()):
            keys[0, head, :length] = self.key_buffer[start : start + length]
            values[0, head, :length] = self.value_buffer[start : start + length]
            mask[0, head, :length] = True
        return keys, values, mask

    # --------------------------------------------------------------------------------------------- accounting

    def nbytes(self) -> int:
        """Bytes the layer holds: both buffers, spare rows included, plus its index tensors."""
        index_bytes = sum(t.numel() * t.element_size() for t in (self.starts, self.lengths, self.capacities))
        if self.position_buffer is not None:
            index_bytes += self.position_buffer.nbytes
        return self.key_buffer.nbytes + self.value_buffer.nbytes + index_bytes

    def used_bytes(self) -> int:
        """Bytes of the retained keys and values only."""
        row_bytes = self.head_dim * self.key_buffer.element_size() * 2
        return sum(self._lengths_host) * row_bytes

    def spare_bytes(self) -> int:
        """Bytes of the spare rows (room for appended tokens)."""
        row_bytes = self.head_dim * self.key_buffer.element_size() * 2
        return (sum(self._capacities_host) - sum(self._lengths_host)) * row_bytes

    # ----------------------------------------------------------------------------------------- cache contract

    @property
    def keys(self) -> RaggedView:
        return RaggedView(self, self.logical_length)

    @keys.setter
    def keys(self, view: RaggedView | None) -> None:
        self._assign(view)

    @property
    def values(self) -> RaggedView:
        return RaggedView(self, self.logical_length)

    @values.setter
    def values(self, view: RaggedView | None) -> None:
        self._assign(view)

    def _assign(self, view: RaggedView | None) -> None:
        if view is None and not getattr(self, "is_initialized", False):
            return  # CacheLayerMixin.__init__ resets the attributes
        if isinstance(view, RaggedView) and view.layer is self:
            self.truncate(view.length)
            return
        raise TypeError(
            "a ragged cache layer's keys/values cannot be replaced by tensors; build a new RaggedLayer instead"
        )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a RaggedLayer is built initialised (RaggedLayer.from_dense)")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[RaggedLayer, RaggedLayer]:
        """Append ``key_states``/``value_states [1, H, t, D]`` at the end of every head's segment.

        Returns the layer twice in place of key/value tensors; the ragged attention function reads it.
        """
        self.append(key_states, value_states)
        return self, self

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write ``[1, H, t, D]`` new keys and values after each head's retained tokens."""
        if key_states.shape[0] != 1:
            raise ValueError(f"the ragged cache holds one sequence, got batch size {key_states.shape[0]}")
        n_new = key_states.shape[2]
        if any(length + n_new > capacity for length, capacity in zip(self._lengths_host, self._capacities_host)):
            self._rebuild(spare=n_new + self.spare_tokens)
        ragged_append(self.key_buffer, self.starts, self.lengths, key_states[0].to(self.dtype))
        ragged_append(self.value_buffer, self.starts, self.lengths, value_states[0].to(self.dtype))
        if self.position_buffer is not None:
            new_positions = torch.arange(
                self.logical_length, self.logical_length + n_new, dtype=torch.int32, device=self.device
            )
            new_positions = new_positions.expand(self.num_heads, -1).contiguous()
            ragged_append(self.position_buffer, self.starts, self.lengths, new_positions)
        self.lengths += n_new
        self._lengths_host = [length + n_new for length in self._lengths_host]
        self.logical_length += n_new
        self._uniform_tail += n_new

    def _rebuild(self, spare: int) -> None:
        """Copy every retained token into fresh buffers with ``spare`` free rows per head."""
        keep_all = torch.ones(sum(self._lengths_host), dtype=torch.bool, device=self.device)
        self._replace(keep_all, spare=spare)

    def compact(self, keep: torch.Tensor, side_rows: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Drop tokens: ``keep [sum(lengths)]`` flags every retained row, head after head, in order.

        ``side_rows`` (per-token data laid out like the buffers, e.g. scores ``[M]``) are compacted alongside and
        returned.
        """
        side = self._replace(keep, spare=self.spare_tokens, side_rows=side_rows or [])
        self._uniform_tail = 0
        return side

    def _replace(self, keep: torch.Tensor, spare: int, side_rows: list[torch.Tensor] = ()) -> list[torch.Tensor]:
        positions = [] if self.position_buffer is None else [self.position_buffer]
        packed = ragged_compact(
            [self.key_buffer, self.value_buffer, *positions, *side_rows], self.starts, self.lengths, keep, spare=spare
        )
        self.key_buffer, self.value_buffer, *side = packed.rows
        if positions:
            self.position_buffer, *side = side
        self.starts, self.lengths, self.capacities = packed.starts, packed.lengths, packed.capacities
        self._lengths_host = packed.lengths.tolist()
        self._capacities_host = packed.capacities.tolist()
        return side

    def truncate(self, length: int) -> None:
        """Roll back to ``length`` logical tokens by dropping the most recent appended tokens of every head."""
        n_drop = self.logical_length - length
        if n_drop <= 0:
            return
        if n_drop > self._uniform_tail:
            if self.position_buffer is None:
                raise ValueError(
                    f"cannot roll back {n_drop} tokens: only the {self._uniform_tail} tokens appended since the last "
                    "eviction are still held by every head, and this layer does not track positions"
                )
            # Eviction during decoding mixed the rolled-back tokens into the heads: drop them by position.
            keep = torch.cat([self.head_positions(h) < length for h in range(self.num_heads)])
            self._replace(keep, spare=self.spare_tokens)
            self.logical_length = length
            self._uniform_tail = 0
            return
        self.lengths -= n_drop
        self._lengths_host = [length - n_drop for length in self._lengths_host]
        self.logical_length = length
        self._uniform_tail -= n_drop
        # Rolled-back answers leave their rows behind as spare; give them back (one copy per rollback).
        if max(c - n for c, n in zip(self._capacities_host, self._lengths_host)) > 2 * self.spare_tokens:
            self._rebuild(spare=self.spare_tokens)

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.logical_length + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        self.truncate(self.logical_length + max_length if max_length < 0 else max_length)

    def offload(self) -> None:
        self.key_buffer = self.key_buffer.to("cpu", non_blocking=True)
        self.value_buffer = self.value_buffer.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        if self.key_buffer.device != self.device:
            self.key_buffer = self.key_buffer.to(self.device, non_blocking=True)
            self.value_buffer = self.value_buffer.to(self.device, non_blocking=True)

    def reset(self) -> None:
        self.lengths.zero_()
        self._lengths_host = [0] * self.num_heads
        self.logical_length = 0
        self._uniform_tail = 0

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            "beam search and batch expansion are not supported on a ragged cache layer; "
            "use FastKVzipPress(compaction='masked') for them"
        )

    reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported

    def __repr__(self) -> str:
        return (
            f"RaggedLayer(heads={self.num_heads}, lengths={self._lengths_host}, logical={self.logical_length}, "
            f"dtype={self.dtype})"
        )


def ragged_layer_ids(cache: Cache) -> list[int]:
    """Indices of the cache's layers that are ragged."""
    return [i for i, layer in enumerate(cache.layers) if isinstance(layer, RaggedLayer)]
