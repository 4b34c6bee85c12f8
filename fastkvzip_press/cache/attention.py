"""Attention over ragged cache layers, registered with transformers' ``AttentionInterface``.

For a model loaded with implementation ``X`` (``sdpa`` or ``flash_attention_2``/``_3``) we register
``fastkvzip_ragged_X``: layers whose cache is a :class:`~fastkvzip_press.cache.RaggedLayer` attend head by head
over their own retained keys; every other layer calls ``X`` unchanged (with ``X``'s mask function), so a model
switched to it behaves exactly as before on ordinary caches.

Each (sequence, KV head) segment is one variable-length sequence; the ``t`` new query tokens sit at the end of every
segment, so the causal mask is aligned bottom-right (query ``i`` sees the first ``len - t + i + 1`` keys of its
segment). Padding is never stored, so no padding mask is needed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fastkvzip_press.cache.ragged_layer import RaggedLayer
from fastkvzip_press.cache.varlen import (
    PER_SEGMENT_PADDING,
    VARLEN,
    VARLEN_ENV,  # noqa: F401  (re-exported: where users looked for it before)
    ragged_attention_path,
    record_path,
    varlen_attention,
)

logger = logging.getLogger(__name__)

RAGGED_PREFIX = "fastkvzip_ragged_"
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flash_attention_3")


def cache_attention_path(cache: object) -> str | None:
    """The attention ``cache``'s ragged layers get (``"varlen"`` or ``"per-segment (<why>)"``); ``None`` without
    ragged layers."""
    layer = next((layer for layer in getattr(cache, "layers", ()) if isinstance(layer, RaggedLayer)), None)
    return None if layer is None else str(ragged_attention_path(layer.device, layer.dtype, layer.head_dim))


def attention_implementation(model: PreTrainedModel) -> str:
    """The attention implementation the model was loaded with ("sdpa", "eager", "flash_attention_2", ...)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(text, "_attn_implementation", None) or getattr(model.config, "_attn_implementation", "sdpa")


def bottom_right_causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """``[q_len, k_len]`` bool: query ``i`` sees key ``j`` iff ``j <= k_len - q_len + i``."""
    rows = torch.arange(q_len, device=device).unsqueeze(1)
    cols = torch.arange(k_len, device=device).unsqueeze(0)
    return cols <= rows + (k_len - q_len)


