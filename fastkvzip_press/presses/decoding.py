"""Fast KVzip eviction during generation: gate-scored, one budget over layers x heads, real compaction."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from kvpress import DecodingPress
from kvpress.presses.scorer_press import ScorerPress
from torch import nn
from transformers import Cache, PreTrainedModel

from fastkvzip_press.attention import enable_ragged_attention
from fastkvzip_press.cache import RaggedLayer
from fastkvzip_press.layout import attention_implementation, decoder_layers
from fastkvzip_press.presses.compaction import COMPACTIONS, check_ragged_batch
from fastkvzip_press.presses.gate_binding import GateBinding, GateSource
from fastkvzip_press.presses.scorer import FastKVzipScorerPress
from fastkvzip_press.selection import evict_smallest, protect

logger = logging.getLogger(__name__)


@dataclass
class DecodingStats:
    """What the decoding press did over one generation.

    Attributes:
        compressions: times the budget was enforced.
        evicted: pairs evicted over all gated layers and heads.
        peak_rows_per_head: largest average number of stored pairs per (gated layer, KV head) seen before a
            compression, i.e. the peak of the cache between compressions.
        rows_per_head: average stored pairs per (gated layer, KV head) now.
    """

    compressions: int = 0
    evicted: int = 0
    peak_rows_per_head: float = 0.0
    rows_per_head: float = 0.0


@dataclass
class FastKVzipDecodingPress(DecodingPress):
    """Gated eviction while generating (Fast KVzip, arXiv 2601.17668, decoding setting).

    Every gated layer buffers the post-layernorm hidden states of new tokens and scores them with its gate in one
    call per ``compression_interval`` tokens, as the paper does (a prompt longer than the interval is scored at
    once). Every ``compression_interval`` new tokens, one selection over all gated
    layers x KV heads evicts the lowest-scored pairs down to ``target_size`` pairs per head on average (or to
    ``1 - compression_ratio`` of the logical length), never the first ``n_sink`` pairs nor the last ``window_size``
    pairs of a head. With ``compaction="ragged"`` evicted pairs are freed (the layer becomes a
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
        "ragged" frees evicted pairs (batch size 1); "masked" keeps the cache dense and masks them through kvpress's
        attention patch (the reference path).
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
    _attention: dict[int, nn.Module] = field(default_factory=dict, init=False, repr=False)
    # Per gated layer: scores [H, n] of rows already judged and still held, head by head (ragged) or of every
    # logical position (masked, with ``_alive`` marking the ones not evicted).
    _scores: dict[int, list[torch.Tensor]] = field(default_factory=dict, init=False, repr=False)
    _alive: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    # Per gated layer: hidden states [t, D] of tokens not scored yet (at most one interval), and their count.
    _pending: dict[int, list[torch.Tensor]] = field(default_factory=dict, init=False, repr=False)
    _n_pending: dict[int, int] = field(default_factory=dict, init=False, repr=False)
    _cache_id: int | None = field(default=None, init=False, repr=False)
    _new_tokens: int = field(default=0, init=False, repr=False)
    _warned_unscored: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        if self.base_press is None:
            self.base_press = FastKVzipScorerPress(gates=self.gates)
        if self.compression_interval < 1:
            raise ValueError(f"compression_interval is a token count >= 1, got {self.compression_interval}")
        if self.compression_ratio is not None and not 0 <= self.compression_ratio < 1:
            raise ValueError(f"compression_ratio is the fraction removed, in [0, 1); got {self.compression_ratio}")
        if self.target_size < 1:
            raise ValueError(f"target_size is pairs per head, >= 1; got {self.target_size}")
        if self.n_sink < 0 or self.window_size < 0:
            raise ValueError(f"n_sink and window_size must be >= 0, got {self.n_sink} and {self.window_size}")
        if self.compression_ratio is None and self.n_sink + self.window_size >= self.target_size:
            raise ValueError(
                f"n_sink={self.n_sink} + window_size={self.window_size} protect at least target_size="
                f"{self.target_size} pairs per head, so nothing could ever be evicted; raise target_size or lower "
                "n_sink / window_size"
            )
        if self.compaction not in COMPACTIONS:
            raise ValueError(f"compaction must be one of {COMPACTIONS}, got {self.compaction!r}")
        super().__post_init__()

    # ------------------------------------------------------------------------------------------------ lifecycle

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        if attention_implementation(model) == "eager":
            raise ValueError(
                "FastKVzipDecodingPress does not support eager attention (the ragged attention and kvpress's "
                "masking patch wrap sdpa / flash attention); load the model with attn_implementation='sdpa'"
            )
        self._binding.bind(self.gates, model)
        self.base_press.post_init_from_model(model)
        if self.compaction == "ragged":
            enable_ragged_attention(model)
        layers = decoder_layers(model)
        self._attention = {i: layers[i].self_attn for i in self._binding.require(type(self).__name__).layer_ids}

    def reset(self) -> None:
        super().reset()
        self._scores.clear()
        self._alive.clear()
        self._pending.clear()
        self._n_pending.clear()
        self._cache_id = None
        self._new_tokens = 0
        for module in self._attention.values():
            if self.compaction == "masked":
                module.masked_key_indices = None

    # ---------------------------------------------------------------------------------------------------- hooks

    def forward_hook(self, module: nn.Module, input: list[torch.Tensor], kwargs: dict, output: list):
        bank = self._binding.require(type(self).__name__)
        layer_id = module.layer_idx
        if not bank.has_layer(layer_id):
            return output
        hidden_states, cache = kwargs["hidden_states"], kwargs["past_key_values"]
        check_ragged_batch(hidden_states.shape[0])
        if id(cache) != self._cache_id:  # a new generation: forget the previous cache's scores
            self.reset()
            self._cache_id = id(cache)
            self.last_stats = DecodingStats()
        self._record(layer_id, cache.layers[layer_id], hidden_states[0].detach())
        if layer_id == bank.layer_ids[-1]:
            self._new_tokens += hidden_states.shape[1]
            if self._new_tokens >= self.compression_interval:
                self._new_tokens = 0
                self._compress(cache)
        return output

    def _rows(self, layer) -> list[int]:
        """Pairs each head holds (ragged), or the logical length for every head (dense)."""
        if isinstance(layer, RaggedLayer):
            return layer.head_lengths
        return [layer.keys.shape[2]] * layer.keys.shape[1]

    def _record(self, layer_id: int, layer, hidden: torch.Tensor) -> None:
        """Buffer this forward's hidden states ``[t, D]``; they are scored in one gate call per interval.

        The stored scores plus the buffered tokens must match the layer's rows before this forward; when they do not
        (a rollback, or pairs this press never saw), the scores are realigned first.
        """
        n_new = hidden.shape[0]
        rows = self._rows(layer)
        known = self._scores.get(layer_id)
        n_pending = self._n_pending.get(layer_id, 0)
        if known is None or any(s.shape[0] + n_pending != n - n_new for s, n in zip(known, rows)):
            self._flush(layer_id)
            self._align(layer_id, layer, [n - n_new for n in rows], hidden.device)
        self._pending.setdefault(layer_id, []).append(hidden)
        self._n_pending[layer_id] = self._n_pending.get(layer_id, 0) + n_new
        if self._n_pending[layer_id] >= self.compression_interval:  # long prompts are scored at once
            self._flush(layer_id)

    def _flush(self, layer_id: int) -> None:
        """Score the buffered hidden states and append their scores to every head."""
        pending = self._pending.pop(layer_id, [])
        self._n_pending[layer_id] = 0
        if not pending:
            return
        bank = self._binding.require(type(self).__name__)
        fresh = bank.score(layer_id, torch.cat(pending)[None])[0].float()  # [H, n]
        known = self._scores.get(layer_id) or [fresh.new_empty(0) for _ in range(fresh.shape[0])]
        self._scores[layer_id] = [torch.cat([s.to(fresh.device), f]) for s, f in zip(known, fresh)]

    def _align(self, layer_id: int, layer, rows_before: list[int], device: torch.device) -> None:
        """Make the stored scores cover exactly ``rows_before[h]`` rows per head (the rows before this forward)."""
        known = self._scores.get(layer_id)
        if known is None:
            inherited = getattr(layer, "row_scores", None) or []
            known = [torch.as_tensor(s, dtype=torch.float32) for s in inherited]
            if self.compaction == "masked" or len(known) != len(rows_before):
                known = [torch.empty(0, device=device) for _ in rows_before]
        for head, (scores, n_before) in enumerate(zip(known, rows_before)):
            if scores.shape[0] > n_before:  # the pipeline rolled an answer back
                scores = scores[:n_before]
            elif scores.shape[0] < n_before:  # pairs this press never saw (a prefill it did not run)
                if not self._warned_unscored:
                    self._warned_unscored = True
                    logger.warning(
                        "%d cached pairs of layer %d have no gate score (this press did not see their prefill); "
                        "they get score 1.0 and go last. Prefill with PrefillDecodingPress(FastKVzipPress(...), "
                        "FastKVzipDecodingPress(...)) or run model.generate inside `with press(model)`.",
                        n_before - scores.shape[0],
                        layer_id,
                    )
                scores = torch.cat([scores, scores.new_ones(n_before - scores.shape[0])])
            known[head] = scores.to(device)
        self._scores[layer_id] = known
        if self.compaction == "masked" and layer_id in self._alive:
            self._alive[layer_id] = self._alive[layer_id][:, : rows_before[0]]

    # -------------------------------------------------------------------------------------------------- evict

    def budget_per_head(self, logical_length: int) -> int:
        """Pairs to keep per (gated layer, KV head) on average, for a sequence of ``logical_length`` tokens."""
        if self.compression_ratio is not None:
            return int((1 - self.compression_ratio) * logical_length)
        return self.target_size

    def _candidates(self, layer_id: int) -> list[torch.Tensor]:
        """Per head: scores of the pairs still held, in order, with the first ``n_sink`` and last ``window_size``
        of them set to +inf."""
        heads = []
        if self.compaction == "masked":  # every logical position has a score; ``_alive [H, T]`` marks the held ones
            scores = self._scores[layer_id]
            alive = self._alive.get(layer_id, torch.ones(len(scores), 0, dtype=torch.bool, device=scores[0].device))
            fill = alive.new_ones(len(scores), scores[0].shape[0] - alive.shape[1])
            self._alive[layer_id] = torch.cat([alive, fill], dim=1)
        for head, scores in enumerate(self._scores[layer_id]):
            if self.compaction == "masked":
                scores = scores[self._alive[layer_id][head]]
            heads.append(protect(scores, self.n_sink, self.window_size))
        return heads

    def _compress(self, cache: Cache) -> None:
        for layer_id in list(self._pending):
            self._flush(layer_id)
        layer_ids = list(self._scores)
        candidates = {layer_id: self._candidates(layer_id) for layer_id in layer_ids}
        counts = {layer_id: [c.shape[0] for c in heads] for layer_id, heads in candidates.items()}
        n_total = sum(sum(c) for c in counts.values())
        n_slots = sum(len(c) for c in counts.values())
        logical = cache.layers[layer_ids[0]].get_seq_length()
        budget = self.budget_per_head(logical) * n_slots
        stats = self.last_stats
        stats.peak_rows_per_head = max(stats.peak_rows_per_head, n_total / n_slots)
        stats.rows_per_head = n_total / n_slots
        if n_total <= budget:
            return
        flat = torch.cat([score for heads in candidates.values() for score in heads])
        n_evict = n_total - budget
        evictable = int(torch.isfinite(flat).sum())
        if evictable < n_evict:
            raise ValueError(
                f"the budget of {budget // n_slots} pairs per head cannot be met: n_sink={self.n_sink} and "
                f"window_size={self.window_size} protect too much; lower them or raise the budget"
            )
        evicted = evict_smallest(flat, n_evict).split([sum(c) for c in counts.values()])
        for layer_id, layer_evicted in zip(layer_ids, evicted):
            keep = ~layer_evicted
            per_head = keep.split(counts[layer_id])
            if self.compaction == "ragged":
                self._compact_ragged(cache, layer_id, keep)
                self._scores[layer_id] = [s[k] for s, k in zip(self._scores[layer_id], per_head)]
            else:
                self._mask(layer_id, per_head)
        stats.compressions += 1
        stats.evicted += n_evict
        stats.rows_per_head = (n_total - n_evict) / n_slots
        logger.debug("decoding eviction: %d of %d pairs, budget %d per head", n_evict, n_total, budget // n_slots)

    def _compact_ragged(self, cache: Cache, layer_id: int, keep: torch.Tensor) -> None:
        layer = cache.layers[layer_id]
        if isinstance(layer, RaggedLayer):
            layer.row_scores = None  # the prefill's scores no longer match the rows; this press holds them now
            layer.track_positions()  # so that kvpress's rollback after the answer stays exact
            layer.compact(keep.to(layer.device))
            return
        keys, values = layer.keys, layer.values  # dense [1, H, T, D]
        keep = keep.to(keys.device).view(1, keys.shape[1], -1)
        cache.layers[layer_id] = RaggedLayer.from_dense(keys, values, keep, track_positions=True)

    def _mask(self, layer_id: int, keep_per_head: tuple[torch.Tensor, ...]) -> None:
        """Masked reference: flag the evicted positions for kvpress's attention patch; the cache stays dense."""
        alive = self._alive[layer_id]
        for head, keep in enumerate(keep_per_head):
            held = torch.nonzero(alive[head]).squeeze(1)
            alive[head, held[~keep]] = False
        heads, positions = torch.nonzero(~alive, as_tuple=True)
        self._attention[layer_id].masked_key_indices = (torch.zeros_like(heads), heads, positions)
