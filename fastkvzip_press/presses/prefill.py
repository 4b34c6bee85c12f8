"""Fast KVzip prefill eviction: gate scores, one decision over all layers x heads, then compaction."""

from __future__ import annotations

import logging
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from kvpress.presses.base_press import BasePress, is_prefilling
from torch import nn
from transformers import Cache, PreTrainedModel

from fastkvzip_press.cache import attention_implementation, cache_attention_path
from fastkvzip_press.checks import require_bool, require_choice, require_int, require_real, require_window
from fastkvzip_press.eviction import (
    ChunkPlan,
    EvictionStats,
    Protection,
    RatioBudget,
    TailEviction,
    ThresholdBudget,
    decide,
)
from fastkvzip_press.gates import GateBank, GateSource
from fastkvzip_press.layout import ModelLayout, decoder_layers
from fastkvzip_press.presses.activation import enclosing_wrapper, exclusive
from fastkvzip_press.presses.cache_position import pass_cache_position
from fastkvzip_press.presses.chunked_prefill import ChunkedPrefill
from fastkvzip_press.presses.compaction import COMPACTIONS, Compaction, make_compaction
from fastkvzip_press.presses.devices import layer_device, stack_on_one_device
from fastkvzip_press.presses.gate_binding import GateBinding, check_gate_source
from fastkvzip_press.presses.padding import key_padding

logger = logging.getLogger(__name__)


def _chunk_size_in_wrapper(wrapper: str) -> str:
    return (
        f"chunk_size needs FastKVzipPress's own context manager (it splits the prefill forward); {wrapper} prefills "
        "the context in one pass, so leave chunk_size=None inside it, or enter FastKVzipPress(chunk_size=...) alone"
    )


