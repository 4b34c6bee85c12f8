"""The eviction decision: which KV pairs to evict, from gate scores, a budget and protection.

One-pass prefill, chunked prefill and decoding all call :func:`decide`; nothing else decides.

Shapes: scores are ``[L, B, H, N]``: layers, sequences, KV heads and candidate pairs (higher = keep). ``valid``
(broadcastable to the scores) marks the pairs that exist: padding of a batch, or the unused tail of a head that holds
fewer pairs than the longest (decoding over ragged heads), is never evicted, never protected and never counted in a
budget. Each row ``(layer, sequence, head)`` counts its own pairs in order, so sink and window are each sequence's (or
each head's) own first and last pairs.

Budgets are computed per sequence, over all its layers x heads or, with ``layerwise``, per layer. A count budget
evicts the lowest-scored unprotected pairs (exactly: equal scores go to the lower flat index in (layer, head, pair)
order); when protection leaves too little room the decision says how many pairs it could not evict (``shortfall``)
and the caller warns or refuses. All groups of a batch go through one
:func:`~fastkvzip_press.triton.select_smallest_rows` call (a radix select on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastkvzip_press.triton import select_smallest_rows

INF = float("inf")


# ---------------------------------------------------------------------------------------------------- protection


@dataclass(frozen=True)
class Protection:
    """Pairs of every row that are never evicted; they still count toward count budgets.

    Attributes:
        n_sink: the row's first ``n_sink`` pairs (attention sinks).
        window: the row's last pairs: an int counts pairs (0 = none); a float in (0, 1) is a fraction of the row's
            own length, at least one pair.
        offset: own index of the first candidate when earlier pairs of the row were decided before (a chunk span
            starts after them), so that sinks protect only the row's very first pairs; one value, or one per sequence.
    """

    n_sink: int = 0
    window: int | float = 0
    offset: int | tuple[int, ...] = 0

    def __post_init__(self):
        offsets = self.offset if isinstance(self.offset, tuple) else (self.offset,)
        if self.n_sink < 0 or any(offset < 0 for offset in offsets):
            raise ValueError(f"n_sink and offset must be >= 0, got {self.n_sink} and {self.offset}")
        if isinstance(self.window, float) and not 0 < self.window < 1:
            raise ValueError(f"a float window is a fraction of the context in (0, 1), got {self.window}")
        if isinstance(self.window, int) and self.window < 0:
            raise ValueError(f"window must be >= 0 pairs, got {self.window}")

    def window_pairs(self, length: int) -> int:
        """Protected recent pairs of a row holding ``length`` pairs."""
        if isinstance(self.window, float):
            return max(1, int(self.window * length))
        return self.window

    def require_room(self, length: int) -> int:
        """The window for a context of ``length`` tokens, after checking that something outside sink and window
        remains to evict (a clear error instead of a silent no-op on an empty or tiny context)."""
        window = self.window_pairs(length)
        if length <= self.n_sink + window:
            raise ValueError(
                f"the context has {length} tokens, not more than the protected n_sink={self.n_sink} + "
                f"window={window}; nothing could be evicted. Use a longer context or smaller n_sink/window_size."
            )
        return window

    def mask(self, valid: torch.Tensor) -> torch.Tensor:
        """Protected pairs ``[..., N]`` (bool) of rows whose existing pairs are ``valid [..., N]``; per-sequence
        offsets need rows laid out ``[L, B, H, N]``."""
        own = valid.cumsum(-1) - 1  # index of each pair among its row's pairs
        length = valid.sum(-1, keepdim=True)
        offset = self.offset
        if isinstance(offset, tuple):
            offset = torch.tensor(offset, device=valid.device).view(1, -1, 1, 1)
        protected = own + offset < self.n_sink
        if isinstance(self.window, float):
            # float64 like Python's int(fraction * length), at least one pair
            window = (length.double() * self.window).floor().long().clamp(min=1)
            protected |= own >= length - window
        elif self.window > 0:
            protected |= own >= length - self.window
        return protected & valid


# ------------------------------------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class RatioBudget:
    """Evict ``int(ratio x pairs)`` of each sequence's pairs (kvpress's ``compression_ratio``, fraction removed);
    protected pairs count toward it. ``layerwise``: that count in every layer; ``per_head``: in every (layer, KV
    head), so all keep the same number of pairs, each head its own (the budget of an engine holding one length per
    request)."""

    ratio: float
    layerwise: bool = False
    per_head: bool = False

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"compression_ratio is the fraction removed, in [0, 1); got {self.ratio}")

    def pairs_to_evict(self, pairs: int, evictable: int, heads: int, sequence: int) -> int:
        return int(pairs * self.ratio)

    def kept_per_head(self, length: int, protection: Protection) -> int:
        """Pairs every (layer, head) of a ``length``-token sequence keeps under ``per_head``, without running
        :func:`decide`: what an engine must reserve before the scores exist (protected pairs are never evicted)."""
        protected = min(length, protection.n_sink + protection.window_pairs(length))
        return length - min(int(length * self.ratio), length - protected)


@dataclass(frozen=True)
class SpanBudget:
    """Keep ``keep_fraction`` of a chunk span's unprotected pairs (the chunk plan's adjusted budget); one fraction,
    or one per sequence."""

    keep_fraction: float | tuple[float, ...]
    layerwise: bool = False
    per_head: bool = False

    def __post_init__(self):
        fractions = self.keep_fraction if isinstance(self.keep_fraction, tuple) else (self.keep_fraction,)
        if any(not 0 <= fraction <= 1 for fraction in fractions):
            raise ValueError(f"keep_fraction must be in [0, 1], got {self.keep_fraction}")

    def fraction(self, sequence: int) -> float:
        if isinstance(self.keep_fraction, tuple):
            return self.keep_fraction[sequence]
        return self.keep_fraction

    def pairs_to_evict(self, pairs: int, evictable: int, heads: int, sequence: int) -> int:
        return evictable - round(evictable * self.fraction(sequence))


@dataclass(frozen=True)
class HeadTargetBudget:
    """Keep at most ``pairs_per_head`` pairs per (layer, head) on average: evict a sequence's excess over
    ``pairs_per_head x heads`` (decoding). One value for every sequence, or one per sequence."""

    pairs_per_head: int | tuple[int, ...]
    layerwise: bool = False

    def __post_init__(self):
        targets = self.pairs_per_head if isinstance(self.pairs_per_head, tuple) else (self.pairs_per_head,)
        if any(target < 0 for target in targets):
            raise ValueError(f"pairs_per_head must be >= 0, got {self.pairs_per_head}")

    def target(self, sequence: int) -> int:
        if isinstance(self.pairs_per_head, tuple):
            return self.pairs_per_head[sequence]
        return self.pairs_per_head

    def pairs_to_evict(self, pairs: int, evictable: int, heads: int, sequence: int) -> int:
        return max(0, pairs - self.target(sequence) * heads)


@dataclass(frozen=True)
class ThresholdBudget:
    """Evict every unprotected pair whose score is below ``threshold`` (adaptive: the ratio is what it is)."""

    threshold: float

    def __post_init__(self):
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold compares with gate scores in (0, 1); got {self.threshold}")


CountBudget = RatioBudget | SpanBudget | HeadTargetBudget
Budget = CountBudget | ThresholdBudget


# ------------------------------------------------------------------------------------------------------ decision


@dataclass
class Decision:
    """What :func:`decide` chose.

    Attributes:
        evicted: ``[L, B, H, N]`` bool, the pairs to evict (never a protected or missing pair).
        kept: ``[L, B, H]`` long, pairs each row keeps.
        evicted_per_sequence: ``[B]`` pairs evicted from each sequence.
        shortfall: ``[B]`` pairs each sequence's budget asked for that protection did not leave to evict.
    """

    evicted: torch.Tensor
    kept: torch.Tensor
    evicted_per_sequence: list[int]
    shortfall: list[int]

    @property
    def met(self) -> bool:
        """Whether every sequence's budget was met."""
        return not any(self.shortfall)


