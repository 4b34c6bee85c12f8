"""Side columns of a ragged layer (``[M]`` each, laid out like its key and value buffers: gate scores, logical
positions) and the positions it tracks itself: mixed into :class:`~fastkvzip_press.cache.RaggedLayer`."""

from __future__ import annotations

import torch

POSITIONS = "positions"  # the side column of logical positions, maintained by the layer itself


class RaggedColumns:
    """The side-column methods of :class:`~fastkvzip_press.cache.RaggedLayer` (its buffers, segments and
    ``columns`` are the layer's)."""

    def add_column(self, name: str, per_row: torch.Tensor, fill: float) -> None:
        """Add a side column: ``per_row [sum(lengths)]`` holds a value for every retained row, segment after segment;
        spare rows read ``fill``, and so do rows appended later."""
        if name == POSITIONS:
            raise ValueError(f"{POSITIONS!r} is maintained by the layer; call track_positions()")
        n_rows = sum(self._lengths_host)
        if per_row.shape != (n_rows,):
            raise ValueError(f"column {name!r} needs one value per retained row ({n_rows}), got {tuple(per_row.shape)}")
        column = torch.full((self.key_buffer.shape[0],), fill, dtype=per_row.dtype, device=self.device)
        column[self._row_index()] = per_row.to(self.device)
        self.columns[name] = column
        self._fill[name] = fill

    def has_column(self, name: str) -> bool:
        return name in self.columns

    def column(self, name: str, head: int, sequence: int = 0) -> torch.Tensor:
        """Side column ``name`` of one KV head's retained rows, ``[lengths]`` (a view)."""
        if name not in self.columns:
            raise KeyError(f"this layer has no column {name!r}; it has {sorted(self.columns)}")
        return self._rows(self.columns[name], head, sequence)

    def drop_column(self, name: str) -> None:
        """Forget side column ``name`` (no-op when absent)."""
        self.columns.pop(name, None)
        self._fill.pop(name, None)

    def write_column_tail(self, name: str, values: torch.Tensor | list[torch.Tensor]) -> None:
        """Set column ``name`` of every segment's last retained rows: ``values [B, H, t]`` (the same ``t`` rows of
        each segment) or one tensor per segment, in segment order."""
        per_segment = list(values.reshape(-1, values.shape[-1])) if isinstance(values, torch.Tensor) else values
        index = [
            torch.arange(start + length - tail.shape[0], start + length, device=self.device)
            for (start, length), tail in zip(self.segment_bounds(), per_segment)
        ]
        if not index:
            return
        column = self.columns[name]
        column[torch.cat(index)] = torch.cat(list(per_segment)).to(device=self.device, dtype=column.dtype)

    def column_bytes(self) -> int:
        """Bytes of the side columns other than positions (annotations such as gate scores)."""
        return sum(column.nbytes for name, column in self.columns.items() if name != POSITIONS)

    def retained_rows(self) -> torch.Tensor:
        """Buffer row of every retained pair, segment after segment ``[sum(lengths)]`` (spare rows left out)."""
        return self._row_index()

    def column_fill(self, name: str) -> float:
        """The value a side column's spare (and so appended) rows hold."""
        return self._fill[name]

    def _row_index(self) -> torch.Tensor:
        """Buffer row of every retained row, segment after segment ``[sum(lengths)]``."""
        parts = [torch.arange(start, start + length, device=self.device) for start, length in self.segment_bounds()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=self.device)

    def track_positions(self) -> None:
        """Start recording every row's logical position (a no-op when already on).

        Rolling back to a logical length then drops exactly the rows at or after it, even when eviction made them no
        longer a uniform tail. The uniform tail (tokens appended to every segment since the last eviction) gets its
        true positions; older rows get -1, which keeps them through any rollback to a length after them.
        """
        if POSITIONS in self.columns:
            return
        positions = torch.full((self.key_buffer.shape[0],), -1, dtype=torch.int32, device=self.device)
        for start, length in self.segment_bounds():
            tail = min(self._uniform_tail, length)
            positions[start + length - tail : start + length] = torch.arange(
                self.logical_length - tail, self.logical_length, dtype=torch.int32, device=self.device
            )
        self.columns[POSITIONS] = positions
        self._fill[POSITIONS] = -1

    @property
    def tracks_positions(self) -> bool:
        return POSITIONS in self.columns

    def head_positions(self, head: int, sequence: int = 0) -> torch.Tensor:
        """Logical positions ``[lengths]`` of one head's rows (-1: held before tracking started)."""
        if POSITIONS not in self.columns:
            raise RuntimeError("this layer does not track positions; call track_positions() first")
        return self.column(POSITIONS, head, sequence)
