"""Where a compressed request's prompt is compacted, and what the request stores after each compaction.

Both engine processes derive it alike from the prompt length, the request's ratio and the engine's settings, so no
message passes between them: the scheduler cuts prefill steps at the compaction points and frees blocks after them,
the worker decides and moves pairs there. With ``chunk_size`` the prompt is compacted every ``chunk_size`` tokens
(the chunks of :class:`~fastkvzip_press.eviction.ChunkPlan`, aligned to the prompt's end; the last ``window``
tokens of each chunk wait for the next one), so that a prompt never sits whole in the pool; without it, once, when
its prefill completes.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from fastkvzip_press.eviction import ChunkPlan, Protection, RatioBudget


@dataclass(frozen=True)
class PromptSchedule:
    """Compaction points of one prompt.

    Attributes:
        ends: logical prompt positions after which a compaction runs, ascending; the last is the prompt's length.
        stored: tokens the request stores right after each compaction (kept pairs, then the undecided window).
    """

    ends: tuple[int, ...]
    stored: tuple[int, ...]

    @property
    def prompt_tokens(self) -> int:
        return self.ends[-1]

    @property
    def kept_tokens(self) -> int:
        """Prompt tokens every layer and KV head keeps once the prefill is over."""
        return self.stored[-1]

    def next_end(self, computed: int) -> int | None:
        """The first compaction point after ``computed`` logical tokens; ``None`` once the prompt is computed."""
        index = bisect_right(self.ends, computed)
        return self.ends[index] if index < len(self.ends) else None

    def discarded(self, computed: int) -> int:
        """Prompt tokens no longer stored once ``computed`` logical tokens are computed (and compacted)."""
        index = bisect_right(self.ends, computed) - 1
        return 0 if index < 0 else self.ends[index] - self.stored[index]

    def peak_tokens(self, computed: int, past_prompt: int = 0) -> int:
        """Most tokens the request stores from ``computed`` logical tokens on: right before each remaining compaction,
        and after the last with ``past_prompt`` tokens beyond the prompt (a resumed request's answer)."""
        peaks = [self.kept_tokens + past_prompt]
        for index, end in enumerate(self.ends):
            if end > computed:
                before = self.stored[index - 1] if index else 0
                peaks.append(before + end - (self.ends[index - 1] if index else 0))
        return max(peaks)


def prompt_schedule(
    prompt_tokens: int, ratio: float, protection: Protection, chunk_size: int | None = None
) -> PromptSchedule | None:
    """The schedule of a ``prompt_tokens``-token prompt at ``ratio`` under the uniform budget
    (:class:`RatioBudget` ``per_head``); ``None`` when nothing is evicted (ratio 0, or a prompt within the protected
    sink and window)."""
    budget = RatioBudget(ratio, per_head=True)
    if ratio == 0:
        return None
    one_pass = budget.kept_per_head(prompt_tokens, protection)
    if one_pass == prompt_tokens:
        return None
    if chunk_size is None or prompt_tokens <= chunk_size:
        return PromptSchedule((prompt_tokens,), (one_pass,))
    plan = ChunkPlan.start(prompt_tokens, budget, protection, chunk_size=chunk_size)
    ends, stored, kept = [], [], 0
    for end in plan.chunk_ends():
        plan.chunk_end = end
        (span,) = plan.spans()
        (decided,) = plan.decided
        sinks = max(0, min(span, protection.n_sink - decided))  # the span's share of the sink, never evicted
        kept += span - min(plan.budget.pairs_to_evict(span, span - sinks, 1, 0), span - sinks)
        plan.advance()
        ends.append(end)
        stored.append(kept + end - plan.decided[0])
    return PromptSchedule(tuple(ends), tuple(stored))
