"""One varlen-attention call over every segment of a ragged layer (CUDA), and when that path can run.

torch's ``torch.nn.attention.varlen.varlen_attn`` takes each (sequence, KV head) segment as one sequence of a packed
batch. The path needs what not every install has, so it is checked once per device / dtype / head size and the
ragged attention falls back to one SDPA call per segment otherwise:

- the function itself with ``scale`` and ``window_size`` (torch 2.10's has neither). torch 2.13's also has
  ``enable_gqa`` and ``seqused_k``, which skip each segment's spare rows; torch 2.11's lacks both, so its call packs
  the spare rows after each segment as sequences of their own whose outputs are dropped (:func:`packed_with_gaps`);
- an NVIDIA GPU of compute capability 8.0 or newer (ROCm builds also report ``is_cuda``);
- fp16 or bf16, and a head size of at most 256 that is a multiple of 8 (the flash kernels' limits).

Which path ran is logged once per reason and counted (:func:`attention_path_counts`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fastkvzip_press.cache.ragged_layer import RaggedLayer

logger = logging.getLogger(__name__)

# "0" turns the CUDA varlen kernel off (per-segment SDPA everywhere), e.g. to compare the two paths.
VARLEN_ENV = "FASTKVZIP_PRESS_VARLEN"
VARLEN_PARAMETERS = ("scale", "window_size")
# With both: one sequence per segment (``seqused_k`` skips spare rows); without: spare rows are sequences of their own.
USED_LENGTH_PARAMETERS = ("enable_gqa", "seqused_k")
MIN_CAPABILITY = (8, 0)
MAX_HEAD_DIM = 256
HALF_DTYPES = (torch.float16, torch.bfloat16)

VARLEN = "varlen"
PER_SEGMENT = "per-segment"
PER_SEGMENT_PADDING = "per-segment (padding among new rows)"

_path_counts: Counter[str] = Counter()
_logged: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class AttentionPath:
    """Which ragged attention runs for a layer's data, and why."""

    name: str  # VARLEN or PER_SEGMENT
    reason: str

    def __str__(self) -> str:
        return self.name if self.name == VARLEN else f"{self.name} ({self.reason})"


def installed_varlen_attn():
    """torch's ``varlen_attn``, or ``None`` when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=8)
def _parameters(function) -> frozenset[str] | None:
    """``function``'s parameter names: ``None`` when it takes any keyword, none when its signature cannot be read."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return frozenset(parameters)


def missing_varlen_parameters(function) -> tuple[str, ...]:
    """The keyword arguments every varlen call needs that ``function``'s signature lacks (read once per function)."""
    names = _parameters(function)
    return () if names is None else tuple(name for name in VARLEN_PARAMETERS if name not in names)


def takes_used_lengths(function) -> bool:
    """Whether ``function`` takes ``seqused_k`` and ``enable_gqa`` (torch 2.13) or needs the spare rows packed as
    sequences of their own (torch 2.11)."""
    names = _parameters(function)
    return names is None or all(name in names for name in USED_LENGTH_PARAMETERS)


@functools.lru_cache(maxsize=16)
def device_supports_varlen(device: torch.device) -> str | None:
    """``None`` when ``device`` can run the varlen kernels, else why not (checked once per device)."""
    if device.type != "cuda":
        return f"{device.type} tensors"
    if torch.version.hip is not None:
        return "a ROCm device"
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < MIN_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} < 8.0"
    return None


def ragged_attention_path(device: torch.device, dtype: torch.dtype, head_dim: int) -> AttentionPath:
    """The path ragged attention takes for a layer of ``dtype`` rows of ``head_dim`` on ``device``."""
    reason = device_supports_varlen(device)
    if reason is None and os.environ.get(VARLEN_ENV) == "0":
        reason = f"{VARLEN_ENV}=0"
    if reason is None and dtype not in HALF_DTYPES:
        reason = f"{str(dtype).removeprefix('torch.')} (varlen needs fp16/bf16)"
    if reason is None and (head_dim > MAX_HEAD_DIM or head_dim % 8):
        reason = f"head_dim {head_dim} (varlen needs a multiple of 8, at most {MAX_HEAD_DIM})"
    if reason is None:
        function = installed_varlen_attn()
        if function is None:
            reason = f"torch {torch.__version__} has no torch.nn.attention.varlen"
        elif missing := missing_varlen_parameters(function):
            reason = f"torch {torch.__version__}'s varlen_attn lacks {', '.join(missing)} (torch 2.11 has them)"
    return AttentionPath(PER_SEGMENT if reason else VARLEN, reason or "")


