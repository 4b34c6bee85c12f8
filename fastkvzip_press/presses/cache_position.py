"""``cache_position`` in the attention modules' keyword arguments, also on transformers releases that dropped it.

kvpress 0.5.5's hooks (``BasePress.forward_hook``, ``DecodingPress``, ``PrefillDecodingPress``, its Fast KVzip press)
and ours tell a prefill from a later forward by ``kwargs["cache_position"]``, which transformers passed to every
attention module up to 5.2. From 5.3 on the models take no ``cache_position`` (positions come from ``position_ids``)
and nothing passes it, so those hooks fail with ``KeyError: 'cache_position'``.

:func:`pass_cache_position` gives such a model a forward pre-hook on its base model that computes it as transformers
5.2 did (the cache's length before the forward, then one position per new token) and adds it to the call's keyword
arguments, which the base model hands on to every decoder layer and attention module. The hook is added once per
model and stays; a call that passes its own ``cache_position`` is left as it is. On releases whose base model takes
``cache_position`` it adds nothing.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

# Set on a base model once it has the hook (copies of the model keep both).
HOOKED_ATTRIBUTE = "_fastkvzip_passes_cache_position"


def base_model(model: PreTrainedModel) -> nn.Module:
    """The module that runs the decoder layers (the language model inside a multimodal wrapper)."""
    inner = model.model if isinstance(getattr(model, "model", None), nn.Module) else model.get_decoder()
    return getattr(inner, "language_model", inner)


def takes_cache_position(module: nn.Module) -> bool:
    """Whether ``module``'s forward has a ``cache_position`` parameter (transformers < 5.3)."""
    return "cache_position" in inspect.signature(type(module).forward).parameters


def add_cache_position(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    """Forward pre-hook: ``kwargs["cache_position"]`` = the positions after what the cache holds, when missing."""
    if kwargs.get("cache_position") is not None:
        return None
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        return None
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None else 0
    positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)
    return args, {**kwargs, "cache_position": positions}


def pass_cache_position(model: PreTrainedModel) -> bool:
    """Make ``model`` pass ``cache_position`` to its attention modules; returns whether a hook was needed (now or
    before). Idempotent."""
    base = base_model(model)
    if takes_cache_position(base):
        return False
    if not getattr(base, HOOKED_ATTRIBUTE, False):
        base.register_forward_pre_hook(add_cache_position, with_kwargs=True, prepend=True)
        setattr(base, HOOKED_ATTRIBUTE, True)
    return True
