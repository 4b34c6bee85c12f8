"""Chunked prefill with eviction after every chunk (research/fastkvzip.md §3.2, the paper's deferred window).

The context is prefilled ``chunk_size`` tokens at a time. After each chunk, the tokens older than the last
``window`` ones are decided (kept or evicted) once and for all; the most recent ``window`` tokens are deferred and
judged with the next chunk, and the final window of the context is always kept. The first ``n_sink`` tokens are never
evicted. Sink and window count toward the budget: with target retention ``r = 1 - compression_ratio`` over ``n``
tokens, every decided span keeps the fraction ``r' = (r·n - n_sink - W) / (n - n_sink - W)`` of its evictable pairs,
so the whole context keeps about ``r·n`` pairs per head on average. Peak KV memory is about retained + one chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

logger = logging.getLogger(__name__)


@dataclass
class ChunkPlan:
    """Budget and progress of one chunked prefill.

    Attributes:
        context_length: n, tokens of the whole context.
        window: W, recent tokens deferred after each chunk (kept at the end), after budget adjustment.
        keep_fraction: r', fraction of each decided span's evictable pairs that is kept (ratio mode).
        chunk_end: logical position just after the chunk being prefilled.
        decided: tokens ``[0, decided)`` have been judged.
        pending: ``{layer_id: scores [H, P]}`` of each gated layer's undecided tail.
        kept_scores: ``{layer_id: per head, scores of the decided pairs kept}`` (chunks, in order).
    """

    context_length: int
    window: int
    keep_fraction: float
    chunk_end: int = 0
    decided: int = 0
    pending: dict[int, torch.Tensor] = field(default_factory=dict)
    kept_scores: dict[int, list[list[torch.Tensor]]] = field(default_factory=dict)

    @classmethod
    def for_ratio(cls, context_length: int, compression_ratio: float, n_sink: int, window: int) -> ChunkPlan:
        """Adjust the window so that it fits the budget, and derive the per-span keep fraction."""
        retained = (1.0 - compression_ratio) * context_length
        if retained < n_sink + window:
            window = max(0, int(retained) - n_sink)
            if retained < n_sink:
                logger.warning(
                    "compression_ratio %.3f cannot be met: the %d sink tokens alone exceed the budget",
                    compression_ratio,
                    n_sink,
                )
            return cls(context_length, window, 0.0)
        return cls(context_length, window, (retained - n_sink - window) / (context_length - n_sink - window))

    def n_to_evict(self, evictable: int) -> int:
        """Pairs to evict among ``evictable`` unprotected pairs of a decided span (ratio mode)."""
        return evictable - round(evictable * self.keep_fraction)

    def span_to_decide(self) -> int:
        """Tokens to judge now: all but the deferred window (the whole rest at the end of the context)."""
        return max(0, self.chunk_end - self.window - self.decided)


def chunked_forward(
    forward: Callable,
    model: PreTrainedModel,
    chunk_size: int,
    start_plan: Callable[[int], ChunkPlan],
    end_plan: Callable[[], None],
    *args,
    **kwargs,
):
    """Run a base model's ``forward`` on a long context chunk by chunk (sliced ids, mask, positions).

    Falls through to one plain call when the input is short, embeds are given, or the cache already holds tokens
    (questions, decoding). Returns the last chunk's output: hidden states cover the last chunk only.
    """
    if args:
        kwargs["input_ids"], args = args[0], args[1:]
    input_ids = kwargs.get("input_ids")
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None else 0
    if input_ids is None or kwargs.get("inputs_embeds") is not None or past > 0 or input_ids.shape[1] <= chunk_size:
        return forward(*args, **kwargs)
    attention_mask = kwargs.pop("attention_mask", None)
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError("chunked prefill slices 2-D attention masks only; pass a [batch, tokens] mask or none")
    position_ids = kwargs.pop("position_ids", None)
    cache_position = kwargs.pop("cache_position", None)
    if cache is None:
        kwargs["past_key_values"] = DynamicCache(config=model.config)
    n_tokens = input_ids.shape[1]
    plan = start_plan(n_tokens)
    output = None
    try:
        for start in range(0, n_tokens, chunk_size):
            end = min(n_tokens, start + chunk_size)
            plan.chunk_end = end
            kwargs["input_ids"] = input_ids[:, start:end]
            output = forward(
                *args,
                attention_mask=None if attention_mask is None else attention_mask[:, :end],
                position_ids=None if position_ids is None else position_ids[:, start:end],
                cache_position=None if cache_position is None else cache_position[start:end],
                **kwargs,
            )
    finally:
        end_plan()
    return output