def record_path(path: AttentionPath | str) -> None:
    """Count one ragged attention call on ``path``; log the first call of each path and reason."""
    name, reason = (path.name, path.reason) if isinstance(path, AttentionPath) else (path, "")
    _path_counts[name] += 1
    if (name, reason) not in _logged:
        _logged.add((name, reason))
        logger.info("ragged attention: %s%s", name, f" ({reason})" if reason else "")


def attention_path_counts() -> dict[str, int]:
    """Ragged attention calls of this process by path (``varlen``, ``per-segment``, and the padding case)."""
    return dict(_path_counts)


def varlen_attention(query: torch.Tensor, layer: RaggedLayer, scaling: float | None) -> torch.Tensor:
    """``query [B, Hq, t, D]`` over every segment in one ``varlen_attn`` call; returns ``[B, Hq, t, D]``.

    Each (sequence, KV head) segment is a sequence of the packed batch, its G query heads a GQA group. The causal
    window ``(-1, 0)`` is aligned bottom-right (the ``t`` queries are the segment's last rows). Nothing here reads
    device data on the host.
    """
    function = installed_varlen_attn()
    bsz, n_q_heads, q_len, head_dim = query.shape
    n_segments = bsz * layer.num_heads
    group = n_q_heads // layer.num_heads
    segment_queries = query.reshape(n_segments, group, q_len, head_dim).transpose(1, 2)  # [S, t, G, D]
    keys, values = layer.key_buffer.unsqueeze(1), layer.value_buffer.unsqueeze(1)
    end = layer.starts.new_full((1,), layer.key_buffer.shape[0])  # filled on the device: no host-to-device copy
    if takes_used_lengths(function):
        out = function(
            segment_queries.reshape(-1, group, head_dim).contiguous(),
            keys,
            values,
            torch.arange(n_segments + 1, device=query.device, dtype=torch.int32) * q_len,
            torch.cat([layer.starts, end]).to(torch.int32),
            q_len,
            max(layer.head_lengths),
            scale=scaling,
            window_size=(-1, 0),
            enable_gqa=True,
            seqused_k=layer.lengths.to(torch.int32),
        )
    else:
        out = packed_with_gaps(function, segment_queries, keys, values, layer, end, scaling)
    out = out.view(n_segments, q_len, group, head_dim).transpose(1, 2)
    return out.reshape(bsz, n_q_heads, q_len, head_dim)


def packed_with_gaps(
    function,
    segment_queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    layer: RaggedLayer,
    end: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """The call for a ``varlen_attn`` without ``seqused_k`` (torch 2.11): ``[S * t, G, D]`` of the segments.

    Segment ``s`` owns rows ``starts[s] : starts[s] + capacities[s]``, of which the first ``lengths[s]`` hold tokens.
    The packed batch alternates the segments with their spare rows (the *gap* after each, possibly empty), so that
    ``cu_seq_k`` is the interleaving of ``starts`` and ``starts + lengths``. Every gap gets a copy of its segment's
    queries, whose outputs are dropped: all sequences then have ``t`` queries, as flash attention's single-query GQA
    path needs. The key heads (one per segment) are fewer than the query heads, which flash attention takes as GQA.
    """
    n_segments, q_len, group, head_dim = segment_queries.shape
    packed_q = segment_queries[:, None].expand(n_segments, 2, q_len, group, head_dim).reshape(-1, group, head_dim)
    bounds = torch.stack([layer.starts, layer.starts + layer.lengths], dim=1).flatten()
    cu_k = torch.cat([bounds, end]).to(torch.int32)
    cu_q = torch.arange(2 * n_segments + 1, device=packed_q.device, dtype=torch.int32) * q_len
    extra = {"enable_gqa": True} if "enable_gqa" in (_parameters(function) or ()) else {}
    out = function(
        packed_q, keys, values, cu_q, cu_k, q_len, max(layer.head_capacities), scale=scaling, window_size=(-1, 0),
        **extra,
    )  # fmt: skip
    return out.view(n_segments, 2, q_len, group, head_dim)[:, 0].reshape(-1, group, head_dim)
