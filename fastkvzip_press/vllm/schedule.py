"""A compressed request's schedule: where its prompt is compacted, what each compaction decides, and what the
scheduler reserves for it after each.

Both engine processes derive it alike from the prompt length, the request's ratio and budget, and the engine's
settings (:meth:`RequestSchedule.build`), so no message passes between them: the scheduler cuts prefill steps at the
points and frees blocks after them, the worker decides and moves pairs there. The points and each span's budget are
those of ``FastKVzipPress(chunk_size=...)`` (:class:`~fastkvzip_press.eviction.ChunkPlan`: chunks aligned to the
prompt's end; the last ``window`` tokens of each chunk wait for the next one), or one point at the prompt's end.

Budgets: ``"global"`` is ``FastKVzipPress()``'s, one count over all layers and KV heads, so each head keeps what it
needs; ``"uniform"`` keeps the same count in every layer and head (``FastKVzipPress(uniform=True)``).

What the scheduler reserves: a request whose heads keep ``K`` pairs in all (over ``LH`` layers x heads) and store
``u`` undecided or later tokens each needs at most ``sum over heads of ceil((n_lh + u) / block)`` single-head blocks,
which is at most ``LH x ceil((ceil(K / LH) + block - 1 + u) / block)``: the scheduler counts the request as
``ceil(K / LH) + block - 1 + u`` tokens (``ceil(K / LH) + u`` under the uniform budget, where every head holds the
same count), so the worker's pool of ``LH`` single-head blocks per scheduler block is never oversubscribed, and a
compacted request holds at most its kept pairs' share of blocks plus one.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Literal

from fastkvzip_press.eviction import ChunkPlan, Protection, RatioBudget, SpanBudget

Budget = Literal["global", "uniform"]
BUDGETS: tuple[str, ...] = ("global", "uniform")


@dataclass(frozen=True)
class CompactionPoint:
    """One compaction of a prompt.

    Attributes:
        end: logical prompt position after which it runs (the prompt is computed up to here).
        decided: prompt positions decided at earlier points.
        span: positions decided here, ``[decided, decided + span)``; the rest up to ``end`` wait (the window).
        budget: how many of the span's pairs go (``decide``'s budget: over all layers x heads, or per head).
        protection: the span's protected pairs (``decide``'s protection).
        kept: pairs of the decided positions kept over all layers and KV heads once this point is passed.
    """

    end: int
    decided: int
    span: int
    budget: RatioBudget | SpanBudget
    protection: Protection
    kept: int

    @property
    def undecided(self) -> int:
        """Prompt tokens after the decided ones once this point is passed (every head stores them)."""
        return self.end - self.decided - self.span


@dataclass(frozen=True)
class RequestSchedule:
    """The compaction points of one prompt, and what the scheduler reserves between them.

    Attributes:
        points: in prompt order; the last ends at the prompt's end.
        heads: layers x KV heads the budget covers.
        slack: tokens reserved beyond the kept pairs' share (``block - 1`` when heads keep different counts).
        budget: ``"global"`` or ``"uniform"``.
    """

    points: tuple[CompactionPoint, ...]
    heads: int
    slack: int
    budget: Budget

    @classmethod
    def build(
        cls,
        prompt_tokens: int,
        ratio: float,
        budget: Budget,
        protection: Protection,
        chunk_size: int | None,
        heads: int,
        block_size: int,
    ) -> RequestSchedule | None:
        """The schedule of a ``prompt_tokens``-token prompt at ``ratio`` over ``heads`` layers x KV heads; ``None``
        when nothing is evicted (ratio 0, or a prompt within the protected sink and window)."""
        if ratio == 0 or prompt_tokens <= protection.n_sink + protection.window_pairs(prompt_tokens):
            return None
        uniform = budget == "uniform"
        plan = ChunkPlan.start(prompt_tokens, RatioBudget(ratio, per_head=uniform), protection, chunk_size=chunk_size)
        points, kept = [], 0
        for end in plan.chunk_ends():
            plan.chunk_end = end
            (span,) = plan.spans()
            (decided,) = plan.decided
            if plan.finished and plan.one_pass(0):  # the whole prompt decided at its end, as a one-pass prefill
                span_budget, span_protection = plan.one_pass_budget, protection
                protected = min(span, protection.n_sink + protection.window_pairs(span))
            else:
                span_budget, span_protection = plan.budget, Protection(protection.n_sink, 0, offset=decided)
                protected = max(0, min(span, protection.n_sink - decided))
            kept += _kept_pairs(span_budget, span, protected, heads, uniform)
            plan.advance()
            if span or plan.finished:
                points.append(CompactionPoint(end, decided, span, span_budget, span_protection, kept))
        if kept == heads * (points[-1].decided + points[-1].span):
            return None
        return cls(tuple(points), heads, 0 if uniform else block_size - 1, budget)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(point.end for point in self.points)

    @property
    def prompt_tokens(self) -> int:
        return self.points[-1].end

    @property
    def kept_pairs(self) -> int:
        """Prompt pairs kept over all layers and KV heads once the prompt is compacted (the final window included)."""
        return self.points[-1].kept + self.heads * self.points[-1].undecided

    def passed(self, computed: int) -> int:
        """How many points ``computed`` logical tokens have passed."""
        return bisect_right(self.ends, computed)

    def next_end(self, computed: int) -> int | None:
        """The first compaction point after ``computed`` logical tokens; ``None`` once the prompt is computed."""
        index = self.passed(computed)
        return self.points[index].end if index < len(self.points) else None

    def reserved_after(self, index: int) -> int:
        """Tokens the scheduler counts right after point ``index``: the kept pairs' share, slack, the window."""
        point = self.points[index]
        return -(-point.kept // self.heads) + self.slack + point.undecided

    def reserved_tokens(self, computed: int) -> int:
        """Tokens the scheduler counts for the request once ``computed`` logical tokens are computed (and
        compacted)."""
        index = self.passed(computed) - 1
        return computed if index < 0 else self.reserved_after(index) + computed - self.points[index].end

    def discarded(self, computed: int) -> int:
        """Logical tokens the request no longer counts once ``computed`` are computed (negative: it counts more, the
        slack that lets each head hold its own number of pairs)."""
        return computed - self.reserved_tokens(computed)

    def peak_tokens(self, computed: int, past_prompt: int = 0) -> int:
        """Most tokens the request counts from ``computed`` logical tokens on: right before each remaining compaction,
        and after the last with ``past_prompt`` tokens beyond the prompt (a resumed request's answer)."""
        peaks = [self.reserved_after(len(self.points) - 1) + past_prompt]
        for index, point in enumerate(self.points):
            if point.end > computed:
                previous = self.points[index - 1] if index else None
                before = self.reserved_after(index - 1) - previous.end if previous else 0
                peaks.append(before + point.end)
        return max(peaks)


def _kept_pairs(budget: RatioBudget | SpanBudget, span: int, protected: int, heads: int, uniform: bool) -> int:
    """Pairs a span of ``span`` tokens keeps over ``heads`` layers x heads under ``budget``, as
    :func:`~fastkvzip_press.eviction.decide` counts them (``protected`` pairs per head are never evicted)."""
    groups, per_group = (heads, 1) if uniform else (1, heads)
    pairs, evictable = span * per_group, (span - protected) * per_group
    evicted = max(0, min(budget.pairs_to_evict(pairs, evictable, per_group, 0), evictable))
    return heads * span - groups * evicted