def new_row_visibility(attention_mask: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
    """``[B, t, t]`` bool: which of the ``t`` rows this forward appends each new query may see (causal, not padding),
    read from the mask transformers built for the layer (4-D sdpa or 2-D padding mask); ``None`` when a plain
    bottom-right causal mask says it all (no padding among the new rows)."""
    if attention_mask is None or q_len == 1:
        return None
    causal = bottom_right_causal_mask(q_len, q_len, attention_mask.device)
    if attention_mask.dim() == 4:
        block = attention_mask[:, 0, -q_len:, -q_len:]
        block = block if block.dtype == torch.bool else block > torch.finfo(block.dtype).min / 2
        visible = block & causal
    else:  # 2-D padding mask
        visible = attention_mask[:, None, -q_len:].bool() & causal
    # Rows of padding queries see nothing in the mask; let them see themselves (their output is never used).
    visible = visible | (~visible.any(-1, keepdim=True) & torch.eye(q_len, dtype=torch.bool, device=visible.device))
    return None if bool((visible == causal).all()) else visible


def _per_segment_attention(
    query: torch.Tensor, layer: RaggedLayer, scaling: float | None, new_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA over each segment's contiguous rows: query ``[B, Hq, t, D]`` → ``[B, Hq, t, D]``; ``new_rows [B, t, t]``
    narrows what the queries see of the rows appended with them (padding)."""
    bsz, n_q_heads, q_len, head_dim = query.shape
    n_heads = layer.num_heads
    # Views of every segment's rows from one split per buffer and one unbind of the queries: at decoding a small
    # model's step is mostly per-call overhead, so each segment costs one SDPA call and nothing else.
    lengths, capacities = layer.head_lengths, layer.head_capacities
    sizes = [size for length, capacity in zip(lengths, capacities) for size in (length, capacity - length)]
    keys = layer.key_buffer.view(1, 1, -1, head_dim).split(sizes, dim=2)[::2]
    values = layer.value_buffer.view(1, 1, -1, head_dim).split(sizes, dim=2)[::2]
    queries = query.reshape(bsz * n_heads, 1, n_q_heads // n_heads, q_len, head_dim).unbind(0)  # [1, G, t, D] each
    masks: dict[int, torch.Tensor] = {}
    outputs = []
    for segment, length in enumerate(lengths):
        mask = None
        if new_rows is not None:
            mask = torch.ones(q_len, length, dtype=torch.bool, device=query.device)
            mask[:, length - q_len :] = new_rows[segment // n_heads]
        elif q_len > 1:
            if length not in masks:
                masks[length] = bottom_right_causal_mask(q_len, length, query.device)
            mask = masks[length]
        outputs.append(
            F.scaled_dot_product_attention(
                queries[segment], keys[segment], values[segment], attn_mask=mask, scale=scaling, enable_gqa=True
            )
        )
    return torch.cat(outputs).view(bsz, n_q_heads, q_len, head_dim)


def ragged_attention(
    query: torch.Tensor,
    layer: RaggedLayer,
    scaling: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query [B, Hq, t, D]`` over a ragged layer; returns ``[B, t, Hq, D]`` (transformers' layout).

    The stored rows hold no padding; ``attention_mask`` (the layer's mask from transformers) only matters for padding
    among the rows appended with these queries (a chunk of a left-padded batch).
    """
    if query.shape[0] != layer.batch_size:
        raise ValueError(
            f"the ragged cache layer holds {layer.batch_size} sequence(s), got a batch of {query.shape[0]} queries"
        )
    new_rows = new_row_visibility(attention_mask, query.shape[2])
    if new_rows is not None:
        record_path(PER_SEGMENT_PADDING)
        return _per_segment_attention(query, layer, scaling, new_rows).transpose(1, 2).contiguous()
    path = ragged_attention_path(query.device, query.dtype, query.shape[-1])
    record_path(path)
    if path.name == VARLEN:
        out = varlen_attention(query, layer, scaling)
    else:
        out = _per_segment_attention(query, layer, scaling)
    return out.transpose(1, 2).contiguous()


@contextlib.contextmanager
def _named(config: object, original: str) -> Iterator[None]:
    """Show the original implementation's name in ``config`` while its function runs on a dense layer.

    transformers' flash-attention forward hands ``module.config._attn_implementation`` to its lazy kernel import,
    which takes an unknown name ("fastkvzip_ragged_flash_attention_2") for a hub kernel and fails. sdpa reads no name.
    """
    current = getattr(config, "_attn_implementation", None)
    if not original.startswith("flash") or current is None or current == original:
        yield
        return
    config._attn_implementation = original
    try:
        yield
    finally:
        config._attn_implementation = current


def _make_attention(original: str) -> Callable:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor | RaggedLayer,
        value: torch.Tensor | RaggedLayer,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if isinstance(key, RaggedLayer):
            if kwargs.get("sliding_window") or kwargs.get("softcap"):
                raise NotImplementedError("ragged layers support full attention without logit soft-capping only")
            return ragged_attention(query, key, scaling, attention_mask), None
        with _named(getattr(module, "config", None), original):
            return ALL_ATTENTION_FUNCTIONS[original](
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )

    attention.__name__ = f"{RAGGED_PREFIX}{original}"
    return attention


def register_ragged_attention(original: str) -> str:
    """Register ``fastkvzip_ragged_<original>`` (attention and mask functions); returns its name."""
    if original not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(
            f"ragged compaction needs attn_implementation in {SUPPORTED_IMPLEMENTATIONS}, the model uses "
            f"{original!r}. Load it with attn_implementation='sdpa', or use FastKVzipPress(compaction='masked')."
        )
    name = RAGGED_PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_attention(original))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def enable_ragged_attention(model: PreTrainedModel) -> str:
    """Switch ``model`` to the ragged-aware attention wrapping its current implementation (idempotent).

    The switch stays after the press exits: a ragged cache outlives the press (kvpress's pipeline answers
    questions after leaving ``with press(model)``), and on ordinary caches the wrapper is the original function.
    """
    current = attention_implementation(model)
    if current.startswith(RAGGED_PREFIX):
        return current
    name = register_ragged_attention(current)
    configs = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == current:
            configs[id(config)] = config
    text_config = model.config.get_text_config()
    configs[id(text_config)] = text_config
    for config in configs.values():
        config._attn_implementation = name
    logger.info("attention implementation %r → %r (ragged layers attend head by head)", current, name)
    return name
