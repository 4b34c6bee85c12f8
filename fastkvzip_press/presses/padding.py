"""Which keys of a forward are padding, read from the mask transformers hands an attention module."""

from __future__ import annotations

import torch

from fastkvzip_press.cache.host_read import LastHostRead

# Whether a mask holds padding is read on the host: once per forward (every layer gets the same mask), not per layer.
_last_padding: LastHostRead[torch.Tensor | None] = LastHostRead()


def key_padding(attention_mask: torch.Tensor | None, n_keys: int) -> torch.Tensor | None:
    """``[B, n_keys]`` bool, True where one of the last ``n_keys`` keys is padding; ``None`` when there is none.

    sdpa layers get a 4-D mask ``[B, 1, q, kv]`` (bool, True = attend, or additive float) or ``None``; flash-attention
    layers get the 2-D padding mask ``[B, kv]``. The last query row of a causal mask sees every key that is not
    padding.
    """
    if attention_mask is None:
        return None
    return _last_padding.get(attention_mask, n_keys, lambda: _read_padding(attention_mask, n_keys))


def _read_padding(attention_mask: torch.Tensor, n_keys: int) -> torch.Tensor | None:
    if attention_mask.dim() == 2:
        visible = attention_mask.bool()
    elif attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1]
        visible = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(attention_mask.shape)}")
    visible = visible[:, -n_keys:]
    padding = ~visible
    # A hole: a masked key with attended keys on both sides. Eviction counts each sequence's own tokens in order, so
    # it supports padding before (or after) a sequence, not gaps inside it.
    holes = padding & (visible.cumsum(-1) > 0) & (visible.flip(-1).cumsum(-1).flip(-1) > 0)
    has_padding, has_holes = torch.stack([padding.any(), holes.any()]).tolist()  # one host read
    if has_holes:
        rows = holes.any(-1).nonzero().flatten().tolist()
        raise ValueError(
            f"the attention mask masks tokens inside sequence(s) {rows} of the batch (a gap between attended tokens); "
            "the presses support padding before or after a sequence only: pass each sequence's tokens without gaps"
        )
    return padding if has_padding else None
