"""Which KV pairs to evict, given gate scores of several layers.

The functions take scores ``[L, B, H, T]`` (layers, batch, KV heads, tokens; higher = keep) and return a boolean
eviction mask of the same shape. Protected positions carry ``+inf`` and are never evicted. The bottom-k selection
runs through :func:`fastkvzip_press.triton.select_smallest` (a radix select on CUDA, exact and with ties going to
the lower flat index).
"""

from __future__ import annotations

import torch

from fastkvzip_press.triton import select_smallest


def protect(scores: torch.Tensor, n_sink: int, window: int) -> torch.Tensor:
    """Set the first ``n_sink`` and the last ``window`` positions of ``scores [..., T]`` to ``+inf``."""
    protected = scores.clone()
    protected[..., :n_sink] = float("inf")
    if window > 0:
        protected[..., -window:] = float("inf")
    return protected


def evict_smallest(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Mask (shape of ``scores``) of its ``n_remove`` smallest entries over all dimensions; ties to the lower index."""
    _, evict = select_smallest(scores.reshape(-1).float(), n_remove)
    return evict.reshape(scores.shape)


def _bottom_k_mask(flat: torch.Tensor, n_remove: torch.Tensor) -> torch.Tensor:
    """Mask of the ``n_remove[r]`` smallest entries of each row ``r`` of ``flat [R, N]``."""
    return torch.stack([evict_smallest(row, int(k)) for row, k in zip(flat, n_remove.tolist())])


def evict_by_ratio(scores: torch.Tensor, ratio: float, layerwise: bool = False) -> torch.Tensor:
    """Evict ``int(ratio * count)`` lowest-scored pairs, over all layers x heads x tokens (or per layer).

    Protected (``+inf``) pairs count toward the budget but are never evicted: when they leave too little room,
    fewer pairs than asked are evicted.
    """
    n_layers, bsz, heads, n_tokens = scores.shape
    if layerwise:
        flat = scores.permute(1, 0, 2, 3).reshape(bsz * n_layers, heads * n_tokens)
    else:
        flat = scores.permute(1, 0, 2, 3).reshape(bsz, n_layers * heads * n_tokens)
    evictable = torch.isfinite(flat).sum(-1)
    n_remove = torch.clamp(evictable, max=int(flat.shape[-1] * ratio))
    mask = _bottom_k_mask(flat, n_remove)
    return mask.reshape(bsz, n_layers, heads, n_tokens).permute(1, 0, 2, 3)


def evict_by_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Evict every unprotected pair whose score is below ``threshold`` (adaptive budget)."""
    return scores < threshold
