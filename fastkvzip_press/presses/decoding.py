"""Fast KVzip eviction during generation: gate-scored, one decision over layers x heads per interval, compaction."""

from __future__ import annotations

import logging
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from kvpress import ComposedPress, DecodingPress
from kvpress.presses.scorer_press import ScorerPress
from torch import nn
from transformers import Cache, PreTrainedModel

from fastkvzip_press.cache import attention_implementation
from fastkvzip_press.checks import KnobTypeError, require_choice, require_int, require_real, require_window
from fastkvzip_press.eviction import HeadTargetBudget, Protection, decide
from fastkvzip_press.gates import GateBank, GateSource
from fastkvzip_press.layout import decoder_layers
from fastkvzip_press.presses.activation import enclosing_wrapper, exclusive
from fastkvzip_press.presses.cache_position import pass_cache_position
from fastkvzip_press.presses.compaction import COMPACTIONS, Compaction, make_compaction
from fastkvzip_press.presses.devices import layer_device, stack_on_one_device
from fastkvzip_press.presses.gate_binding import GateBinding, check_gate_source
from fastkvzip_press.presses.padding import key_padding
from fastkvzip_press.presses.score_ledger import ScoreLedger
from fastkvzip_press.presses.scorer import FastKVzipScorerPress

logger = logging.getLogger(__name__)

NO_LIMIT = 2**62  # the target of a sequence whose interval has not come yet


@dataclass
class DecodingStats:
    """What the decoding press did over one generation.

    Attributes:
        compressions: times the budget was enforced.
        evicted: pairs evicted over all gated layers and heads.
        peak_pairs_per_head: largest average number of stored pairs per (gated layer, KV head) seen before a
            compression, i.e. the peak of the cache between compressions.
        pairs_per_head: average stored pairs per (gated layer, KV head) now.
    """

    compressions: int = 0
    evicted: int = 0
    peak_pairs_per_head: float = 0.0
    pairs_per_head: float = 0.0

    # Names before v0.5.
    peak_rows_per_head = property(lambda self: self.peak_pairs_per_head)
    rows_per_head = property(lambda self: self.pairs_per_head)


