"""A transformers cache as named tensors plus a JSON-able description of its layers, and back: what a cache file
holds (:mod:`fastkvzip_press.saved_cache` adds the header and the checks).

Only what the cache holds is stored, so a compressed cache's file is about its size: a dense layer's keys and values
``[B, H, T, D]``; a sliding-window layer's window and its cumulative length; a ragged layer's retained pairs segment
after segment ``[N, D]``, its segment lengths ``[B * H]`` and side columns ``[N]``, never its spare rows.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from fastkvzip_press.cache.compaction import replace_layer
from fastkvzip_press.cache.ragged_layer import POSITIONS, RaggedLayer

LAYER_KINDS = ("dense", "sliding", "ragged")


def cache_tensors(cache: DynamicCache) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """``(tensors, layers)``: tensors named ``layers.<i>.<part>`` (on the CPU) and one description per layer."""
    tensors: dict[str, torch.Tensor] = {}
    layers: list[dict] = []
    for index, layer in enumerate(cache.layers):
        prefix = f"layers.{index}."
        if isinstance(layer, RaggedLayer):
            rows = layer.retained_rows()
            tensors[prefix + "keys"] = layer.key_buffer[rows]
            tensors[prefix + "values"] = layer.value_buffer[rows]
            tensors[prefix + "lengths"] = layer.lengths.to(torch.int64)
            for name, column in layer.columns.items():
                tensors[prefix + f"column.{name}"] = column[rows]
            layers.append(
                {
                    "kind": "ragged",
                    "logical_length": layer.logical_length,
                    "batch_size": layer.batch_size,
                    "pad_tokens": list(layer.pad_tokens),
                    "spare_tokens": layer.spare_tokens,
                    "columns": {name: layer.column_fill(name) for name in layer.columns},
                }
            )
            continue
        if not getattr(layer, "is_initialized", False):
            raise ValueError(f"cache layer {index} holds nothing yet: save a cache after its context's prefill")
        tensors[prefix + "keys"] = layer.keys
        tensors[prefix + "values"] = layer.values
        if getattr(layer, "is_sliding", False):
            window, seen = layer.sliding_window, layer.cumulative_length
            layers.append({"kind": "sliding", "sliding_window": window, "cumulative_length": seen})
        else:
            layers.append({"kind": "dense"})
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}, layers


def _require(condition: bool, index: int, what: str) -> None:
    if not condition:
        raise ValueError(f"layer {index}: {what}")


def _is_count(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_layer(index: int, description: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the layer when its description and tensors do not form a layer of its kind."""
    prefix = f"layers.{index}."
    _require(isinstance(description, dict) and description.get("kind") in LAYER_KINDS, index, "unknown layer kind")
    keys, values = tensors.get(prefix + "keys"), tensors.get(prefix + "values")
    _require(keys is not None and values is not None, index, "keys or values missing")
    _require(keys.is_floating_point() and keys.dtype == values.dtype, index, "keys and values must share a float dtype")
    _require(keys.shape == values.shape, index, f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ")
    kind = description["kind"]
    if kind != "ragged":
        _require(keys.dim() == 4, index, f"keys must be [B, H, T, D], got {tuple(keys.shape)}")
        if kind == "sliding":
            _require(_is_count(description.get("sliding_window"), 1), index, "sliding_window must be >= 1")
            _require(_is_count(description.get("cumulative_length")), index, "cumulative_length must be >= 0")
        return
    lengths = tensors.get(prefix + "lengths")
    _require(keys.dim() == 2, index, f"ragged keys must be [N, D], got {tuple(keys.shape)}")
    _require(lengths is not None and lengths.dtype == torch.int64 and lengths.dim() == 1, index, "lengths [S] int64")
    _require(bool((lengths >= 0).all()) and int(lengths.sum()) == keys.shape[0], index, "lengths do not sum to rows")
    batch_size = description.get("batch_size")
    _require(_is_count(batch_size, 1) and lengths.shape[0] % batch_size == 0, index, "batch_size must divide segments")
    longest = int(lengths.max()) if lengths.numel() else 0
    _require(_is_count(description.get("logical_length"), longest), index, "logical_length below a segment's length")
    _require(_is_count(description.get("spare_tokens")), index, "spare_tokens must be >= 0")
    pad = description.get("pad_tokens")
    _require(isinstance(pad, list) and len(pad) == batch_size and all(map(_is_count, pad)), index, "pad_tokens")
    columns = description.get("columns")
    _require(isinstance(columns, dict), index, "columns must map names to fill values")
    for name, fill in columns.items():
        column = tensors.get(prefix + f"column.{name}")
        _require(isinstance(fill, int | float) and not isinstance(fill, bool), index, f"column {name!r} fill value")
        _require(column is not None and column.shape == (keys.shape[0],), index, f"column {name!r} must be [N]")
        dtype = torch.int32 if name == POSITIONS else torch.float32
        _require(column.dtype == dtype, index, f"column {name!r} must hold {dtype}")


def cache_from_tensors(
    tensors: dict[str, torch.Tensor], layers: list[dict], config: PretrainedConfig, device: torch.device | str = "cpu"
) -> DynamicCache:
    """The cache :func:`cache_tensors` described: every layer of the kind it was stored as (a cache made without the
    model's config holds full layers where the model would slide)."""
    cache = DynamicCache(config=config)
    if len(cache.layers) != len(layers):
        raise ValueError(f"the model's cache has {len(cache.layers)} layers, the stored cache {len(layers)}")
    for index, description in enumerate(layers):
        check_layer(index, description, tensors)
        prefix = f"layers.{index}."
        keys, values = tensors[prefix + "keys"].to(device), tensors[prefix + "values"].to(device)
        kind = description["kind"]
        if kind == "ragged":
            columns = {
                name: (tensors[prefix + f"column.{name}"].to(device), fill)
                for name, fill in description["columns"].items()
            }
            layer = _ragged_layer(keys, values, tensors[prefix + "lengths"].to(device), columns, description)
        else:
            layer = DynamicSlidingWindowLayer(description["sliding_window"]) if kind == "sliding" else DynamicLayer()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            if kind == "sliding":
                layer.cumulative_length = description["cumulative_length"]
        replace_layer(cache, index, layer)
    return cache


def _ragged_layer(
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    columns: dict[str, tuple[torch.Tensor, float]],
    description: dict,
) -> RaggedLayer:
    """A ragged layer holding ``keys``/``values [N, D]`` (segment after segment, ``lengths [S]`` rows each)."""
    batch_size = description["batch_size"]
    n_segments = lengths.shape[0]
    longest = int(lengths.max()) if n_segments else 0
    keep = torch.arange(longest, device=keys.device) < lengths[:, None]  # [S, longest], rows in segment order

    def padded(rows: torch.Tensor) -> torch.Tensor:
        shape = (n_segments, longest, *rows.shape[1:])
        dense = torch.zeros(shape, dtype=rows.dtype, device=rows.device)
        dense[keep] = rows
        return dense.view(batch_size, n_segments // batch_size, longest, *rows.shape[1:])

    layer = RaggedLayer.from_dense(
        padded(keys),
        padded(values),
        keep.view(batch_size, -1, longest),
        spare_tokens=description["spare_tokens"],
        columns={name: (padded(column), fill) for name, (column, fill) in columns.items()},
        pad_tokens=description["pad_tokens"],
    )
    layer.logical_length = description["logical_length"]
    return layer
