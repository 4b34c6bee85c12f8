"""One request's prompt as the engine's prefill chunks go by, and the pairs it keeps: engine-independent tensors.

Shapes: ``L`` gated layers (every attention layer), ``H`` KV heads, ``D`` head size, ``T`` prompt tokens, ``n``
tokens kept per (layer, head).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastkvzip_press.eviction import Protection, RatioBudget, decide


@dataclass
class PromptCapture:
    """Gate scores and post-RoPE keys and values of a request's prompt, chunk by chunk, until its prefill ends.

    Attributes:
        prompt_tokens: ``T``.
        scores: chunks of ``[L, H, m]`` fp32 keep scores.
        keys, values: chunks of ``[L, m, H, D]``.
        captured: tokens captured so far (those past the prompt too: a request recomputed after preemption
            re-prefills its answer tokens in the chunk that ends its prompt).
    """

    prompt_tokens: int
    scores: list[torch.Tensor] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    captured: int = 0

    def add(self, scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append one chunk: scores ``[L, H, m]``, keys and values ``[L, m, H, D]``."""
        self.scores.append(scores)
        self.keys.append(keys)
        self.values.append(values)
        self.captured += keys.shape[1]

    @property
    def complete(self) -> bool:
        return self.captured >= self.prompt_tokens

    def compacted(self, ratio: float, protection: Protection) -> CompactedPrompt:
        """The kept pairs, every (layer, head) the same count, each head its own tokens (the core's
        :func:`~fastkvzip_press.eviction.decide` with a per-head :class:`~fastkvzip_press.eviction.RatioBudget`),
        followed by the captured tokens past the prompt, all kept."""
        n_prompt = self.prompt_tokens
        scores = torch.cat(self.scores, dim=-1)[..., :n_prompt]  # [L, H, T]
        keys = torch.cat(self.keys, dim=1)  # [L, T + extra, H, D]
        values = torch.cat(self.values, dim=1)
        kept = kept_token_indices(scores, ratio, protection)  # [L, H, n]
        heads = torch.arange(kept.shape[1], device=kept.device)[:, None]
        kept_keys = torch.stack([layer_keys[kept[layer], heads] for layer, layer_keys in enumerate(keys)])
        kept_values = torch.stack([layer_values[kept[layer], heads] for layer, layer_values in enumerate(values)])
        # [L, H, n, D] -> [L, n, H, D]: row j of a layer holds every head's j-th kept pair
        kept_keys, kept_values = kept_keys.transpose(1, 2), kept_values.transpose(1, 2)
        tail_keys, tail_values = keys[:, n_prompt:], values[:, n_prompt:]
        return CompactedPrompt(
            kept_indices=kept,
            keys=torch.cat([kept_keys, tail_keys], dim=1).contiguous(),
            values=torch.cat([kept_values, tail_values], dim=1).contiguous(),
        )


@dataclass
class CompactedPrompt:
    """What a request stores after compaction: ``keys``/``values`` ``[L, n + extra, H, D]`` for its first slots, and
    ``kept_indices`` ``[L, H, n]`` (each head's kept prompt tokens, ascending)."""

    kept_indices: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def kept_tokens(self) -> int:
        return self.kept_indices.shape[-1]


def kept_token_indices(scores: torch.Tensor, ratio: float, protection: Protection) -> torch.Tensor:
    """``[L, H, n]`` ascending token indices each (layer, head) keeps, for keep scores ``[L, H, T]`` of one prompt.

    The decision of ``FastKVzipPress(uniform=True)``: every (layer, head) evicts ``int(ratio x T)`` of its pairs
    (protected ones count), so ``n`` is the same everywhere, as a paged engine's one length per request needs.
    """
    n_layers, heads, _ = scores.shape
    decision = decide(scores[:, None], RatioBudget(ratio, per_head=True), protection)
    kept = ~decision.evicted[:, 0]  # [L, H, T]
    counts = decision.kept[:, 0]
    if not bool((counts == counts.flatten()[0]).all()):
        raise AssertionError(f"a per-head budget kept different counts per (layer, head): {counts.tolist()}")
    # nonzero lists (layer, head, token) in order, so each (layer, head)'s tokens come out ascending
    return kept.nonzero()[:, 2].view(n_layers, heads, -1)
