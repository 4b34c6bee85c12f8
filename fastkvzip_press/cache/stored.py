"""A transformers cache as named tensors plus a JSON-able description of its layers, and back: the tensors of a cache
file (:mod:`fastkvzip_press.cache.cache_file` adds the header and reads and writes the file).

Only what the cache holds is stored, so a compressed cache's file is about its size: a dense layer's keys and values
``[B, H, T, D]``; a sliding-window layer's window and its cumulative length; a ragged layer's retained pairs segment
after segment ``[N, D]``, its segment lengths ``[B * H]`` and side columns ``[N]``, never its spare rows. A dense
layer of a masked context also holds kvpress's masked positions ``[3, K]`` (sequence, head, position).

Every count a description gives is checked against the tensors stored and the model's geometry before anything is
allocated from it (:func:`check_layers`): a damaged or hostile file is refused, it never asks for more memory than
the file's tensors and the model's positions justify.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from fastkvzip_press.cache.compaction import replace_layer
from fastkvzip_press.cache.ragged_layer import DEFAULT_SPARE_TOKENS, POSITIONS, RaggedLayer
from fastkvzip_press.layout import ModelLayout

LAYER_KINDS = ("dense", "sliding", "ragged")
# Without max_position_embeddings, the positions a RaggedLayer's int32 "positions" column can hold.
POSITION_LIMIT = 2**31 - 1


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


@dataclass(frozen=True)
class Geometry:
    """What every stored layer must fit: the model's KV heads, head size and positions."""

    num_kv_heads: int
    head_dim: int
    max_positions: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> Geometry:
        layout = ModelLayout.from_config(config)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text, "max_position_embeddings", None)
        limit = limit if _is_count(limit, 1) else POSITION_LIMIT
        return cls(layout.num_kv_heads, layout.head_dim, min(limit, POSITION_LIMIT))


def _require(condition: bool, index: int, what: str) -> None:
    if not condition:
        raise ValueError(f"layer {index}: {what}")


