"""Which KV pairs to evict, given gate scores of several layers (torch reference implementation).

All functions take scores ``[L, B, H, T]`` (layers, batch, KV heads, tokens; higher = keep) and return a boolean
eviction mask of the same shape. Protected positions carry ``+inf`` and are never evicted.
"""

from __future__ import annotations

import torch


def protect(scores: torch.Tensor, n_sink: int, window: int) -> torch.Tensor:
    """Set the first ``n_sink`` and the last ``window`` positions of ``scores [..., T]`` to ``+inf``."""
    protected = scores.clone()
    protected[..., :n_sink] = float("inf")
    if window > 0:
        protected[..., -window:] = float("inf")
    return protected


def _bottom_k_mask(flat: torch.Tensor, n_remove: torch.Tensor | int) -> torch.Tensor:
    """Mask of the ``n_remove`` smallest entries of each row of ``flat [R, N]``; ties go to the lower index."""
    order = torch.argsort(flat, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(flat.shape[-1], device=flat.device).expand_as(order))
    n_remove = torch.as_tensor(n_remove, device=flat.device).reshape(-1, 1)
    return ranks < n_remove


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
