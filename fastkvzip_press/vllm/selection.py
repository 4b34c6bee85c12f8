"""One request's prompt as the engine's prefill steps go by, and the pairs it keeps: engine-independent tensors.

Shapes: ``L`` gated layers (every attention layer), ``H`` KV heads, ``D`` head size, ``T`` prompt tokens, ``m``
tokens of a step or a write, ``k`` pairs kept per (layer, head) of a decided span, ``n`` of the whole prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastkvzip_press.eviction import ChunkPlan, Protection, RatioBudget
from fastkvzip_press.vllm.schedule import PromptSchedule


@dataclass
class ChunkWrite:
    """What one compaction stores: ``keys``/``values`` ``[L, m, H, D]`` for the request's slots ``[first, first + m)``
    (row ``j`` holds each head's ``j``-th kept pair, then the undecided tokens, every head alike), after which the
    request stores ``stored = first + m`` tokens; ``kept_indices`` ``[L, H, k]``: the prompt positions each head kept
    of the span just decided."""

    first: int
    keys: torch.Tensor
    values: torch.Tensor
    kept_indices: torch.Tensor

    @property
    def stored(self) -> int:
        return self.first + self.keys.shape[1]


class PromptCompaction:
    """One request's prompt as the engine's prefill steps go by: gate scores and post-RoPE keys and values of its
    undecided tokens, and a decision at every compaction point of its
    :class:`~fastkvzip_press.vllm.schedule.PromptSchedule` (the core's :class:`~fastkvzip_press.eviction.ChunkPlan`
    with a per-head :class:`~fastkvzip_press.eviction.RatioBudget`: every (layer, head) keeps the same count, each
    head its own tokens)."""

    def __init__(self, schedule: PromptSchedule, ratio: float, protection: Protection, chunk_size: int | None):
        self.schedule = schedule
        budget = RatioBudget(ratio, per_head=True)
        self.plan = ChunkPlan.start(schedule.prompt_tokens, budget, protection, chunk_size=chunk_size)
        self.computed = 0  # prompt tokens captured
        self.n_kept = 0  # pairs kept so far, stored before the undecided tokens
        self.keys: torch.Tensor | None = None  # [L, P, H, D] of the undecided tokens
        self.values: torch.Tensor | None = None
        self.kept: list[torch.Tensor] = []  # [L, H, k] prompt positions kept, per decided span

    @property
    def complete(self) -> bool:
        return self.computed >= self.schedule.prompt_tokens

    def add(self, scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> ChunkWrite | None:
        """Take a prefill step's tokens: scores ``[L, H, m]``, keys and values ``[L, m, H, D]``; at a compaction point,
        decide and return what to store."""
        end = self.schedule.next_end(self.computed)
        if end is None or self.computed + keys.shape[1] > end:
            raise RuntimeError(
                f"a prefill step of {keys.shape[1]} tokens after {self.computed} crosses the compaction point {end}; "
                "the scheduler cuts steps there"
            )
        for layer_id, layer_scores in enumerate(scores):
            self.plan.add_scores(layer_id, layer_scores[None])
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys], dim=1)
        self.values = values if self.values is None else torch.cat([self.values, values], dim=1)
        self.computed += keys.shape[1]
        return self._compact(end) if self.computed == end else None

    def _compact(self, end: int) -> ChunkWrite:
        plan = self.plan
        plan.chunk_end = end
        (span,) = plan.spans()
        (decided,) = plan.decided
        n_layers, _, heads, _ = self.keys.shape
        if span:
            evicted = plan.decide_span(list(range(n_layers))).evicted[:, 0, :, :span]  # [L, H, span]
            kept = (~evicted).nonzero()[:, 2].view(n_layers, heads, -1)  # ascending per (layer, head)
        else:
            kept = torch.zeros(n_layers, heads, 0, dtype=torch.long, device=self.keys.device)
        plan.advance()
        index = torch.arange(heads, device=kept.device)[:, None]
        kept_keys = torch.stack([layer[kept[i], index] for i, layer in enumerate(self.keys)]).transpose(1, 2)
        kept_values = torch.stack([layer[kept[i], index] for i, layer in enumerate(self.values)]).transpose(1, 2)
        self.keys, self.values = self.keys[:, span:], self.values[:, span:]
        write = ChunkWrite(
            first=self.n_kept,
            keys=torch.cat([kept_keys, self.keys], dim=1).contiguous(),
            values=torch.cat([kept_values, self.values], dim=1).contiguous(),
            kept_indices=kept + decided,
        )
        self.n_kept += kept.shape[-1]
        self.kept.append(write.kept_indices)
        expected = self.schedule.stored[self.schedule.ends.index(end)]
        if write.stored != expected:
            raise AssertionError(f"compaction at {end} stores {write.stored} tokens, the schedule {expected}")
        return write

    def kept_indices(self) -> torch.Tensor:
        """``[L, H, n]`` every prompt position each (layer, head) keeps, ascending (complete prompts)."""
        n_layers, heads = self.kept[0].shape[:2]
        positions = torch.arange(self.plan.decided[0], self.schedule.prompt_tokens, device=self.kept[0].device)
        window = positions.expand(n_layers, heads, -1)
        return torch.cat([*self.kept, window], dim=-1)