def _is_count(value, minimum: int = 0, maximum: int | None = None) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= minimum
        and (maximum is None or value <= maximum)
    )


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN nor infinity in ``tensor``: NaN propagates to its min and max (one pass, no mask as large as it)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_layer(index: int, description: dict, tensors: dict[str, torch.Tensor], geometry: Geometry) -> int:
    """Raise ``ValueError`` naming the layer when its description and tensors do not form a layer of its kind for a
    model of ``geometry``; returns the layer's token count (the context's)."""
    prefix = f"layers.{index}."
    _require(isinstance(description, dict) and description.get("kind") in LAYER_KINDS, index, "unknown layer kind")
    keys, values = tensors.get(prefix + "keys"), tensors.get(prefix + "values")
    _require(keys is not None and values is not None, index, "keys or values missing")
    _require(keys.is_floating_point() and keys.dtype == values.dtype, index, "keys and values must share a float dtype")
    _require(keys.shape == values.shape, index, f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ")
    _require(keys.dim() >= 1 and keys.shape[-1] == geometry.head_dim, index, f"heads of {geometry.head_dim} dims")
    _require(_finite(keys) and _finite(values), index, "keys or values hold NaN or infinite values")
    if description["kind"] == "ragged":
        return _check_ragged(index, description, tensors, geometry)
    _require(keys.dim() == 4, index, f"keys must be [B, H, T, D], got {tuple(keys.shape)}")
    batch, heads, n_tokens, _ = keys.shape
    _require(batch >= 1 and heads == geometry.num_kv_heads, index, f"{geometry.num_kv_heads} KV heads, got {heads}")
    _require(1 <= n_tokens <= geometry.max_positions, index, f"1 to {geometry.max_positions} tokens")
    _check_masked(index, description, tensors, tuple(keys.shape[:3]))
    if description["kind"] == "dense":
        return n_tokens
    window, seen = description.get("sliding_window"), description.get("cumulative_length")
    _require(_is_count(window, 1, POSITION_LIMIT), index, "sliding_window must be in [1, 2**31)")
    _require(_is_count(seen, n_tokens, geometry.max_positions), index, "cumulative_length below the window held")
    return seen


def _check_masked(index: int, description: dict, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> None:
    """A masked context's positions ``[3, K]`` int64, each within the layer's ``[B, H, T]``."""
    masked = description.get("masked", False)
    _require(isinstance(masked, bool), index, "masked must be true or false")
    if not masked:
        return
    indices = tensors.get(f"layers.{index}.masked")
    valid = (
        indices is not None
        and indices.dtype == torch.int64
        and indices.dim() == 2
        and indices.shape[0] == 3
        and bool(((indices >= 0) & (indices < torch.tensor(shape)[:, None])).all())
    )
    _require(valid, index, "masked positions do not fit its keys")


def _check_ragged(index: int, description: dict, tensors: dict[str, torch.Tensor], geometry: Geometry) -> int:
    prefix = f"layers.{index}."
    keys, lengths = tensors[prefix + "keys"], tensors.get(prefix + "lengths")
    _require(keys.dim() == 2, index, f"ragged keys must be [N, D], got {tuple(keys.shape)}")
    _require(lengths is not None and lengths.dtype == torch.int64 and lengths.dim() == 1, index, "lengths [S] int64")
    _require(bool((lengths >= 0).all()) and int(lengths.sum()) == keys.shape[0], index, "lengths do not sum to rows")
    batch_size = description.get("batch_size")
    heads = geometry.num_kv_heads
    _require(_is_count(batch_size, 1) and lengths.shape[0] == batch_size * heads, index, f"batch_size x {heads} heads")
    length = description.get("logical_length")
    _require(_is_count(length, 1, geometry.max_positions), index, f"logical_length in [1, {geometry.max_positions}]")
    pad = description.get("pad_tokens")
    _require(isinstance(pad, list) and len(pad) == batch_size, index, "pad_tokens must give one count per sequence")
    _require(all(_is_count(p, 0, length) for p in pad), index, "pad_tokens must be in [0, logical_length]")
    held = lengths.view(batch_size, heads).amax(dim=1).tolist()
    _require(all(n <= length - p for n, p in zip(held, pad)), index, "a segment holds more than its sequence")
    spare_limit = max(DEFAULT_SPARE_TOKENS, max(held))
    _require(_is_count(description.get("spare_tokens"), 0, spare_limit), index, f"spare_tokens in [0, {spare_limit}]")
    columns = description.get("columns")
    _require(isinstance(columns, dict), index, "columns must map names to fill values")
    for name, fill in columns.items():
        column = tensors.get(prefix + f"column.{name}")
        _require(isinstance(fill, int | float) and not isinstance(fill, bool), index, f"column {name!r} fill value")
        _require(column is not None and column.shape == (keys.shape[0],), index, f"column {name!r} must be [N]")
        dtype = torch.int32 if name == POSITIONS else torch.float32
        _require(column.dtype == dtype, index, f"column {name!r} must hold {dtype}")
        if name == POSITIONS:
            _require(bool(((column >= 0) & (column < length)).all()), index, "positions outside the context")
        else:
            _require(_finite(column), index, f"column {name!r} holds NaN or infinite values")
    return length


def check_layers(tensors: dict[str, torch.Tensor], layers: list, config: PretrainedConfig) -> int:
    """Check every layer against its tensors and the model ``config`` before any is built; they must hold the same
    context (token count, sequences, each sequence's padding). Returns the context's token count."""
    expected = ModelLayout.from_config(config).num_layers
    if not isinstance(layers, list) or len(layers) != expected:
        count = len(layers) if isinstance(layers, list) else "no"
        raise ValueError(f"the model has {expected} layers, the cache {count}")
    geometry = Geometry.of(config)
    tokens = {check_layer(index, description, tensors, geometry) for index, description in enumerate(layers)}
    batches = {
        d["batch_size"] if d["kind"] == "ragged" else tensors[f"layers.{i}.keys"].shape[0] for i, d in enumerate(layers)
    }
    padding = {tuple(d["pad_tokens"]) for d in layers if d["kind"] == "ragged"}
    if len(tokens) > 1:
        raise ValueError(f"its layers hold different token counts {sorted(tokens)}")
    if len(batches) > 1:
        raise ValueError(f"its layers hold different numbers of sequences {sorted(batches)}")
    if len(padding) > 1:
        raise ValueError("its layers disagree on each sequence's padding")
    return tokens.pop()


def cache_from_tensors(
    tensors: dict[str, torch.Tensor], layers: list[dict], config: PretrainedConfig, device: torch.device | str = "cpu"
) -> DynamicCache:
    """The cache :func:`cache_tensors` described, after :func:`check_layers`: every layer of the kind it was stored as
    (a cache made without the model's config holds full layers where the model would slide)."""
    check_layers(tensors, layers, config)
    cache = DynamicCache(config=config)
    if len(cache.layers) != len(layers):
        raise ValueError(f"the model's cache has {len(cache.layers)} layers, the stored cache {len(layers)}")
    for index, description in enumerate(layers):
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


def cache_batch_size(cache: DynamicCache) -> int:
    """How many sequences a filled cache holds."""
    layer = cache.layers[0]
    return layer.batch_size if isinstance(layer, RaggedLayer) else layer.keys.shape[0]


def cast_layers(cache: Cache, dtype: torch.dtype) -> None:
    """Convert every layer's keys and values of ``cache`` to ``dtype`` in place (a saved context loaded for a model
    of another dtype)."""
    for layer in cache.layers:
        if isinstance(layer, RaggedLayer):
            layer.key_buffer, layer.value_buffer = layer.key_buffer.to(dtype), layer.value_buffer.to(dtype)
        else:
            layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
        layer.dtype = dtype
