"""Where a press's per-layer tensors meet: a model spread over several devices (``device_map="auto"``) scores each
layer on that layer's device, one decision needs them on one, and each layer's part of it goes back home."""

from __future__ import annotations

import torch
from transformers import Cache


def stack_on_one_device(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-layer tensors (each ``[B, H, T]``) into ``[L, B, H, T]`` on the device of the first.

    With a model spread over several devices (``device_map="auto"``) every layer's gate scores sit on that layer's
    device; one decision over all layers needs them on one. Each tensor moves once (``.to`` of a tensor already there
    is the tensor itself).
    """
    device = per_layer[0].device
    return torch.stack([tensor.to(device) for tensor in per_layer])


def layer_device(cache: Cache, layer_id: int, default: torch.device) -> torch.device:
    """The device a cache layer computes on (where its keys are, or are fetched to when offloaded); ``default`` for
    a layer that does not say."""
    return getattr(cache.layers[layer_id], "device", None) or default
