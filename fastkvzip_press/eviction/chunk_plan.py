"""Budget and progress of a chunked prefill with eviction after every chunk (research/fastkvzip.md §3.2).

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
        return SpanBudget(0.0, budget.layerwise), max(0, int(retained) - n_sink)
    keep = (retained - n_sink - window) / (context_length - n_sink - window)
    return SpanBudget(keep, budget.layerwise), window


@dataclass
class ChunkPlan:
    """One chunked prefill: what has been decided, what is pending, and the budget of each span.

    Attributes:
        context_length: n, tokens of the whole context.
        window: W, recent tokens deferred after each chunk (kept at the end), after budget adjustment.
        budget: the per-span budget (:class:`SpanBudget`) or the threshold.
        n_sink: leading tokens never evicted.
        chunk_end: position just after the chunk being prefilled.
        decided: tokens ``[0, decided)`` have been judged.
        pending: ``{layer_id: scores [B, H, P]}`` of each gated layer's undecided tail (the last ``P`` tokens).
    """

    context_length: int
    window: int
    budget: SpanBudget | ThresholdBudget
    n_sink: int = 0
    chunk_end: int = 0
    decided: int = 0
    pending: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def start(cls, context_length: int, budget: RatioBudget | ThresholdBudget, protection: Protection) -> ChunkPlan:
        """Plan a context of ``context_length`` tokens (raises when sink and window leave nothing to evict)."""
        window = protection.require_room(context_length)
        if isinstance(budget, ThresholdBudget):
            return cls(context_length, window, budget, protection.n_sink)
        span, window = span_budget(context_length, budget, protection.n_sink, window)
        return cls(context_length, window, span, protection.n_sink)

    @property
    def finished(self) -> bool:
        """Whether the chunk being prefilled is the context's last."""
        return self.chunk_end == self.context_length

    def add_scores(self, layer_id: int, scores: torch.Tensor) -> None:
        """Append the scores ``[B, H, t]`` of a chunk's tokens to ``layer_id``'s undecided tail."""
        previous = self.pending.get(layer_id)
        self.pending[layer_id] = scores if previous is None else torch.cat([previous, scores], dim=-1)

    def span_to_decide(self) -> int:
        """Tokens to judge now: all undecided ones but the deferred window (the whole rest at the end of the context
        is kept, so nothing more is decided there)."""
        return max(0, self.chunk_end - self.window - self.decided)

    def decide_span(self, layer_ids: list[int]) -> Decision:
        """Decide the oldest :meth:`span_to_decide` pending tokens of every layer at once (one selection over the
        layers x heads, or one per layer); ``evicted`` is ``[L, B, H, span]``."""
        n_span = self.span_to_decide()
        spans = torch.stack([self.pending[layer_id][..., :n_span] for layer_id in layer_ids])
        return decide(spans, self.budget, Protection(self.n_sink, 0, offset=self.decided))

    def advance(self, n_span: int) -> None:
        """Mark the oldest ``n_span`` pending tokens of every layer as decided."""
        for layer_id, scores in self.pending.items():
            self.pending[layer_id] = scores[..., n_span:]
        self.decided += n_span