@dataclass
class FastKVzipDecodingPress(DecodingPress):
    """Gated eviction while generating (Fast KVzip, arXiv 2601.17668, decoding setting).

    Every gated layer buffers the post-layernorm hidden states of new tokens and scores them with its gate in one
    call per ``compression_interval`` tokens, as the paper does (a prompt longer than the interval is scored at
    once). Every ``compression_interval`` new tokens,
    :func:`~fastkvzip_press.eviction.decide` makes one selection over all gated layers x KV heads that evicts the
    lowest-scored pairs down to ``target_size`` pairs per head on average (or to ``1 - compression_ratio`` of the
    logical length), never the first ``n_sink`` pairs nor the last ``window_size`` pairs of a head; the compaction
    strategy applies it. With ``compaction="ragged"`` evicted pairs are freed (the layer becomes a
    :class:`~fastkvzip_press.cache.RaggedLayer`), so memory stays within the budget plus one interval per head.

    Prefill scores: pairs from a :class:`FastKVzipPress` prefill (``PrefillDecodingPress``) keep the scores that
    press computed. Under ``with press(model): model.generate(...)`` this press scores the prompt itself. In kvpress's
    pipeline alone it never sees the prompt; those pairs get score 1.0 (evicted last) and a warning says so.

    Parameters
    ----------
    base_press : ScorerPress | None
        kvpress's ``DecodingPress`` contract; defaults to a :class:`FastKVzipScorerPress` on the same gates. Only
        kvpress's own ``compress`` path uses it.
    compression_interval : int
        New tokens between two compressions (the paper uses 128).
    target_size : int
        Pairs kept per (gated layer, KV head) on average after a compression.
    hidden_states_buffer_size : int
        Unused (kvpress field): the buffer always holds exactly the tokens not scored yet (at most one interval).
    gates : str | Path | GateBank | None
        Gate source (see :func:`~fastkvzip_press.load_gates`); ``None``: shipped gates, else the released ones.
    compression_ratio : float | None
        If set, the budget is ``(1 - compression_ratio)`` of the logical length per head instead of ``target_size``.
    n_sink : int
        Leading pairs of every head never evicted.
    window_size : int
        Most recent pairs of every head never evicted (the paper uses 128).
    compaction : "ragged" | "masked"
        "ragged" frees evicted pairs; "masked" keeps the cache dense and masks them through kvpress's attention
        patch (the reference path). Both hold one sequence.
    """

    base_press: ScorerPress | None = None
    compression_interval: int = 128
    target_size: int = 2048
    hidden_states_buffer_size: int = 0
    gates: GateSource = None
    compression_ratio: float | None = None
    n_sink: int = 4
    window_size: int = 128
    compaction: Literal["ragged", "masked"] = "ragged"

    last_stats: DecodingStats = field(default_factory=DecodingStats, init=False, repr=False)
    _binding: GateBinding = field(default_factory=GateBinding, init=False, repr=False)
    _strategy: Compaction | None = field(default=None, init=False, repr=False)
    _attention: dict[int, nn.Module] = field(default_factory=dict, init=False, repr=False)
    _ledgers: dict[int, ScoreLedger] = field(default_factory=dict, init=False, repr=False)
    _cache_id: int | None = field(default=None, init=False, repr=False)
    # Per sequence: its own tokens since its last compression, and the padding it came with.
    _new_tokens: list[int] = field(default_factory=list, init=False, repr=False)
    _pad_tokens: list[int] = field(default_factory=list, init=False, repr=False)
    _warned_unscored: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        self.gates = check_gate_source(self.gates)
        if self.base_press is None:
            self.base_press = FastKVzipScorerPress(gates=self.gates)
        elif not isinstance(self.base_press, ScorerPress):
            raise KnobTypeError(f"base_press must be a kvpress ScorerPress, got {type(self.base_press).__name__}")
        self.compression_interval = require_int("compression_interval (new tokens)", self.compression_interval, 1)
        if self.compression_ratio is not None:
            self.compression_ratio = require_real(
                "compression_ratio", self.compression_ratio, 0, 1, high_open=True, meaning="the fraction removed"
            )
        self.target_size = require_int("target_size (pairs per head)", self.target_size, 1)
        self.hidden_states_buffer_size = require_int("hidden_states_buffer_size", self.hidden_states_buffer_size, 0)
        self.n_sink = require_int("n_sink", self.n_sink, minimum=0)
        # While decoding the window is pairs per head; the prefill press's fraction form has no length to apply to.
        self.window_size = require_window("window_size of FastKVzipDecodingPress", self.window_size, fraction=False)
        if self.compression_ratio is None and self.n_sink + self.window_size >= self.target_size:
            raise ValueError(
                f"n_sink={self.n_sink} + window_size={self.window_size} protect at least target_size="
                f"{self.target_size} pairs per head, so nothing could ever be evicted; raise target_size or lower "
                "n_sink / window_size"
            )
        require_choice("compaction", self.compaction, tuple(COMPACTIONS))
        super().__post_init__()

    @property
    def gate_bank(self) -> GateBank | None:
        """The gates bound to the model the press was last entered with (``None`` before that)."""
        return self._binding.bank

    # ------------------------------------------------------------------------------------------------ lifecycle

    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Generator:
        with exclusive(self, model), super().__call__(model):
            yield

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        wrapper = enclosing_wrapper(self)
        if isinstance(wrapper, ComposedPress) and self.compression_ratio is None:
            raise ValueError(
                "ComposedPress multiplies its presses' compression_ratio, and FastKVzipDecodingPress(target_size=...) "
                "has none. Give FastKVzipDecodingPress a compression_ratio inside ComposedPress, or combine it with a "
                "prefill press through PrefillDecodingPress."
            )
        if attention_implementation(model) == "eager":
            raise ValueError(
                "FastKVzipDecodingPress does not support eager attention (the ragged attention and kvpress's "
                "masking patch wrap sdpa / flash attention); load the model with attn_implementation='sdpa'"
            )
        bank = self._binding.bind(self.gates, model)
        pass_cache_position(model)
        self.base_press.post_init_from_model(model)
        if self._strategy is None or self._strategy.name != self.compaction:
            self._strategy = make_compaction(self.compaction)
        self._strategy.prepare(model)
        layers = decoder_layers(model)
        self._attention = {i: layers[i].self_attn for i in bank.layer_ids}

    def reset(self) -> None:
        super().reset()
        self._ledgers.clear()
        self._cache_id = None
        self._new_tokens = []
        self._pad_tokens = []
        if self._strategy is not None:
            self._strategy.reset(self._attention)

    # ---------------------------------------------------------------------------------------------------- hooks

    def forward_hook(self, module: nn.Module, input: list[torch.Tensor], kwargs: dict, output: list):
        bank = self._binding.require(type(self).__name__)
        layer_id = module.layer_idx
        if not bank.has_layer(layer_id):
            return output
        hidden_states, cache = kwargs["hidden_states"], kwargs["past_key_values"]
        bsz, n_new = hidden_states.shape[:2]
        if id(cache) != self._cache_id:  # a new generation: forget the previous cache's scores
            self.reset()
            self._cache_id = id(cache)
            self.last_stats = DecodingStats()
            self._new_tokens, self._pad_tokens = [0] * bsz, [0] * bsz
        padding = key_padding(kwargs.get("attention_mask"), n_new)  # [B, t]: padding among the new tokens
        ledger = self._ledgers.setdefault(layer_id, ScoreLedger())
        unscored = ledger.record(
            hidden_states.detach(),
            self._strategy.rows_before(cache, layer_id, n_new),
            lambda: self._strategy.inherited_scores(cache, layer_id),
            partial(bank.score, layer_id),
            self.compression_interval,
            None if padding is None else ~padding,
        )
        if unscored and not self._warned_unscored:
            self._warned_unscored = True
            logger.warning(
                "%d cached pairs of layer %d have no gate score (this press did not see their prefill); "
                "they get score 1.0 and go last. Prefill with PrefillDecodingPress(FastKVzipPress(...), "
                "FastKVzipDecodingPress(...)) or run model.generate inside `with press(model)`.",
                unscored,
                layer_id,
            )
        if layer_id == bank.layer_ids[-1]:
            pads = [0] * bsz if padding is None else padding.sum(-1).tolist()
            self._pad_tokens = [before + now for before, now in zip(self._pad_tokens, pads)]
            self._new_tokens = [count + n_new - pad for count, pad in zip(self._new_tokens, pads)]
            due = [count >= self.compression_interval for count in self._new_tokens]
            if any(due):  # each sequence counts its own tokens, as it would alone
                self._new_tokens = [0 if now else count for count, now in zip(self._new_tokens, due)]
                self._compress(cache, due)
        return output

    # -------------------------------------------------------------------------------------------------- evict

    def budget_per_head(self, logical_length: int) -> int:
        """Pairs to keep per (gated layer, KV head) on average, for a sequence of ``logical_length`` tokens."""
        if self.compression_ratio is not None:
            return int((1 - self.compression_ratio) * logical_length)
        return self.target_size

    def _compress(self, cache: Cache, due: list[bool]) -> None:
        """Enforce the budget of the ``due`` sequences: one decision over every gated layer's held pairs (each
        sequence its own budget), then compaction."""
        bank = self._binding.require(type(self).__name__)
        for layer_id, ledger in self._ledgers.items():
            ledger.flush(partial(bank.score, layer_id))
        layer_ids = list(self._ledgers)
        bsz = len(due)
        padded = [self._ledgers[layer_id].padded() for layer_id in layer_ids]  # per layer [B * H, N_l]
        width = max(scores.shape[-1] for scores, _, _ in padded)

        def stack(index: int) -> torch.Tensor:  # [L, B, H, width], on the first gated layer's device
            parts = [nn.functional.pad(part[index], (0, width - part[index].shape[-1])) for part in padded]
            return stack_on_one_device(parts).view(len(layer_ids), bsz, -1, width)

        scores, held, real = stack(0), stack(1), stack(2)
        valid = held & real
        n_held, n_slots = int(valid.sum()), valid.shape[0] * valid.shape[1] * valid.shape[2]
        logical = cache.layers[layer_ids[0]].get_seq_length()
        targets = tuple(
            self.budget_per_head(logical - pad) if now else NO_LIMIT for now, pad in zip(due, self._pad_tokens)
        )
        stats = self.last_stats
        stats.peak_pairs_per_head = max(stats.peak_pairs_per_head, n_held / n_slots)
        stats.pairs_per_head = n_held / n_slots
        decision = decide(scores, HeadTargetBudget(targets), Protection(self.n_sink, self.window_size), valid)
        if not decision.met:
            target = min(t for t, short in zip(targets, decision.shortfall) if short)
            raise ValueError(
                f"the budget of {target} pairs per head cannot be met: n_sink={self.n_sink} and "
                f"window_size={self.window_size} protect too much; lower them or raise the budget"
            )
        n_evicted = sum(decision.evicted_per_sequence)
        if n_evicted == 0:
            return
        for layer_id, layer_evicted, layer_held, layer_real in zip(layer_ids, decision.evicted, held, real):
            home = layer_device(cache, layer_id, scores.device)  # each layer's part goes back to its device
            layer_evicted = layer_evicted.to(home)
            held_padding = (layer_held & ~layer_real).to(home)  # [B, H, width]
            padding = held_padding[:, 0] if bool(held_padding.any()) else None  # the same tokens in every head
            self._strategy.evict_held(cache, self._attention[layer_id], layer_id, layer_evicted, padding)
            dropped = layer_evicted | held_padding if self._strategy.drops_padding else layer_evicted
            self._ledgers[layer_id].keep(~dropped.reshape(-1, width))
        stats.compressions += 1
        stats.evicted += n_evicted
        stats.pairs_per_head = (n_held - n_evicted) / n_slots
        logger.debug("decoding eviction: %d of %d pairs, budgets %s per head", n_evicted, n_held, targets)
