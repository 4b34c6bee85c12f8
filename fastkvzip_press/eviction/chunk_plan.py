"""Budget and progress of a chunked prefill with eviction after every chunk.

The method: docs/method.md#chunked-prefill-the-span-budget.

The context is prefilled ``chunk_size`` tokens at a time. After each chunk, the tokens older than the last ``window``
ones are decided (kept or evicted) once and for all; the most recent ``window`` tokens are deferred and judged with the
next chunk, and the final window of the context is always kept. The first ``n_sink`` tokens are never evicted. Sink
and window count toward the budget: with target retention ``r = 1 - compression_ratio`` over ``n`` tokens, every
decided span keeps the fraction ``r' = (r·n - n_sink - W) / (n - n_sink - W)`` of its unprotected pairs, so the whole
context keeps about ``r·n`` pairs per head on average. Peak KV memory is about retained + one chunk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fastkvzip_press.eviction.decision import (
    Decision,
    Protection,
    RatioBudget,
    SpanBudget,
    ThresholdBudget,
    decide,
)

logger = logging.getLogger(__name__)


def span_budget(context_length: int, budget: RatioBudget, n_sink: int, window: int) -> tuple[SpanBudget, int]:
    """The per-span budget and the deferred window for a ratio over ``context_length`` tokens.

    When sink and window alone exceed the retained pairs, the window shrinks to what the budget leaves and every span
    evicts all its unprotected pairs (a warning says when even the sink does not fit).
    """
    retained = (1.0 - budget.ratio) * context_length
    if retained < n_sink + window:
        if retained < n_sink:
            logger.warning(
                "compression_ratio %.3f cannot be met: the %d sink tokens alone exceed the budget", budget.ratio, n_sink
            )
        return SpanBudget(0.0, budget.layerwise, budget.per_head), max(0, int(retained) - n_sink)
    keep = (retained - n_sink - window) / (context_length - n_sink - window)
    return SpanBudget(keep, budget.layerwise, budget.per_head), window


@dataclass
class TailEviction:
    """One layer's decision over the undecided tails of its sequences, laid out right-aligned.

    Sequence ``b``'s undecided tokens (the last ``tail[b]`` rows of each of its segments in the cache) are the last
    ``tail[b]`` columns of ``evicted``, ``padding`` and ``scores``; earlier columns are not part of its tail.

    Attributes:
        evicted: ``[B, H, P]`` pairs to evict.
        padding: ``[B, P]`` padding among the decided tokens (dropped too, never counted), or ``None``.
        tail: ``[B]`` undecided tokens per sequence.
        scores: ``[B, H, P]`` gate scores of the same columns, or ``None``.
    """

    evicted: torch.Tensor
    padding: torch.Tensor | None
    tail: list[int]
    scores: torch.Tensor | None = None

    @classmethod
    def whole(cls, evicted: torch.Tensor, padding: torch.Tensor | None, scores: torch.Tensor | None) -> TailEviction:
        """A decision over every token of a context (one-pass prefill): the tail is the whole context."""
        bsz, _, n_tokens = evicted.shape
        return cls(evicted, padding, [n_tokens] * bsz, scores)


@dataclass
class ChunkPlan:
    """One chunked prefill: what has been decided, what is pending, and the budget of each span, per sequence.

    Chunks are aligned to the end of the context (the first one takes the remainder), so in a left-padded batch every
    sequence meets the chunk ends at the same of its own tokens, and the same of its tokens share a forward, as alone.
    A sequence's leading padding is dropped as soon as it is prefilled; a sequence no longer than a chunk is decided
    at the end, in one pass, as the prefill of a short context is.

    Attributes:
        context_length: T, positions of the (padded) context.
        chunk_size: tokens of a chunk.
        windows: per sequence, W, recent tokens deferred after each chunk (kept at the end), after budget adjustment.
        budget: the per-span budget (:class:`SpanBudget`, one keep fraction per sequence) or the threshold.
        protection: the press's sink and window, which the one-pass decisions of short sequences use.
        one_pass_budget: the press's own budget, for those.
        padding: ``[B, T]`` padding positions, or ``None``.
        chunk_end: position just after the forward being prefilled.
        decided: per sequence, positions ``[0, decided)`` have been judged.
        pending: ``{layer_id: scores [B, H, P]}`` of positions ``[chunk_end - P, chunk_end)``, which hold every
            sequence's undecided tail.
    """

    context_length: int
    chunk_size: int
    windows: list[int]
    budget: SpanBudget | ThresholdBudget
    protection: Protection
    one_pass_budget: RatioBudget | ThresholdBudget
    padding: torch.Tensor | None = None
    chunk_end: int = 0
    decided: list[int] = field(default_factory=list)
    pending: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        context_length: int,
        budget: RatioBudget | ThresholdBudget,
        protection: Protection,
        padding: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> ChunkPlan:
        """Plan a context of ``context_length`` positions for ``B`` sequences, ``padding [B, T]`` marking padding
        (``None``: one sequence), prefilled
        ``chunk_size`` tokens at a time (default: all at once); raises when sink and window leave nothing to evict in
        a sequence."""
        chunk_size = chunk_size or context_length
        lengths = [context_length] if padding is None else (context_length - padding.sum(-1)).tolist()
        if padding is not None and not padding.any():
            padding = None  # a batch of equal lengths
        windows, fractions = [], []
        for length in lengths:
            window = protection.require_room(length)
            if isinstance(budget, RatioBudget) and length > chunk_size:
                span, window = span_budget(length, budget, protection.n_sink, window)
                fractions.append(span.keep_fraction)
            else:
                fractions.append(1.0)  # a threshold, or a sequence decided in one pass
            windows.append(window)
        span = budget
        if isinstance(budget, RatioBudget):
            span = SpanBudget(
                fractions[0] if len(fractions) == 1 else tuple(fractions), budget.layerwise, budget.per_head
            )
        plan = cls(context_length, chunk_size, windows, span, protection, budget, padding)
        plan.decided = [0] * len(lengths)
        return plan

    @property
    def n_sink(self) -> int:
        return self.protection.n_sink

    @property
    def finished(self) -> bool:
        """Whether the forward being prefilled is the context's last."""
        return self.chunk_end == self.context_length

    @property
    def lead(self) -> list[int]:
        """Leading padding tokens of each sequence (where its own tokens start)."""
        if self.padding is None:
            return [0] * len(self.decided)
        real = ~self.padding
        first = real.long().argmax(-1)
        return torch.where(real.any(-1), first, torch.full_like(first, self.context_length)).tolist()

    def one_pass(self, sequence: int) -> bool:
        """Whether ``sequence`` is no longer than a chunk, so decided once, at the end of the context."""
        return self.context_length - self.lead[sequence] <= self.chunk_size

    def chunk_ends(self) -> list[int]:
        """Where the forwards end: every ``chunk_size`` positions counted back from the end of the context."""
        return list(range(self.context_length, 0, -self.chunk_size))[::-1]

    def add_scores(self, layer_id: int, scores: torch.Tensor) -> None:
        """Append the scores ``[B, H, t]`` of a forward's tokens to ``layer_id``'s pending scores."""
        previous = self.pending.get(layer_id)
        self.pending[layer_id] = scores if previous is None else torch.cat([previous, scores], dim=-1)

    def spans(self) -> list[int]:
        """Tokens each sequence judges now: all undecided ones but its deferred window (at the end of the context the
        window is kept, so nothing more is decided there; a sequence decided in one pass judges everything at the
        end and nothing before). Leading padding is judged at once, so that no padding waits in the cache for later
        chunks to attend to."""
        spans = []
        for b, (window, decided, lead) in enumerate(zip(self.windows, self.decided, self.lead)):
            end = min(lead, self.chunk_end)
            if self.one_pass(b):
                end = self.context_length if self.finished else end
            elif self.chunk_end > lead:
                end = max(end, self.chunk_end - window)
            spans.append(max(0, end - decided))
        return spans

    def _own_decided(self) -> list[int]:
        """Tokens of each sequence, padding excluded, decided so far (where its sinks stand)."""
        if self.padding is None:
            return list(self.decided)
        return [int((~self.padding[b, :decided]).sum()) for b, decided in enumerate(self.decided)]

    def decide_span(self, layer_ids: list[int]) -> Decision:
        """Decide each sequence's span (:meth:`spans`) in every layer at once: one selection over the layers x heads
        per sequence, or one per layer. ``evicted`` is ``[L, B, H, N]``, sequence ``b``'s span in its first
        ``spans()[b]`` columns."""
        spans = self.spans()
        width = max(spans, default=0)
        first = next(iter(self.pending.values()))
        bsz, heads, n_pending = first.shape
        scores = torch.zeros(len(layer_ids), bsz, heads, width, device=first.device)
        valid = torch.zeros(1, bsz, 1, width, dtype=torch.bool, device=first.device)
        for b, (n_span, decided) in enumerate(zip(spans, self.decided)):
            begin = n_pending - (self.chunk_end - decided)  # the sequence's first undecided column
            for index, layer_id in enumerate(layer_ids):
                scores[index, b, :, :n_span] = self.pending[layer_id][b, :, begin : begin + n_span]
            valid[0, b, 0, :n_span] = True
            if self.padding is not None:
                valid[0, b, 0, :n_span] &= ~self.padding[b, decided : decided + n_span].to(first.device)
        own = self._own_decided()
        offset = own[0] if bsz == 1 else tuple(own)
        one_pass = [self.finished and self.one_pass(b) for b in range(bsz)]
        full = self.padding is None and len(set(spans)) == 1
        in_one_pass = torch.tensor(one_pass, device=first.device).view(1, -1, 1, 1)
        chunked = decide(
            scores,
            self.budget,
            Protection(self.n_sink, 0, offset=offset),
            None if full and not any(one_pass) else valid & ~in_one_pass,
        )
        if not any(one_pass):
            return chunked
        # Short sequences: the one-pass decision of their whole context, as alone.
        whole = decide(scores, self.one_pass_budget, self.protection, valid & in_one_pass)
        return Decision(
            evicted=chunked.evicted | whole.evicted,
            kept=chunked.kept + whole.kept,  # each counts its own sequences only
            evicted_per_sequence=[x + y for x, y in zip(chunked.evicted_per_sequence, whole.evicted_per_sequence)],
            shortfall=[x + y for x, y in zip(chunked.shortfall, whole.shortfall)],
        )

    def tail_eviction(self, layer_id: int, evicted: torch.Tensor) -> TailEviction:
        """How ``layer_id``'s decision (``evicted [B, H, N]`` from :meth:`decide_span`) applies to its cache."""
        scores = self.pending[layer_id]
        bsz, heads, n_pending = scores.shape
        placed = torch.zeros(bsz, heads, n_pending, dtype=torch.bool, device=scores.device)
        padding = None if self.padding is None else torch.zeros(bsz, n_pending, dtype=torch.bool, device=scores.device)
        for b, (n_span, decided) in enumerate(zip(self.spans(), self.decided)):
            begin = n_pending - (self.chunk_end - decided)
            placed[b, :, begin : begin + n_span] = evicted[b, :, :n_span]
            if padding is not None:
                padding[b, begin : begin + n_span] = self.padding[b, decided : decided + n_span]
        return TailEviction(placed, padding, [self.chunk_end - decided for decided in self.decided], scores)

    def advance(self) -> None:
        """Mark every sequence's span decided, and forget the pending scores no sequence needs any more."""
        self.decided = [decided + n_span for decided, n_span in zip(self.decided, self.spans())]
        keep = self.chunk_end - min(self.decided)
        for layer_id, scores in self.pending.items():
            self.pending[layer_id] = scores[..., scores.shape[-1] - keep :]
