"""What a KV cache weighs: the bytes it really stores, and those of a full cache for comparison."""

from __future__ import annotations

import torch
from transformers import Cache, PreTrainedModel

from fastkvzip_press.layout import ModelLayout


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes held by the keys and values of every layer of a transformers cache (physical storage).

    Ragged layers count their whole buffers, spare rows, segment index and positions included
    (``RaggedLayer.nbytes``).
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


def format_bytes(n_bytes: float) -> str:
    """``n_bytes`` for people: B, KiB, MiB or GiB with one decimal."""
    if n_bytes < 1024:
        return f"{int(n_bytes):,} B"
    for unit in ("KiB", "MiB", "GiB"):
        n_bytes /= 1024
        if n_bytes < 1024 or unit == "GiB":
            break
    return f"{n_bytes:,.1f} {unit}"
