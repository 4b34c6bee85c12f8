"""One request's prompt as the engine's prefill steps go by: the decision at each compaction point of its
:class:`~fastkvzip_press.vllm.schedule.RequestSchedule`, and the pairs each head then stores. Engine-independent
tensors, used alike by the worker and by the transformers reference.

Shapes: ``L`` layers, ``H`` KV heads, ``D`` head size, ``m`` tokens of a prefill step, ``P`` undecided tokens held,
``n`` pairs written by one compaction (over all heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastkvzip_press.eviction import decide
from fastkvzip_press.vllm.schedule import CompactionPoint, RequestSchedule


@dataclass
class HeadWrite:
    """What one compaction stores: every head keeps its first ``first[l, h]`` pairs, then holds ``keys`` /
    ``values`` ``[n, D]`` at positions ``position [n]`` of head (``layer [n]``, ``head [n]``): the pairs it kept of the
    span just decided, in prompt order, then the undecided window; afterwards it stores ``stored[l, h]`` pairs."""

    first: torch.Tensor  # [L, H]
    stored: torch.Tensor  # [L, H]
    layer: torch.Tensor  # [n]
    head: torch.Tensor  # [n]
    position: torch.Tensor  # [n]
    keys: torch.Tensor | None  # [n, D]
    values: torch.Tensor | None


@dataclass
class PointDecision:
    """The decision at one compaction point: ``kept [L, H, span]`` flags the span's pairs each head keeps."""

    point: CompactionPoint
    kept: torch.Tensor


class PromptCompaction:
    """One request's prompt: the gate scores (and, for the worker, the post-RoPE keys and values) of its undecided
    tokens, a :func:`~fastkvzip_press.eviction.decide` call at every point of its schedule, and the pairs each head
    keeps. The decisions are those of ``FastKVzipPress`` (``uniform=True`` under the uniform budget) with the same
    ``chunk_size``."""

    def __init__(self, schedule: RequestSchedule):
        self.schedule = schedule
        self.computed = 0  # prompt tokens taken
        self.scores: torch.Tensor | None = None  # [L, H, P]
        self.keys: torch.Tensor | None = None  # [L, P, H, D]
        self.values: torch.Tensor | None = None
        self.kept: list[torch.Tensor] = []  # per point, [L, H, span] bool
        self.n_kept: torch.Tensor | None = None  # [L, H] pairs kept so far

    @property
    def complete(self) -> bool:
        return self.computed >= self.schedule.prompt_tokens

    def add(
        self, scores: torch.Tensor, keys: torch.Tensor | None = None, values: torch.Tensor | None = None
    ) -> tuple[PointDecision, HeadWrite] | None:
        """Take a prefill step's tokens: scores ``[L, H, m]`` and keys and values ``[L, m, H, D]`` (the reference gives
        none); at a compaction point, decide and return the decision and what each head then stores."""
        end = self.schedule.next_end(self.computed)
        step = scores.shape[-1]
        if end is None or self.computed + step > end:
            raise RuntimeError(
                f"a prefill step of {step} tokens after {self.computed} crosses the compaction point {end}; "
                "the scheduler cuts steps there"
            )
        self.scores = _append(self.scores, scores, dim=-1)
        if keys is not None:
            self.keys, self.values = _append(self.keys, keys, 1), _append(self.values, values, 1)
        self.computed += step
        if self.computed < end:
            return None
        return self._compact(self.schedule.points[self.schedule.passed(end) - 1])

    def _compact(self, point: CompactionPoint) -> tuple[PointDecision, HeadWrite]:
        n_layers, heads, held = self.scores.shape
        span = point.span
        evicted = decide(self.scores[:, None, :, :span], point.budget, point.protection).evicted[:, 0]
        kept = ~evicted  # [L, H, span]
        device = kept.device
        first = torch.zeros(n_layers, heads, dtype=torch.long, device=device) if self.n_kept is None else self.n_kept
        total = int(first.sum() + kept.sum())
        if total != point.kept:
            raise AssertionError(f"compaction at {point.end} keeps {total} pairs, the schedule {point.kept}")
        window = torch.ones(n_layers, heads, held - span, dtype=torch.bool, device=device)
        stays = torch.cat([kept, window], dim=-1)  # [L, H, P]
        layer, head, column = stays.nonzero(as_tuple=True)  # layer-major, then head, then prompt order
        rank = stays.long().cumsum(-1) - 1  # each stored pair's index among its head's new rows
        position = first[layer, head] + rank[layer, head, column]
        write = HeadWrite(
            first=first,
            stored=first + stays.sum(-1),
            layer=layer,
            head=head,
            position=position,
            keys=None if self.keys is None else self.keys[layer, column, head],
            values=None if self.values is None else self.values[layer, column, head],
        )
        self.n_kept = first + kept.sum(-1)
        self.kept.append(kept)
        self.scores = self.scores[..., span:]
        if self.keys is not None:
            self.keys, self.values = self.keys[:, span:], self.values[:, span:]
        return PointDecision(point, kept), write

    def kept_indices(self) -> list[list[list[int]]]:
        """``[L][H]`` the prompt positions each head keeps, ascending (complete prompts)."""
        last = self.schedule.points[-1]
        window = list(range(last.end - last.undecided, last.end))
        decided = torch.cat(self.kept, dim=-1).cpu()  # [L, H, decided]: the spans are consecutive from position 0
        return [[head.nonzero()[:, 0].tolist() + window for head in layer] for layer in decided]


def _append(held: torch.Tensor | None, new: torch.Tensor, dim: int) -> torch.Tensor:
    return new if held is None else torch.cat([held, new], dim=dim)