def _groups(budget: CountBudget, n_layers: int, heads: int) -> list[tuple[slice, slice]]:
    """The (layers, heads) each selection of a sequence covers: all of them, one layer, or one (layer, head)."""
    if getattr(budget, "per_head", False):
        return [(slice(layer, layer + 1), slice(head, head + 1)) for layer in range(n_layers) for head in range(heads)]
    if budget.layerwise:
        return [(slice(layer, layer + 1), slice(0, heads)) for layer in range(n_layers)]
    return [(slice(0, n_layers), slice(0, heads))]


def decide(
    scores: torch.Tensor,
    budget: Budget,
    protection: Protection = Protection(),
    valid: torch.Tensor | None = None,
) -> Decision:
    """Choose the pairs to evict.

    Args:
        scores: ``[L, B, H, N]`` keep scores (any float dtype; compared in fp32).
        budget: how many pairs (or which scores) to evict; see :class:`RatioBudget`, :class:`SpanBudget`,
            :class:`HeadTargetBudget` and :class:`ThresholdBudget`.
        protection: pairs never evicted.
        valid: bool mask broadcastable to ``scores``; ``None``: every pair exists.
    """
    if scores.dim() != 4:
        raise ValueError(f"scores must be [layers, sequences, heads, pairs], got shape {tuple(scores.shape)}")
    n_layers, bsz, heads, _ = scores.shape
    if valid is None:
        valid = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    else:
        valid = valid.to(device=scores.device, dtype=torch.bool).expand(scores.shape)
    candidates = scores.float().masked_fill(protection.mask(valid) | ~valid, INF)
    shortfall = [0] * bsz
    if isinstance(budget, ThresholdBudget):
        evicted = candidates < budget.threshold
        kept = (valid & ~evicted).sum(-1)
        return Decision(evicted, kept, evicted.sum(dim=(0, 2, 3)).tolist(), shortfall)
    evicted = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    # Pairs and evictable pairs of every (layer, sequence, head), read on the host in one go.
    pairs, evictable = torch.stack([valid.sum(-1), torch.isfinite(candidates).sum(-1)]).tolist()
    rows, counts, places = [], [], []
    per_sequence = [0] * bsz
    for sequence in range(bsz):
        for layers, head_slice in _groups(budget, n_layers, heads):
            n_pairs = sum(sum(per_head[sequence][head_slice]) for per_head in pairs[layers])
            n_evictable = sum(sum(per_head[sequence][head_slice]) for per_head in evictable[layers])
            slots = len(pairs[layers]) * len(range(heads)[head_slice])
            wanted = budget.pairs_to_evict(n_pairs, n_evictable, slots, sequence)
            n_evict = max(0, min(wanted, n_evictable))
            shortfall[sequence] += wanted - n_evict
            per_sequence[sequence] += n_evict  # the selection evicts exactly that many
            rows.append(candidates[layers, sequence, head_slice].reshape(-1))
            counts.append(n_evict)
            places.append((layers, sequence, head_slice))
    # One selection for the whole batch: every (sequence[, layer[, head]]) group is a row with its own count.
    _, chosen = select_smallest_rows(torch.stack(rows), torch.tensor(counts, dtype=torch.int64))
    for (layers, sequence, head_slice), row in zip(places, chosen):
        evicted[layers, sequence, head_slice] = row.view(evicted[layers, sequence, head_slice].shape)
    kept = (valid & ~evicted).sum(-1)
    return Decision(evicted=evicted, kept=kept, evicted_per_sequence=per_sequence, shortfall=shortfall)


def keep_largest(scores: torch.Tensor, n_kept: int) -> torch.Tensor:
    """``[..., N]`` bool: the ``n_kept`` largest scores of every row.

    The rule of :func:`decide`: a row evicts its ``N - n_kept`` smallest scores, the lower index first among equal
    ones, so what a row keeps depends on that row alone, never on its neighbours in a batch or on how a library
    orders equal values (``topk`` does that differently for different vector widths).
    """
    n_pairs = scores.shape[-1]
    if n_kept >= n_pairs:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    rows = scores.reshape(-1, n_pairs).float().contiguous()
    to_evict = torch.full((rows.shape[0],), n_pairs - max(n_kept, 0), dtype=torch.int64)  # known here, on the host
    _, evicted = select_smallest_rows(rows, to_evict)
    return ~evicted.view(scores.shape)
