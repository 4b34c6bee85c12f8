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
from fastkvzip_press.selection import evict_smallest

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

    Every gated layer scores each new token with its gate as the token is computed (the gate reads one token's
    post-layernorm hidden state, so scoring token by token gives the scores the paper computes on 128-token buffers,
    without holding hidden states). Every ``compression_interval`` new tokens, one selection over all gated
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
        Unused (kvpress field): tokens are scored as they come, nothing is buffered.
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
        fresh = bank.score(layer_id, hidden_states)[0].float()  # [H, t]
        self._record(layer_id, cache.layers[layer_id], fresh)
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

    def _record(self, layer_id: int, layer, fresh: torch.Tensor) -> None:
        """Append this step's scores ``fresh [H, t]``, after aligning the stored scores with the layer's rows."""
        n_new = fresh.shape[1]
        rows = self._rows(layer)
        known = self._scores.get(layer_id)
        if known is None:
            known = [torch.as_tensor(s, dtype=torch.float32) for s in (getattr(layer, "row_scores", None) or [])]
            if self.compaction == "masked" or len(known) != len(rows):
                known = [fresh.new_empty(0) for _ in rows]
        for head, (scores, n_rows) in enumerate(zip(known, rows)):
            n_before = n_rows - n_new
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
            known[head] = torch.cat([scores.to(fresh.device), fresh[head]])
        self._scores[layer_id] = known
        if self.compaction == "masked":  # every logical position has a score; ``_alive [H, T]`` marks the held ones
            n_logical = rows[0]
            alive = self._alive.get(layer_id, torch.ones(len(rows), 0, dtype=torch.bool, device=fresh.device))
            alive = alive[:, : n_logical - n_new]
            fill = alive.new_ones(len(rows), n_logical - alive.shape[1])
            self._alive[layer_id] = torch.cat([alive, fill], dim=1)

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
        for head, scores in enumerate(self._scores[layer_id]):
            if self.compaction == "masked":
                scores = scores[self._alive[layer_id][head]]
            protected = scores.clone()
            protected[: self.n_sink] = float("inf")
            if self.window_size:
                protected[-self.window_size :] = float("inf")
            heads.append(protected)
        return heads

    def _compress(self, cache: Cache) -> None:
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
