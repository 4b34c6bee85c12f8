"""Reading feature shards back for the fit: one gated layer at a time from memory-mapped shards (:class:`ShardSet`),
so the fit's memory is one layer's features, not the whole set's; all of them in memory (:func:`load_split`, the
reference); and the split of windows into training and validation by document."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from fastkvzip_press.training.features import UNREADABLE, read_shard_metadata, unreadable_shard

logger = logging.getLogger(__name__)


@dataclass
class LayerFeatures:
    """One gated layer's features: ``hidden [N, D]`` gate inputs (bf16 as stored), ``scores [H, N]`` fp32 targets."""

    hidden: torch.Tensor
    scores: torch.Tensor

    def to(self, device: torch.device | str) -> LayerFeatures:
        return LayerFeatures(self.hidden.to(device), self.scores.to(device))


class LayerSource(Protocol):
    """Features of one split that the fit reads one gated layer at a time (:class:`ShardSet`, :class:`FeatureSplit`)."""

    @property
    def num_tokens(self) -> int: ...

    @property
    def documents(self) -> list[str]: ...

    def layer(self, index: int, max_tokens: int | None = None) -> LayerFeatures:
        """Features of the ``index``-th gated layer, the first ``max_tokens`` tokens (all by default)."""
        ...


@dataclass
class FeatureSplit:
    """Features of one split held in memory, every layer at once: ``hidden [L_g, N, D]`` bf16, ``scores [L_g, H, N]``
    fp32. Fine for small sets and tests; :class:`ShardSet` reads the same shards one layer at a time."""

    hidden: torch.Tensor
    scores: torch.Tensor
    documents: list[str]

    @property
    def num_tokens(self) -> int:
        return self.scores.shape[-1]

    def layer(self, index: int, max_tokens: int | None = None) -> LayerFeatures:
        return LayerFeatures(self.hidden[index, :max_tokens], self.scores[index, :, :max_tokens])


def load_split(paths: list[Path]) -> FeatureSplit:
    """Concatenate shards along the token axis, all layers in memory (see :class:`ShardSet` for large sets)."""
    hidden, scores, documents = [], [], []
    for path in paths:
        try:  # one open per shard: tensors and metadata together
            with safe_open(str(path), framework="pt") as handle:
                hidden.append(handle.get_tensor("hidden"))
                scores.append(handle.get_tensor("scores"))
                documents.append(json.loads(handle.metadata()["fastkvzip_press"])["document"])
        except UNREADABLE as error:
            raise unreadable_shard(path, error) from error
    return FeatureSplit(torch.cat(hidden, dim=1), torch.cat(scores, dim=2), sorted(set(documents)))


class ShardSet:
    """Feature shards of one split, read one gated layer at a time.

    Opening reads the shards' headers only. :meth:`layer` copies that layer's rows out of each memory-mapped shard
    into one ``[N, D]`` tensor: shards store ``hidden [L_g, n, D]`` layer-major, so a layer is one contiguous run of
    bytes per file and the other layers' pages are never touched. Peak memory is one layer's features (plus one
    shard's piece of it), whatever the number of layers.
    """

    def __init__(self, paths: Iterable[str | Path]):
        self.paths = [Path(path) for path in paths]
        self._tokens: list[int] = []
        documents: set[str] = set()
        shapes: set[tuple[int, int, int]] = set()
        for path in self.paths:
            try:
                with safe_open(str(path), framework="pt") as handle:
                    layers, n_tokens, hidden_size = handle.get_slice("hidden").get_shape()
                    n_heads = handle.get_slice("scores").get_shape()[1]
                    documents.add(json.loads(handle.metadata()["fastkvzip_press"])["document"])
            except UNREADABLE as error:
                raise unreadable_shard(path, error) from error
            self._tokens.append(n_tokens)
            shapes.add((layers, hidden_size, n_heads))
        if len(shapes) > 1:
            raise ValueError(f"feature shards of different shapes (layers, hidden size, heads): {sorted(shapes)}")
        self._shape = shapes.pop() if shapes else (0, 0, 0)
        self._documents = sorted(documents)

    @property
    def num_tokens(self) -> int:
        return sum(self._tokens)

    @property
    def num_layers(self) -> int:
        return self._shape[0]

    @property
    def documents(self) -> list[str]:
        return list(self._documents)

    def layer(self, index: int, max_tokens: int | None = None) -> LayerFeatures:
        """Features of the ``index``-th gated layer over the shards in order, the first ``max_tokens`` tokens."""
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer index {index} outside the shards' {self.num_layers} gated layers")
        total = self.num_tokens if max_tokens is None else min(max_tokens, self.num_tokens)
        _, hidden_size, n_heads = self._shape
        hidden: torch.Tensor | None = None
        scores = torch.empty(n_heads, total, dtype=torch.float32)
        start = 0
        for path, n_tokens in zip(self.paths, self._tokens):
            take = min(n_tokens, total - start)
            if take <= 0:
                break
            try:
                with safe_open(str(path), framework="pt") as handle:
                    piece = handle.get_slice("hidden")[index, :take]
                    if hidden is None:  # the stored dtype (bf16 as written by write_shards)
                        hidden = torch.empty(total, hidden_size, dtype=piece.dtype)
                    hidden[start : start + take] = piece
                    scores[:, start : start + take] = handle.get_slice("scores")[index, :, :take]
            except UNREADABLE as error:
                raise unreadable_shard(path, error) from error
            del piece  # before the next shard's piece: one piece at a time
            start += take
        if hidden is None:
            hidden = torch.empty(0, hidden_size, dtype=torch.bfloat16)
        return LayerFeatures(hidden, scores)


def split_windows(documents: list[str], val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Positions of the training and validation windows, given each window's document (in window order).

    Whole documents are held out (not interleaved tokens), at least one each side. A corpus of one document is held
    out by position instead: its last windows validate. Fewer than two windows leave validation empty.
    """
    by_document: dict[str, list[int]] = {}
    for position, document in enumerate(documents):
        by_document.setdefault(document, []).append(position)
    names = sorted(by_document)
    if len(names) == 1:
        positions = by_document[names[0]]
        n_val = min(max(1, round(val_fraction * len(positions))), len(positions) - 1)
        return positions[: len(positions) - n_val], positions[len(positions) - n_val :]
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(val_fraction * len(names))), len(names) - 1) if len(names) > 1 else 0
    val_names = {names[i] for i in order[:n_val]}
    train = [p for name in names if name not in val_names for p in by_document[name]]
    val = [p for name in names if name in val_names for p in by_document[name]]
    return train, val


def split_by_document(paths: list[Path], val_fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Shards of :func:`split_windows`'s training and validation sides."""
    train, val = split_windows([read_shard_metadata(path)["document"] for path in paths], val_fraction, seed)
    return [paths[i] for i in train], [paths[i] for i in val]