@dataclass
class FastKVzipPress(BasePress):
    """Fast KVzip prefill eviction (Han, Kim & Yun, "Fast KVzip: Efficient and Accurate LLM Inference with
    Gated KV Eviction", arXiv 2601.17668).

    During prefill each gated layer's gate scores every context token from the layer's post-layernorm hidden
    states. Once the last gated layer has run, :func:`~fastkvzip_press.eviction.decide` makes one selection over all
    layers x KV heads x tokens, with the first ``n_sink`` tokens and a recent window protected, so each (layer, head)
    keeps its own number of pairs; the compaction strategy applies it. Eviction happens inside the prefill forward, so
    ``model.generate`` under ``with press(model)`` sees it from its first decoding step. By default evicted pairs are
    really removed: gated layers move to a head-wise ragged cache (:class:`~fastkvzip_press.cache.RaggedLayer`) and
    the model's attention is switched to a wrapper that attends head by head over it (and calls the original
    implementation everywhere else).

    Parameters
    ----------
    compression_ratio : float
        Fraction of KV pairs removed over all gated layers (kvpress convention), in [0, 1). Protected pairs count
        toward the budget. Leave it 0 when ``threshold`` is set; the ratio a run achieved is
        ``last_stats.compression_ratio``.
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
    uniform : bool
        Every gated layer and KV head of a sequence evicts ``int(compression_ratio x T)`` of its ``T`` pairs
        (protected ones count toward it), each head choosing its own: the same number of pairs everywhere, the
        budget a paged engine holding one length per request (vLLM) can store, and the reference for it. Ratio mode
        only; the default is one budget over all layers x heads.
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
    uniform: bool = False

    last_stats: EvictionStats | None = field(default=None, init=False, repr=False)
    _binding: GateBinding = field(default_factory=GateBinding, init=False, repr=False)
    _strategy: Compaction | None = field(default=None, init=False, repr=False)
    _attention: dict[int, nn.Module] = field(default_factory=dict, init=False, repr=False)
    _scores: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _num_layers: int = field(default=0, init=False, repr=False)
    _plan: ChunkPlan | None = field(default=None, init=False, repr=False)
    _own_hooks: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        self.compression_ratio = require_real(
            "compression_ratio", self.compression_ratio, 0, 1, high_open=True, meaning="the fraction of pairs removed"
        )
        self.gates = check_gate_source(self.gates)
        if self.threshold is not None:
            self.threshold = require_real("threshold", self.threshold, 0, 1, meaning="gate scores lie in (0, 1)")
            if self.compression_ratio:
                raise ValueError("give either compression_ratio or threshold, not both")
        self.n_sink = require_int("n_sink", self.n_sink, minimum=0)
        self.window_size = require_window("window_size", self.window_size)
        require_bool("layerwise", self.layerwise)
        require_bool("uniform", self.uniform)
        if self.uniform and self.threshold is not None:
            raise ValueError("uniform=True keeps a count per (layer, head); it needs compression_ratio, not threshold")
        if self.uniform and self.layerwise:
            raise ValueError("give layerwise=True (one count per layer) or uniform=True (one per layer and head)")
        require_choice("compaction", self.compaction, tuple(COMPACTIONS))
        if self.chunk_size is not None:
            self.chunk_size = require_int("chunk_size (a token count, or None for one pass)", self.chunk_size, 1)
            if self.compaction != "ragged":
                raise ValueError("chunk_size bounds peak memory by evicting for real; it needs compaction='ragged'")

    @property
    def gate_bank(self) -> GateBank | None:
        """The gates bound to the model the press was last entered with (``None`` before that)."""
        return self._binding.bank

    # ------------------------------------------------------------------------------------------------ lifecycle

    def post_init_from_model(self, model: PreTrainedModel):
        """Bind the gates and prepare the model; kvpress wrappers (``PrefillDecodingPress``) call only this."""
        if self.chunk_size is not None and (wrapper := enclosing_wrapper(self)) is not None:
            raise ValueError(_chunk_size_in_wrapper(type(wrapper).__name__))
        if self._evicting() and attention_implementation(model) == "eager":
            raise ValueError(
                f"FastKVzipPress(compaction={self.compaction!r}) does not support eager attention (kvpress's "
                "masking patch and the ragged attention wrap sdpa / flash attention). Load the model with "
                "attn_implementation='sdpa' (or 'flash_attention_2')."
            )
        bank = self._binding.bind(self.gates, model)
        pass_cache_position(model)
        self._strategy = make_compaction(self.compaction)
        if self._evicting():
            self._strategy.prepare(model)
        layers = decoder_layers(model)
        self._num_layers = ModelLayout.from_model(model).num_layers
        self._attention = {layer_id: layers[layer_id].self_attn for layer_id in bank.layer_ids}

    def _evicting(self) -> bool:
        return self.threshold is not None or self.compression_ratio > 0

    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Generator:
        with exclusive(self, model):
            self.post_init_from_model(model)
            yield from self._hooked(model)

    def _hooked(self, model: PreTrainedModel) -> Generator:
        self._own_hooks = True
        hooks = [
            module.register_forward_hook(self.forward_hook, with_kwargs=True) for module in self._attention.values()
        ]
        chunker = None
        if self.chunk_size is not None and self._evicting():
            chunker = ChunkedPrefill(model, self.chunk_size, self._start_plan, self._end_plan)
            chunker.attach()
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            if chunker is not None:
                chunker.detach()
            self._scores.clear()
            self._plan = None
            self._own_hooks = False

    def window_for(self, context_length: int) -> int:
        """Protected recent tokens for a context of ``context_length`` tokens."""
        return self._protection().window_pairs(context_length)

    def _protection(self) -> Protection:
        return Protection(self.n_sink, self.window_size)

    def _budget(self) -> RatioBudget | ThresholdBudget:
        if self.threshold is not None:
            return ThresholdBudget(self.threshold)
        return RatioBudget(self.compression_ratio, self.layerwise, per_head=self.uniform)

    # ---------------------------------------------------------------------------------------------------- hooks

    def forward_hook(self, module: nn.Module, input: list[torch.Tensor], kwargs: dict, output: list):
        hidden_states = kwargs["hidden_states"]
        chunked = self._plan is not None
        if not (chunked or is_prefilling(kwargs["cache_position"], hidden_states.shape[1])):
            return output
        if not self._evicting():
            bank = self._binding.bank
            if bank is not None and self._attention and module.layer_idx == bank.layer_ids[-1]:
                self._record_nothing_evicted(kwargs["past_key_values"], kwargs.get("attention_mask"), hidden_states)
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
            raise ValueError(_chunk_size_in_wrapper("a kvpress wrapper"))
        self._scores[module.layer_idx] = bank.score(module.layer_idx, hidden_states)
        if module.layer_idx == bank.layer_ids[-1]:
            if chunked:
                self._evict_chunk(kwargs["past_key_values"])
            else:
                self._evict(kwargs["past_key_values"], kwargs.get("attention_mask"))
        return output

    # ---------------------------------------------------------------------------------------------- one pass

    def _evict(self, cache: Cache, attention_mask: torch.Tensor | None) -> None:
        """Decide the whole context at once, over every gated layer, and apply the decision. Padding of a batch
        (read from the attention mask) is neither counted nor kept."""
        layer_ids = list(self._attention)
        scores = stack_on_one_device([self._scores.pop(layer_id) for layer_id in layer_ids])  # [L, B, H, T]
        n_tokens = scores.shape[-1]
        padding = key_padding(attention_mask, n_tokens)  # [B, T] or None
        if padding is not None:
            padding = padding.to(scores.device)  # the mask of the last gated layer, which may sit elsewhere
        lengths = [n_tokens] * scores.shape[1] if padding is None else (n_tokens - padding.sum(-1)).tolist()
        protection = self._protection()
        for length in lengths:
            protection.require_room(length)
        valid = None if padding is None else ~padding[None, :, None, :]
        decision = decide(scores, self._budget(), protection, valid)
        if not decision.met:
            logger.warning(
                "compression_ratio %.3f cannot be met: sink and window protect too much of a %d-token context",
                self.compression_ratio,
                min(length for length, short in zip(lengths, decision.shortfall) if short),
            )
        for layer_id, layer_evicted, layer_scores in zip(layer_ids, decision.evicted, scores):
            home = layer_device(cache, layer_id, scores.device)
            layer_padding = None if padding is None else padding.to(home)
            tail = TailEviction.whole(layer_evicted.to(home), layer_padding, layer_scores.to(home))
            self._strategy.evict_tail(cache, self._attention[layer_id], layer_id, tail)
        self._record_stats(cache, n_tokens, dict(zip(layer_ids, decision.kept)), lengths)
        logger.debug("evicted %d of %d gated KV pairs", sum(decision.evicted_per_sequence), decision.evicted.numel())

    def _record_nothing_evicted(self, cache: Cache, attention_mask: torch.Tensor | None, hidden_states) -> None:
        """Stats of a prefill at ratio 0: every pair of every sequence kept."""
        bsz, n_tokens = hidden_states.shape[:2]
        padding = key_padding(attention_mask, n_tokens)
        lengths = [n_tokens] * bsz if padding is None else (n_tokens - padding.sum(-1)).tolist()
        heads = self._binding.bank.num_kv_heads
        kept = torch.tensor(lengths).view(bsz, 1).expand(bsz, heads)
        self._record_stats(cache, n_tokens, dict.fromkeys(self._attention, kept), lengths)

    # ----------------------------------------------------------------------------------------- chunked prefill

    def _start_plan(self, context_length: int, padding: torch.Tensor | None) -> ChunkPlan:
        self._plan = ChunkPlan.start(context_length, self._budget(), self._protection(), padding, self.chunk_size)
        return self._plan

    def _end_plan(self) -> None:
        self._plan = None

    def _evict_chunk(self, cache: Cache) -> None:
        """Decide every gated layer's undecided tokens but the deferred window, with one selection across layers."""
        plan = self._plan
        layer_ids = list(self._attention)
        for layer_id in layer_ids:
            plan.add_scores(layer_id, self._scores.pop(layer_id))
        if any(plan.spans()) or plan.finished:  # the last chunk always stores the layers ragged, with their scores
            decision = plan.decide_span(layer_ids)
            for layer_id, layer_evicted in zip(layer_ids, decision.evicted):
                tail = plan.tail_eviction(layer_id, layer_evicted)
                self._strategy.evict_tail(cache, self._attention[layer_id], layer_id, tail)
            plan.advance()
        if plan.finished:
            kept = {}
            for layer_id in layer_ids:
                layer = cache.layers[layer_id]
                kept[layer_id] = torch.tensor(layer.head_lengths).view(layer.batch_size, layer.num_heads)
            self._record_stats(cache, plan.context_length, kept, layer.sequence_lengths)

    def _record_stats(
        self, cache: Cache, context_length: int, kept_per_head: dict[int, torch.Tensor], lengths: list[int]
    ) -> None:
        """Store what the prefill kept (``kept_per_head``: ``{layer_id: [B, H]}``, sequences of ``lengths`` own
        tokens) and which attention its ragged layers get; a threshold run's achieved ratio is
        ``last_stats.compression_ratio`` (the fields stay as the user set them)."""
        heads = next(iter(kept_per_head.values())).shape[1]
        self.last_stats = EvictionStats(
            context_length=context_length,
            kept_per_head=kept_per_head,
            pairs_per_layer=heads * sum(lengths),
            num_layers=self._num_layers,
            sequence_lengths=lengths if any(length != context_length for length in lengths) else None,
            attention_path=cache_attention_path(cache),
        )
