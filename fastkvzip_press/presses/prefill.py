"""Fast KVzip prefill eviction: gate scores, sink/window protection, one budget over all layers x heads."""

from __future__ import annotations

import logging
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from kvpress.presses.base_press import BasePress, is_prefilling
from torch import nn
from transformers import PreTrainedModel

from fastkvzip_press.layout import ModelLayout, attention_implementation, decoder_layers
from fastkvzip_press.presses.gate_binding import GateBinding, GateSource
from fastkvzip_press.selection import evict_by_ratio, evict_by_threshold, protect
from fastkvzip_press.stats import EvictionStats

logger = logging.getLogger(__name__)

COMPACTIONS = ("masked",)


@dataclass
class FastKVzipPress(BasePress):
    """Fast KVzip prefill eviction (Han, Kim & Yun, "Fast KVzip: Efficient and Accurate LLM Inference with
    Gated KV Eviction", arXiv 2601.17668).

    During prefill each gated layer's gate scores every context token from the layer's post-layernorm hidden
    states. The first ``n_sink`` tokens and a recent window are protected. Once the last gated layer has run,
    one selection over all layers x KV heads x tokens decides what to evict, so each (layer, head) keeps its own
    number of pairs. Eviction happens inside the prefill forward, so ``model.generate`` under ``with press(model)``
    sees it from its first decoding step.

    Parameters
    ----------
    compression_ratio : float
        Fraction of KV pairs removed over all gated layers (kvpress convention), in [0, 1). Protected pairs count
        toward the budget. Ignored when ``threshold`` is set; then it is overwritten with the achieved ratio.
    gates : str | Path | GateBank | None
        Gate source (see :func:`~fastkvzip_press.load_gates`). ``None`` fetches the released gates of the model.
    threshold : float | None
        Adaptive mode: evict every unprotected pair whose gate score is below this value, in [0, 1].
    n_sink : int
        Leading tokens never evicted (attention sinks).
    window_size : int | float
        Recent tokens never evicted: an int is a token count (0 = none); a float in (0, 1) is a fraction of the
        context (the paper uses 2 %), at least one token.
    layerwise : bool
        Use the same budget in every layer (selection per layer) instead of one global selection.
    compaction : "masked"
        How evicted pairs leave attention. "masked" keeps the cache full size and masks evicted keys through
        kvpress's attention patch; it needs attn_implementation "sdpa" or "flash_attention_2".
    """

    compression_ratio: float = 0.0
    gates: GateSource = None
    threshold: float | None = None
    n_sink: int = 4
    window_size: int | float = 0.02
    layerwise: bool = False
    compaction: Literal["masked"] = "masked"

    last_stats: EvictionStats | None = field(default=None, init=False, repr=False)
    _binding: GateBinding = field(default_factory=GateBinding, init=False, repr=False)
    _attention: dict[int, nn.Module] = field(default_factory=dict, init=False, repr=False)
    _scores: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _num_layers: int = field(default=0, init=False, repr=False)

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

    # ------------------------------------------------------------------------------------------------ lifecycle

    def post_init_from_model(self, model: PreTrainedModel):
        self._binding.bind(self.gates, model)

    def _evicting(self) -> bool:
        return self.threshold is not None or self.compression_ratio > 0

    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Generator:
        if self._evicting() and self.compaction == "masked" and attention_implementation(model) == "eager":
            raise ValueError(
                "FastKVzipPress(compaction='masked') masks evicted keys through kvpress's attention patch, which "
                "does not cover eager attention. Load the model with attn_implementation='sdpa' (or "
                "'flash_attention_2')."
            )
        self.post_init_from_model(model)
        bank = self._binding.require(type(self).__name__)
        layers = decoder_layers(model)
        self._num_layers = ModelLayout.from_model(model).num_layers
        self._attention = {layer_id: layers[layer_id].self_attn for layer_id in bank.layer_ids}
        hooks = [
            module.register_forward_hook(self.forward_hook, with_kwargs=True) for module in self._attention.values()
        ]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            self._scores.clear()

    def window_for(self, context_length: int) -> int:
        """Protected recent tokens for a context of ``context_length`` tokens."""
        if isinstance(self.window_size, float):
            return max(1, int(self.window_size * context_length))
        return self.window_size

    # ---------------------------------------------------------------------------------------------------- hooks

    def forward_hook(self, module: nn.Module, input: list[torch.Tensor], kwargs: dict, output: list):
        hidden_states = kwargs["hidden_states"]
        if not self._evicting() or not is_prefilling(kwargs["cache_position"], hidden_states.shape[1]):
            return output
        bank = self._binding.require(type(self).__name__)
        if not self._attention:
            raise RuntimeError(
                "FastKVzipPress hooks ran outside `with press(model)`; it cannot be nested in ComposedPress"
            )
        self._scores[module.layer_idx] = bank.score(module.layer_idx, hidden_states)
        if module.layer_idx == bank.layer_ids[-1]:
            self._evict()
        return output

    def _evict(self) -> None:
        layer_ids = list(self._attention)
        scores = torch.stack([self._scores.pop(layer_id) for layer_id in layer_ids])  # [L, B, H, T]
        n_layers, bsz, heads, n_tokens = scores.shape
        window = self.window_for(n_tokens)
        if n_tokens <= self.n_sink + window:
            raise ValueError(
                f"the context has {n_tokens} tokens, not more than the protected n_sink={self.n_sink} + "
                f"window={window}; nothing could be evicted. Use a longer context or smaller n_sink/window_size."
            )
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
        for layer_id, layer_evicted in zip(layer_ids, evicted):
            self._attention[layer_id].masked_key_indices = torch.nonzero(layer_evicted, as_tuple=True)
        self.last_stats = EvictionStats(
            context_length=n_tokens,
            kept_per_head={layer_id: (~mask).sum(-1) for layer_id, mask in zip(layer_ids, evicted)},
            entries_per_layer=bsz * heads * n_tokens,
            num_layers=self._num_layers,
        )
        if self.threshold is not None:
            self.compression_ratio = self.last_stats.compression_ratio
        logger.debug("evicted %d of %d gated KV pairs", int(evicted.sum()), evicted.numel())
