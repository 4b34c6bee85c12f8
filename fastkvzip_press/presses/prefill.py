"""Fast KVzip prefill eviction: gate scores, sink/window protection, one budget over all layers x heads."""

from __future__ import annotations

import logging
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from kvpress.presses.base_press import BasePress, is_prefilling
from torch import nn
from transformers import PreTrainedModel

from fastkvzip_press.attention import enable_ragged_attention
from fastkvzip_press.cache import RaggedLayer
from fastkvzip_press.layout import ModelLayout, attention_implementation, decoder_layers
from fastkvzip_press.presses.chunking import ChunkPlan, chunked_forward
from fastkvzip_press.presses.compaction import COMPACTIONS, apply_masked, apply_ragged, evict_pending
from fastkvzip_press.presses.gate_binding import GateBinding, GateSource
from fastkvzip_press.selection import evict_by_ratio, evict_by_threshold, evict_smallest, protect
from fastkvzip_press.stats import EvictionStats

logger = logging.getLogger(__name__)


@dataclass
class FastKVzipPress(BasePress):
    """Fast KVzip prefill eviction (Han, Kim & Yun, "Fast KVzip: Efficient and Accurate LLM Inference with
    Gated KV Eviction", arXiv 2601.17668).

    During prefill each gated layer's gate scores every context token from the layer's post-layernorm hidden
    states. The first ``n_sink`` tokens and a recent window are protected. Once the last gated layer has run,
    one selection over all layers x KV heads x tokens decides what to evict, so each (layer, head) keeps its own
    number of pairs. Eviction happens inside the prefill forward, so ``model.generate`` under ``with press(model)``
    sees it from its first decoding step. By default evicted pairs are really removed: gated layers move to a
    head-wise ragged cache (:class:`~fastkvzip_press.cache.RaggedLayer`) and the model's attention is switched to
    a wrapper that attends head by head over it (and calls the original implementation everywhere else).

    Parameters
    ----------
    compression_ratio : float
        Fraction of KV pairs removed over all gated layers (kvpress convention), in [0, 1). Protected pairs count
        toward the budget. Ignored when ``threshold`` is set; then it is overwritten with the achieved ratio.
    gates : str | Path | GateBank | None
        Gate source (see :func:`~fastkvzip_press.load_gates`). ``None``: the gates shipped in this package for the
        model (the default model has some), else the released gates fetched from the hub.
    threshold : float | None
        Adaptive mode: evict every unprotected pair whose gate score is below this value, in [0, 1].
    n_sink : int
        Leading tokens never evicted (attention sinks).
    window_size : int | float
        Recent tokens never evicted: an int is a token count (0 = none); a float in (0, 1) is a fraction of the
        context (the paper uses 2 %), at least one token.
    layerwise : bool
        Use the same budget in every layer (selection per layer) instead of one global selection.
    compaction : "ragged" | "masked"
        How evicted pairs leave attention. "ragged" frees their memory (batch size 1). "masked" keeps the cache
        full size and masks evicted keys through kvpress's attention patch (the reference path; any batch size).
        Both need attn_implementation "sdpa" or "flash_attention_2".
    chunk_size : int | None
        Prefill long contexts ``chunk_size`` tokens at a time, evicting after every chunk with the paper's deferred
        window, so that peak KV memory is about the retained cache plus one chunk ("ragged" only). The window
        counts toward the budget; the output of the prefill forward covers the last chunk only.
    """

    compression_ratio: float = 0.0
    gates: GateSource = None
    threshold: float | None = None
    n_sink: int = 4
    window_size: int | float = 0.02
    layerwise: bool = False
    compaction: Literal["ragged", "masked"] = "ragged"
    chunk_size: int | None = None

    last_stats: EvictionStats | None = field(default=None, init=False, repr=False)
    _binding: GateBinding = field(default_factory=GateBinding, init=False, repr=False)
    _attention: dict[int, nn.Module] = field(default_factory=dict, init=False, repr=False)
    _scores: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _num_layers: int = field(default=0, init=False, repr=False)
    _plan: ChunkPlan | None = field(default=None, init=False, repr=False)
    _own_hooks: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        if not 0 <= self.compression_ratio < 1:
            raise ValueError(
                "compression_ratio is the fraction of KV pairs removed and must be in [0, 1), "
                f"got {self.compression_ratio}"
            )
        if self.threshold is not None:
            if not 0 <= self.threshold <= 1:
                raise ValueError(f"threshold compares with gate scores in (0, 1); got {self.threshold}")
            if self.compression_ratio:
                raise ValueError("give either compression_ratio or threshold, not both")
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if isinstance(self.window_size, float) and not 0 < self.window_size < 1:
            raise ValueError(f"a float window_size is a fraction of the context in (0, 1), got {self.window_size}")
        if isinstance(self.window_size, int) and self.window_size < 0:
            raise ValueError(f"window_size must be >= 0 tokens, got {self.window_size}")
        if self.compaction not in COMPACTIONS:
            raise ValueError(f"compaction must be one of {COMPACTIONS}, got {self.compaction!r}")
        if self.chunk_size is not None:
            if self.chunk_size < 1:
                raise ValueError(f"chunk_size is a token count >= 1 (or None for one pass), got {self.chunk_size}")
            if self.compaction != "ragged":
                raise ValueError("chunk_size bounds peak memory by evicting for real; it needs compaction='ragged'")

    # ------------------------------------------------------------------------------------------------ lifecycle

    def post_init_from_model(self, model: PreTrainedModel):
        """Bind the gates and prepare the model; kvpress wrappers (``PrefillDecodingPress``) call only this."""
        if self._evicting() and attention_implementation(model) == "eager":
            raise ValueError(
                f"FastKVzipPress(compaction={self.compaction!r}) does not support eager attention (kvpress's "
                "masking patch and the ragged attention wrap sdpa / flash attention). Load the model with "
                "attn_implementation='sdpa' (or 'flash_attention_2')."
            )
        self._binding.bind(self.gates, model)
        if self._evicting() and self.compaction == "ragged":
            enable_ragged_attention(model)
        bank = self._binding.require(type(self).__name__)
        layers = decoder_layers(model)
        self._num_layers = ModelLayout.from_model(model).num_layers
        self._attention = {layer_id: layers[layer_id].self_attn for layer_id in bank.layer_ids}

    def _evicting(self) -> bool:
        return self.threshold is not None or self.compression_ratio > 0

    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Generator:
        self.post_init_from_model(model)
        self._own_hooks = True
        hooks = [
            module.register_forward_hook(self.forward_hook, with_kwargs=True) for module in self._attention.values()
        ]
        base = model.model if isinstance(getattr(model, "model", None), nn.Module) else model.get_decoder()
        if self.chunk_size is not None and self._evicting():
            # Instance attribute shadows the class's forward; kvpress's pipeline calls model.model(...) directly.
            base.forward = partial(
                chunked_forward, base.forward, model, self.chunk_size, self._start_plan, self._end_plan
            )
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            base.__dict__.pop("forward", None)
            self._scores.clear()
            self._plan = None
            self._own_hooks = False

    def window_for(self, context_length: int) -> int:
        """Protected recent tokens for a context of ``context_length`` tokens."""
        if isinstance(self.window_size, float):
            return max(1, int(self.window_size * context_length))
        return self.window_size

    # ---------------------------------------------------------------------------------------------------- hooks

    def forward_hook(self, module: nn.Module, input: list[torch.Tensor], kwargs: dict, output: list):
        hidden_states = kwargs["hidden_states"]
        chunked = self._plan is not None
        if not self._evicting() or not (chunked or is_prefilling(kwargs["cache_position"], hidden_states.shape[1])):
            return output
        bank = self._binding.require(type(self).__name__)
        if not bank.has_layer(module.layer_idx):
            return output  # a wrapper's hooks cover every layer; sliding-window layers have no gate
        if not self._attention:
            raise RuntimeError(
                "FastKVzipPress hooks ran before post_init_from_model; enter it with `with press(model)` or a "
                "kvpress wrapper such as PrefillDecodingPress (it cannot be nested in ComposedPress)"
            )
        if self.chunk_size is not None and not self._own_hooks:
            raise ValueError(
                "chunk_size needs FastKVzipPress's own context manager (it splits the prefill forward); inside "
                "PrefillDecodingPress the context is prefilled in one pass, so leave chunk_size=None there"
            )
        self._scores[module.layer_idx] = bank.score(module.layer_idx, hidden_states)
        if module.layer_idx == bank.layer_ids[-1]:
            if chunked:
                self._evict_chunk(kwargs["past_key_values"])
            else:
                self._evict(kwargs["past_key_values"])
        return output

    # ----------------------------------------------------------------------------------------- chunked prefill

    def _checked_window(self, context_length: int) -> int:
        """The protected window, after checking that something outside sink and window can be evicted."""
        window = self.window_for(context_length)
        if context_length <= self.n_sink + window:
            raise ValueError(
                f"the context has {context_length} tokens, not more than the protected n_sink={self.n_sink} + "
                f"window={window}; nothing could be evicted. Use a longer context or smaller n_sink/window_size."
            )
        return window

    def _start_plan(self, context_length: int) -> ChunkPlan:
        window = self._checked_window(context_length)
        if self.threshold is not None:
            self._plan = ChunkPlan(context_length, window, keep_fraction=1.0)
        else:
            self._plan = ChunkPlan.for_ratio(context_length, self.compression_ratio, self.n_sink, window)
        return self._plan

    def _end_plan(self) -> None:
        self._plan = None

    def _evict_chunk(self, cache) -> None:
        """Judge every gated layer's undecided tokens but the deferred window, with one selection across layers."""
        plan = self._plan
        layer_ids = list(self._attention)
        for layer_id in layer_ids:
            scores = self._scores.pop(layer_id)[0]  # [H, t]; batch size 1 is checked on compaction
            previous = plan.pending.get(layer_id)
            plan.pending[layer_id] = scores if previous is None else torch.cat([previous, scores], dim=1)
        n_span = plan.span_to_decide()
        if n_span > 0:
            spans = torch.stack([plan.pending[layer_id][:, :n_span] for layer_id in layer_ids])  # [L, H, n]
            positions = torch.arange(plan.decided, plan.decided + n_span, device=spans.device)
            spans = spans.masked_fill(positions < self.n_sink, float("inf"))
            if self.threshold is not None:
                evicted = evict_by_threshold(spans, self.threshold)
            else:  # one selection over all layers, or one per layer
                groups = spans.unbind(0) if self.layerwise else [spans]
                evicted = torch.cat(
                    [
                        evict_smallest(g, plan.n_to_evict(int(torch.isfinite(g).sum()))).reshape(-1, *g.shape[-2:])
                        for g in groups
                    ]
                )
            for layer_id, layer_evicted in zip(layer_ids, evicted):
                evict_pending(cache, layer_id, layer_evicted, plan.pending[layer_id].shape[1])
                kept = plan.kept_scores.setdefault(layer_id, [[] for _ in range(layer_evicted.shape[0])])
                for head, (span, gone) in enumerate(zip(plan.pending[layer_id][:, :n_span], layer_evicted)):
                    kept[head].append(span[~gone])
                plan.pending[layer_id] = plan.pending[layer_id][:, n_span:]
            plan.decided += n_span
        if plan.chunk_end == plan.context_length:
            layers: dict[int, RaggedLayer] = {i: cache.layers[i] for i in layer_ids}
            for layer_id, layer in layers.items():  # the final window stays pending and is kept
                kept = plan.kept_scores.get(layer_id, [[] for _ in layer.head_lengths])
                layer.row_scores = [torch.cat([*parts, tail]) for parts, tail in zip(kept, plan.pending[layer_id])]
            kept = {layer_id: torch.tensor([layer.head_lengths]) for layer_id, layer in layers.items()}
            self._record_stats(plan.context_length, kept)

    def _record_stats(self, context_length: int, kept_per_head: dict[int, torch.Tensor]) -> None:
        """Store what the prefill kept (``kept_per_head``: ``{layer_id: [B, H]}``); threshold mode learns its ratio."""
        bsz, heads = next(iter(kept_per_head.values())).shape
        self.last_stats = EvictionStats(
            context_length=context_length,
            kept_per_head=kept_per_head,
            entries_per_layer=bsz * heads * context_length,
            num_layers=self._num_layers,
        )
        if self.threshold is not None:
            self.compression_ratio = self.last_stats.compression_ratio

    def _evict(self, cache) -> None:
        layer_ids = list(self._attention)
        scores = torch.stack([self._scores.pop(layer_id) for layer_id in layer_ids])  # [L, B, H, T]
        n_layers, bsz, heads, n_tokens = scores.shape
        window = self._checked_window(n_tokens)
        protected = protect(scores, self.n_sink, window)
        if self.threshold is not None:
            evicted = evict_by_threshold(protected, self.threshold)
        else:
            evicted = evict_by_ratio(protected, self.compression_ratio, self.layerwise)
            # The budget evict_by_ratio aimed for; it evicts less only when protection leaves no room.
            budget_unit, units = (heads * n_tokens, n_layers) if self.layerwise else (n_layers * heads * n_tokens, 1)
            if int(evicted.sum()) < int(budget_unit * self.compression_ratio) * units * bsz:
                logger.warning(
                    "compression_ratio %.3f cannot be met: sink and window protect too much of a %d-token context",
                    self.compression_ratio,
                    n_tokens,
                )
        decisions = dict(zip(layer_ids, evicted))
        if self.compaction == "ragged":
            apply_ragged(cache, decisions)
            for layer_id, layer_scores, layer_evicted in zip(layer_ids, scores, evicted):
                cache.layers[layer_id].row_scores = [s[~gone] for s, gone in zip(layer_scores[0], layer_evicted[0])]
        else:
            apply_masked(self._attention, decisions)
        self._record_stats(n_tokens, {layer_id: (~mask).sum(-1) for layer_id, mask in decisions.items()})
        logger.debug("evicted %d of %d gated KV pairs", int(evicted.sum()), evicted.numel())
