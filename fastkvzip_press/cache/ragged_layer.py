"""Head-wise ragged KV cache layer: every KV head keeps its own number of tokens, and memory really shrinks.

Layout of one layer: keys and values are two buffers ``[M, D]``. Segment ``s = b * H + h`` belongs to KV head ``h`` of
sequence ``b`` and owns the rows ``starts[s] : starts[s] + capacities[s]``; its first ``lengths[s]`` rows hold its
retained tokens in their original order, the rest is spare room for tokens appended later (questions, generated
tokens). Appending therefore copies only the new rows until a segment runs out of spare room; then the layer is rebuilt
once with fresh spare room: for decoding steps, room in proportion to what the segments hold (:data:`GROWTH`), so
that a long answer costs a bounded copy per token instead of one that grows with the context. Side columns (``[M]``
each: logical positions, gate scores, ...) share the layout and are compacted, appended and rolled back with the rows.

The layer plugs into transformers' ``DynamicCache`` in place of a ``DynamicLayer``. It reports the *logical*
sequence length (every token ever appended, evicted or not) so that positions, ``cache_position`` and the masks of
dense layers stay what they would be without eviction. ``update`` returns the layer itself instead of key/value
tensors: only the attention function registered by :mod:`fastkvzip_press.cache.attention` consumes it.

A batch holds B sequences: padding is never stored, each sequence counts the padding it had (``pad_tokens``) so its
own length is known, and transformers' batch cache API (beam search, ``num_return_sequences``) reorders, selects or
repeats whole sequences.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from fastkvzip_press.cache.ragged_batch import RaggedBatch
from fastkvzip_press.cache.ragged_columns import POSITIONS, RaggedColumns
from fastkvzip_press.cache.ragged_view import RaggedReads, RaggedView
from fastkvzip_press.triton import ragged_append, ragged_compact

DEFAULT_SPARE_TOKENS = 16
# Spare rows given to every segment when decoding steps fill a segment: this fraction of a segment's mean length
# (at least ``spare_tokens``). A rebuild copies every retained row, so room proportional to them makes its cost per
# appended token constant (about 1 / GROWTH rows per segment), for at most GROWTH more memory until the next
# eviction; with fixed room the copies per token grew with the context (at 8k tokens: about 9 % of a decoding step).
GROWTH = 1 / 8


class RaggedLayer(RaggedReads, RaggedColumns, RaggedBatch, CacheLayerMixin):
    """One attention layer's KV cache stored head by head: storage only.

    Attributes:
        key_buffer, value_buffer: ``[M, D]``, all segments' rows (retained tokens and spare room).
        starts, lengths, capacities: ``[B * H]`` int64 on the buffers' device (segment start, used rows, owned rows).
        logical_length: tokens appended over the layer's life, evicted or not, padding included (what
            ``get_seq_length`` reports: the batch's common length).
        pad_tokens: per sequence, padding positions of its logical length (never stored).
        spare_tokens: spare rows given to every segment whenever the layer is (re)built.
        columns: side columns ``{name: [M]}`` laid out like the buffers; spare rows, hence appended rows, hold the
            column's fill value, except in :data:`POSITIONS` (see :meth:`track_positions`), where each new row gets
            its logical position.
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
        batch_size: int = 1,
        pad_tokens: list[int] | None = None,
    ):
        if starts.shape[0] % batch_size:
            raise ValueError(f"{starts.shape[0]} segments do not split into {batch_size} sequences")
        if pad_tokens is not None and len(pad_tokens) != batch_size:
            raise ValueError(f"pad_tokens needs one count per sequence ({batch_size}), got {pad_tokens}")
        self.is_initialized = True
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self.starts, self.lengths, self.capacities = starts, lengths, capacities
        self._lengths_host: list[int] = lengths.tolist()
        self._capacities_host: list[int] = capacities.tolist()
        self.logical_length = logical_length
        self.spare_tokens = spare_tokens
        self.batch_size = batch_size
        self.pad_tokens: list[int] = list(pad_tokens) if pad_tokens is not None else [0] * batch_size
        self.columns: dict[str, torch.Tensor] = {}
        self._fill: dict[str, float] = {}
        # Tokens appended to every segment since the last eviction: only these can be rolled back by truncation.
        self._uniform_tail = 0
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
        columns: dict[str, tuple[torch.Tensor, float]] | None = None,
        pad_tokens: list[int] | None = None,
    ) -> RaggedLayer:
        """Build from dense ``keys``/``values [B, H, T, D]`` keeping the pairs where ``keep [B, H, T]`` is True.

        ``track_positions`` also stores every row's logical position. ``columns`` adds side columns
        ``{name: (values [B, H, T], fill)}``, compacted in the same call as keys and values. ``pad_tokens`` counts each
        sequence's padding among the ``T`` positions (its ``keep`` is False there).
        """
        bsz, heads, n_tokens, head_dim = keys.shape
        n_segments = bsz * heads
        starts = torch.arange(n_segments, device=keys.device, dtype=torch.int64) * n_tokens
        lengths = torch.full((n_segments,), n_tokens, device=keys.device, dtype=torch.int64)
        names, fills = [], []
        rows = [keys.reshape(n_segments * n_tokens, head_dim), values.reshape(n_segments * n_tokens, head_dim)]
        if track_positions:
            names.append(POSITIONS)
            fills.append(-1)
            rows.append(torch.arange(n_tokens, device=keys.device, dtype=torch.int32).repeat(n_segments))
        for name, (column, fill) in (columns or {}).items():
            names.append(name)
            fills.append(fill)
            rows.append(column.reshape(n_segments * n_tokens).to(keys.device))
        packed = ragged_compact(rows, starts, lengths, keep.reshape(-1), spare=spare_tokens)
        key_buffer, value_buffer, *side = packed.rows
        layer = cls(
            key_buffer,
            value_buffer,
            packed.starts,
            packed.lengths,
            packed.capacities,
            n_tokens,
            spare_tokens,
            batch_size=bsz,
            pad_tokens=pad_tokens,
        )
        for name, fill, column in zip(names, fills, side):
            layer.columns[name] = column
            layer._fill[name] = fill
        layer._fill_spare_rows()
        return layer

    # ----------------------------------------------------------------------------------------------- geometry

    @property
    def num_heads(self) -> int:
        return len(self._lengths_host) // self.batch_size

    @property
    def shape(self) -> torch.Size:
        """The logical shape ``[B, H, T, D]`` (``T``: tokens appended over the layer's life). Attention wrappers
        that read ``key.shape`` (kvpress's masking patch, when it wraps the ragged attention) see the full length."""
        return torch.Size((self.batch_size, self.num_heads, self.logical_length, self.head_dim))

    @property
    def sequence_lengths(self) -> list[int]:
        """Each sequence's own logical length: its tokens appended over the layer's life, padding excluded."""
        return [self.logical_length - pad for pad in self.pad_tokens]

    @property
    def head_dim(self) -> int:
        return self.key_buffer.shape[-1]

    @property
    def head_lengths(self) -> list[int]:
        """Retained tokens of each segment (sequence-major, then KV head; host copy, no device sync)."""
        return list(self._lengths_host)

    @property
    def head_capacities(self) -> list[int]:
        """Rows each segment owns, retained tokens plus spare room (host copy, no device sync)."""
        return list(self._capacities_host)

    def segment(self, head: int, sequence: int = 0) -> int:
        """Index of the segment of KV head ``head`` of sequence ``sequence``."""
        return sequence * self.num_heads + head

    def segment_bounds(self) -> list[tuple[int, int]]:
        """``(start, length)`` of every segment's retained rows, read from host copies (no device sync)."""
        bounds, start = [], 0
        for length, capacity in zip(self._lengths_host, self._capacities_host):
            bounds.append((start, length))
            start += capacity
        return bounds

    # --------------------------------------------------------------------------------------------- accounting

    def nbytes(self) -> int:
        """Bytes the layer holds for attention and rollback: both buffers, spare rows included, the segment index
        and, when tracked, the positions. Annotation columns are counted by :meth:`column_bytes`."""
        index_bytes = sum(t.numel() * t.element_size() for t in (self.starts, self.lengths, self.capacities))
        if POSITIONS in self.columns:
            index_bytes += self.columns[POSITIONS].nbytes
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

    def _view(self) -> RaggedView:
        return RaggedView(self, self.logical_length)

    def _assign(self, view: RaggedView | None) -> None:
        if view is None and not getattr(self, "is_initialized", False):
            return  # CacheLayerMixin.__init__ resets the attributes
        if isinstance(view, RaggedView) and view.layer is self:
            self.truncate(view.length)
            return
        raise TypeError(
            "a ragged cache layer's keys/values cannot be replaced by tensors; build a new RaggedLayer instead"
        )

    # ``layer.keys`` / ``layer.values``: the logical view; assigning a prefix of it back rolls the layer back.
    keys = values = property(_view, _assign)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a RaggedLayer is built initialised (RaggedLayer.from_dense)")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[RaggedLayer, RaggedLayer]:
        """Append ``key_states``/``value_states [B, H, t, D]`` at the end of every segment.

        Returns the layer twice in place of key/value tensors; the ragged attention function reads it.
        """
        self.append(key_states, value_states)
        return self, self

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write ``[B, H, t, D]`` new keys and values after each segment's retained tokens."""
        if key_states.shape[0] != self.batch_size:
            raise ValueError(
                f"this ragged cache layer holds {self.batch_size} sequence(s), got batch size {key_states.shape[0]}"
            )
        n_new = key_states.shape[2]
        if any(length + n_new > capacity for length, capacity in zip(self._lengths_host, self._capacities_host)):
            self._rebuild(spare=n_new + self._room_after(n_new))
        n_segments = len(self._lengths_host)
        buffers = [self.key_buffer, self.value_buffer]
        # At decoding every op counts (a small model's step is mostly per-call overhead): convert only if needed.
        rows = [
            new.reshape(n_segments, n_new, -1)
            if new.dtype == self.dtype
            else new.reshape(n_segments, n_new, -1).to(self.dtype)
            for new in (key_states, value_states)
        ]
        if POSITIONS in self.columns:  # other columns need no write: their spare rows already hold their fill value
            fresh = torch.arange(
                self.logical_length, self.logical_length + n_new, dtype=torch.int32, device=self.device
            )
            buffers.append(self.columns[POSITIONS])
            rows.append(fresh.expand(n_segments, -1).contiguous())
        ragged_append(buffers, self.starts, self.lengths, rows)
        self.lengths += n_new
        self._lengths_host = [length + n_new for length in self._lengths_host]
        self.logical_length += n_new
        self._uniform_tail += n_new

    def _room_after(self, n_new: int) -> int:
        """Spare rows per segment a rebuild for an append of ``n_new`` tokens leaves after them."""
        if n_new > self.spare_tokens:  # a question or a prefill chunk: evicted or answered right after, not grown
            return self.spare_tokens
        mean_length = sum(self._lengths_host) / max(len(self._lengths_host), 1)
        return max(self.spare_tokens, math.ceil(GROWTH * mean_length))

    def _rebuild(self, spare: int) -> None:
        """Copy every retained token into fresh buffers with ``spare`` free rows per segment."""
        keep_all = torch.ones(sum(self._lengths_host), dtype=torch.bool, device=self.device)
        self._replace(keep_all, spare=spare)

    def compact(self, keep: torch.Tensor) -> None:
        """Drop tokens: ``keep [sum(lengths)]`` flags every retained row, segment after segment, in order. Side columns
        are compacted in the same call."""
        self._replace(keep, spare=self.spare_tokens)
        self._uniform_tail = 0

    def _replace(self, keep: torch.Tensor, spare: int) -> None:
        names = list(self.columns)
        packed = ragged_compact(
            [self.key_buffer, self.value_buffer, *self.columns.values()], self.starts, self.lengths, keep, spare=spare
        )
        self.key_buffer, self.value_buffer, *side = packed.rows
        self.columns = dict(zip(names, side))
        self.starts, self.lengths, self.capacities = packed.starts, packed.lengths, packed.capacities
        self._lengths_host = list(packed.host_lengths)  # read by the compaction's one host synchronisation
        self._capacities_host = [length + spare for length in packed.host_lengths]
        self._fill_spare_rows()

    def _fill_spare_rows(self) -> None:
        """Write each side column's fill value into its spare rows (compaction leaves zeros there), so that appending
        never writes the columns filled by value: a row appended later already reads the fill value."""
        filled = [name for name in self.columns if name != POSITIONS]
        if not filled:
            return
        segment = torch.repeat_interleave(
            torch.arange(len(self._capacities_host), device=self.device),
            self.capacities,
            output_size=self.key_buffer.shape[0],
        )
        spare = (
            torch.arange(self.key_buffer.shape[0], device=self.device) - self.starts[segment] >= self.lengths[segment]
        )
        for name in filled:
            self.columns[name].masked_fill_(spare, self._fill[name])

    def truncate(self, length: int) -> None:
        """Roll back to ``length`` logical tokens by dropping the most recent appended tokens of every segment."""
        n_drop = self.logical_length - length
        if n_drop <= 0:
            return
        if n_drop > self._uniform_tail:
            if POSITIONS not in self.columns:
                raise ValueError(
                    f"cannot roll back {n_drop} tokens: only the {self._uniform_tail} tokens appended since the last "
                    "eviction are still held by every head, and this layer does not track positions"
                )
            # Eviction during decoding mixed the rolled-back tokens into the heads: drop them by position.
            self._replace(self.columns[POSITIONS][self._row_index()] < length, spare=self.spare_tokens)
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

    def get_mask_sizes(self, cache_position: torch.Tensor | int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the mask of the next queries: transformers < 5.3 passes their cache
        positions, later releases their number."""
        query_length = cache_position if isinstance(cache_position, int) else cache_position.shape[0]
        return self.logical_length + query_length, 0

    def get_max_cache_shape(self) -> int:
        return -1

    def get_max_length(self) -> int:
        """No maximum (transformers >= 5.19 names :meth:`get_max_cache_shape` so)."""
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
        self._lengths_host = [0] * len(self._lengths_host)
        self.logical_length = 0
        self._uniform_tail = 0

    def __repr__(self) -> str:
        return (
            f"RaggedLayer(sequences={self.batch_size}, heads={self.num_heads}, lengths={self._lengths_host}, "
            f"logical={self.logical_length}, dtype={self.dtype})"
        )
