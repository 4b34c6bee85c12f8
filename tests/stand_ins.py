"""CPU stand-ins for what only CUDA installs have, so the suite executes the CUDA-only branches on CPU.

- :func:`cpu_varlen_attn`: torch's ``varlen_attn`` (same signature as the installed one, the documented semantics)
  computed with plain torch ops on any device.
- :func:`torch_2_11_varlen_attn`: the signature torch 2.11 ships (``scale`` and ``window_size``, no ``enable_gqa``
  nor ``seqused_k``; fewer key than query heads are GQA, as in flash attention), computed the same way.
- :func:`torch_2_10_varlen_attn`: the signature torch 2.10 shipped (no ``scale``, ``window_size``, ``enable_gqa``,
  ``seqused_k``).
- :func:`fake_flash_attn`: a ``flash_attn`` package (``flash_attn_func``, ``flash_attn_varlen_func``,
  ``bert_padding``) that transformers' flash-attention integration imports, computed with SDPA.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fastkvzip_press.cache import varlen


def _window_mask(q_len: int, k_len: int, left: int, right: int, device: torch.device) -> torch.Tensor:
    """``[q_len, k_len]`` bool, bottom-right aligned: query ``i`` sees key ``j`` iff ``i + k_len - q_len - left <= j
    <= i + k_len - q_len + right`` (a negative bound is no bound)."""
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    cols = torch.arange(k_len, device=device)[None]
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= cols <= rows + right
    if left >= 0:
        mask &= cols >= rows - left
    return mask


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None):
    """``q [t, Hq, D]``, ``k``/``v`` ``[s, Hkv, D]`` → ``[t, Hq, D]`` in fp32, cast back to ``q``'s dtype."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().transpose(0, 1), v.float().transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1).to(q.dtype)


def cpu_varlen_attn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux=None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """torch's documented ``varlen_attn`` on any device: sequence ``i``'s queries ``cu_seq_q[i]:cu_seq_q[i+1]``
    attend to its keys from ``cu_seq_k[i]``, the first ``seqused_k[i]`` of them when given; ``window_size`` is
    ``(left, right)`` around the bottom-right-aligned diagonal."""
    if return_aux is not None or block_table is not None:
        raise NotImplementedError("the stand-in covers what the ragged attention calls")
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError("query and key heads differ without enable_gqa")
    starts_q, starts_k = cu_seq_q.tolist(), cu_seq_k.tolist()
    used = seqused_k.tolist() if seqused_k is not None else [b - a for a, b in zip(starts_k, starts_k[1:])]
    out = torch.empty_like(query)
    for i, n_used in enumerate(used):
        q = query[starts_q[i] : starts_q[i + 1]]
        if q.shape[0] > max_q or n_used > max_k:
            raise ValueError(f"sequence {i} exceeds max_q={max_q} / max_k={max_k}")
        k = key[starts_k[i] : starts_k[i] + n_used]
        v = value[starts_k[i] : starts_k[i] + n_used]
        mask = _window_mask(q.shape[0], n_used, window_size[0], window_size[1], query.device)
        out[starts_q[i] : starts_q[i + 1]] = _attend(q, k, v, mask, scale)
    return out


def torch_2_11_varlen_attn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    return_aux=None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """torch 2.11's ``varlen_attn``: every key of sequence ``i`` is ``cu_seq_k[i]:cu_seq_k[i+1]``."""
    return cpu_varlen_attn(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux, scale=scale,
        window_size=window_size, enable_gqa=True,
    )  # fmt: skip


def torch_2_10_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, is_causal=False):
    """The signature torch 2.10 shipped; never called by a correct dispatcher."""
    raise AssertionError("the ragged attention called a varlen_attn that lacks the arguments it passes")


@contextlib.contextmanager
def varlen_on_cpu(monkeypatch, function=cpu_varlen_attn) -> Iterator[None]:
    """Make the varlen path available on CPU tensors, with ``function`` as torch's ``varlen_attn``."""
    import torch.nn.attention.varlen as torch_varlen

    monkeypatch.setattr(torch_varlen, "varlen_attn", function)
    monkeypatch.setattr(varlen, "device_supports_varlen", lambda device: None)
    yield


# ------------------------------------------------------------------------------------------------ flash-attn


def _flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, **kwargs
):
    """flash-attn's ``flash_attn_func``: ``[B, t, Hq, D]`` against ``[B, s, Hkv, D]``; causal is bottom-right."""
    right = 0 if causal else window_size[1]
    outputs = []
    for b in range(q.shape[0]):
        mask = _window_mask(q.shape[1], k.shape[1], window_size[0], right, q.device)
        outputs.append(_attend(q[b], k[b], v[b], mask, softmax_scale))
    return torch.stack(outputs)


def _flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    **kwargs,
):
    """flash-attn's ``flash_attn_varlen_func`` (packed ``[total, H, D]``, no per-sequence used length)."""
    right = 0 if causal else window_size[1]
    return cpu_varlen_attn(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale=softmax_scale, window_size=(window_size[0], right), enable_gqa=True,
    )  # fmt: skip


def _flash_attn_with_kvcache(*args, **kwargs):
    """flash-attn's paged-cache entry point, which transformers imports with the others; nothing here calls it."""
    raise NotImplementedError("the flash-attn stand-in covers flash_attn_func and flash_attn_varlen_func")


@contextlib.contextmanager
def fake_flash_attn(monkeypatch) -> Iterator[types.ModuleType]:
    """Install a ``flash_attn`` package that transformers' flash-attention path finds and loads."""
    from transformers import modeling_flash_attention_utils as flash_utils
    from transformers.modeling_flash_attention_utils import _pad_input, _unpad_input

    package = types.ModuleType("flash_attn")
    package.__version__ = "2.8.3"
    package.flash_attn_func = _flash_attn_func
    package.flash_attn_varlen_func = _flash_attn_varlen_func
    package.flash_attn_with_kvcache = _flash_attn_with_kvcache  # imported (never called) by transformers >= 5.3
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = _pad_input, _unpad_input
    package.bert_padding = padding
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    monkeypatch.setattr(flash_utils, "is_flash_attn_2_available", lambda: True)
    # The integration keeps the last loaded kernels in module globals: start clean and put them back afterwards.
    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_pad_fn", "_unpad_fn"):
        monkeypatch.setattr(flash_utils, name, None)
    monkeypatch.setattr(flash_utils, "_process_flash_kwargs_fn", None)
    yield package


# ---------------------------------------------------------------------------------------------- host reads

_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "new_tensor")


@contextlib.contextmanager
def host_reads(monkeypatch, package: str = "fastkvzip_press") -> Iterator[list[str]]:
    """Record every read of tensor data on the host (what synchronises with a GPU), and every host-to-device
    ``new_tensor``, made directly by ``package``'s code: ``"module.py:line method"`` per read."""
    import os

    reads: list[str] = []
    marker = os.sep + package + os.sep

    def recording(name: str, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if marker in caller:
                reads.append(f"{os.path.basename(caller)}:{sys._getframe(1).f_lineno} {name}")
            return original(self, *args, **kwargs)

        return method

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, recording(name, getattr(torch.Tensor, name)))
    yield reads
