"""Fast KVzip gate scores as a kvpress ScorerPress, so they compose with every kvpress wrapper."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from kvpress.presses.base_press import is_prefilling
from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import compute_n_kept
from torch import nn
from transformers import PreTrainedModel

from fastkvzip_press.cache import enable_ragged_attention, evict_from_tail
from fastkvzip_press.checks import require_real
from fastkvzip_press.eviction import keep_largest
from fastkvzip_press.gates import GateBank, GateSource
from fastkvzip_press.presses.activation import exclusive
from fastkvzip_press.presses.cache_position import pass_cache_position
from fastkvzip_press.presses.gate_binding import GateBinding, check_gate_source
from fastkvzip_press.presses.padding import key_padding

logger = logging.getLogger(__name__)


@dataclass
class FastKVzipScorerPress(ScorerPress):
    """Score each KV pair with its layer's Fast KVzip gate (Han, Kim & Yun, arXiv 2601.17668).

    This press only scores; kvpress decides. On its own it is kvpress's ``ScorerPress``: the same number of pairs in
    every head (uniform top-k, kvpress's rounding), kept in their original order, and the cache really shrinks.
    Wrapped, it gives head-wise (``AdaKVPress``), threshold (``DMSPress``), chunked (``ChunkPress``), re-rotated,
    per-layer, composed and decoding-time eviction.

    Parameters
    ----------
    compression_ratio : float
        Fraction of KV pairs removed (kvpress convention), in [0, 1).
    gates : str | Path | GateBank | None
        Gate source: a :class:`~fastkvzip_press.GateBank`, a local gate file or folder, or a hub repository id.
        ``None``: the gates shipped in this package for the model, else the released gates from
        ``Jang-Hyun/Fast-KVzip``.

    Notes
    -----
    ``score()`` returns gate probabilities ``[B, H_kv, T]`` in (0, 1). Gates read only each token's hidden state,
    so scores are cached per layer and aligned with the cache: kvpress's ``DecodingPress`` hands ``score()`` only
    its recent hidden-state buffer while ``keys`` holds the whole cache. Older pairs reuse cached scores; pairs
    this press never saw (the prefill, when only ``DecodingPress`` is active, or steps its buffer dropped) get
    score 1.0, so they are the last to go, and a warning says how to avoid that (use the same press instance for
    prefill in ``PrefillDecodingPress``, and ``hidden_states_buffer_size >= compression_interval``).
    Layers without a gate (Gemma3 sliding-window layers) are never compressed by ``compress``.

    A padded batch cannot stay dense (each sequence keeps its own number of pairs, and the attention mask of later
    steps assumes the full length), so used alone on one the press stores each gated layer ragged
    (:class:`~fastkvzip_press.cache.RaggedLayer`): every (sequence, head) keeps the top-k of its own tokens, exactly
    what it keeps alone, and padding is dropped. kvpress's wrappers handle one sequence (their design).
    """

    compression_ratio: float = 0.0
    gates: GateSource = None
    _binding: GateBinding = field(default_factory=GateBinding, init=False, repr=False)
    _score_cache: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _warned_ungated: set[int] = field(default_factory=set, init=False, repr=False)
    _model: weakref.ReferenceType | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.compression_ratio = require_real(
            "compression_ratio", self.compression_ratio, 0, 1, high_open=True, meaning="the fraction removed"
        )
        self.gates = check_gate_source(self.gates)

    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Generator:
        with exclusive(self, model), super().__call__(model):
            yield

    @property
    def gate_bank(self) -> GateBank | None:
        """The gates bound to the model the press was last entered with (``None`` before that)."""
        return self._binding.bank

    def post_init_from_model(self, model: PreTrainedModel):
        self._binding.bind(self.gates, model)
        pass_cache_position(model)
        self._model = weakref.ref(model)

    def forward_hook(self, module: nn.Module, input: list[torch.Tensor], kwargs: dict, output: list):
        """kvpress's prefill compression; a padded batch is stored ragged instead (see the class notes)."""
        hidden_states = kwargs["hidden_states"]
        q_len = hidden_states.shape[1]
        padding = key_padding(kwargs.get("attention_mask"), q_len)
        if (
            padding is None
            or self.compression_ratio == 0
            or not is_prefilling(kwargs["cache_position"], q_len)
            or not self._is_gated(module)
        ):
            return super().forward_hook(module, input, kwargs, output)
        cache = kwargs["past_key_values"]
        keys = cache.layers[module.layer_idx].keys  # dense [B, H, T, D], padding included
        scores = self.score(module, hidden_states, keys, keys, None, kwargs)
        evicted = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        for sequence, own in enumerate(~padding.to(scores.device)):
            row = scores[sequence : sequence + 1, :, own].contiguous()  # [1, H, n]: what the sequence scores alone
            evicted[sequence, :, own] = ~keep_largest(row[0], compute_n_kept(row.shape[-1], self.compression_ratio))
        model = self._model() if self._model is not None else None
        if model is None:
            raise RuntimeError("FastKVzipScorerPress needs post_init_from_model before compressing a padded batch")
        enable_ragged_attention(model)
        evict_from_tail(cache, module.layer_idx, evicted, keys.shape[2], padding=padding)
        self._score_cache.pop(module.layer_idx, None)  # ragged rows: no dense score cache to keep aligned
        return output

    def _is_gated(self, module: nn.Module) -> bool:
        return self._binding.require(type(self).__name__, self.gates).has_layer(module.layer_idx)

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        """Gate scores ``[B, H_kv, k_len]`` for the pairs in ``keys``.

        ``hidden_states [B, N, D]`` belong to the last ``N`` positions of ``keys [B, H_kv, k_len, d]``.
        """
        bank = self._binding.require(type(self).__name__, self.gates)
        layer_id = module.layer_idx
        bsz, heads, k_len = keys.shape[0], keys.shape[1], keys.shape[2]
        if not bank.has_layer(layer_id):
            if layer_id not in self._warned_ungated:
                self._warned_ungated.add(layer_id)
                logger.warning(
                    "layer %d has no gate (a sliding-window layer): scored uniformly. kvpress hooks these layers "
                    "for Gemma3ForCausalLM; use Gemma3ForConditionalGeneration or FastKVzipPress to leave them intact",
                    layer_id,
                )
            return torch.ones(bsz, heads, k_len, device=keys.device)
        fresh = bank.score(layer_id, hidden_states[:, -k_len:]).to(keys.device)
        n_old = k_len - fresh.shape[-1]
        if n_old > 0:
            cached = self._score_cache.get(layer_id)
            known = (
                cached[..., :n_old] if cached is not None and cached.shape[0] == bsz else fresh.new_empty(bsz, heads, 0)
            )
            if known.shape[-1] < n_old:
                logger.warning(
                    "%d cached pairs of layer %d have no gate score (their hidden states were not passed); "
                    "they get score 1.0. Use the same FastKVzipScorerPress for prefill and decoding and "
                    "hidden_states_buffer_size >= compression_interval.",
                    n_old - known.shape[-1],
                    layer_id,
                )
                unseen = fresh.new_ones(bsz, heads, n_old - known.shape[-1])
                known = torch.cat([known, unseen], dim=-1)
            fresh = torch.cat([known, fresh], dim=-1)
        self._score_cache[layer_id] = fresh
        return fresh

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform per-head top-k, as kvpress's ScorerPress, keeping the score cache aligned with the cache."""
        if self.compression_ratio == 0 or not self._is_gated(module):
            return keys, values
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
        # The kept pairs' indices in their original order: a stable sort puts them first.
        keep = keep_largest(scores, n_kept).to(torch.uint8)
        indices = keep.sort(dim=-1, descending=True, stable=True).indices[..., :n_kept]
        self._score_cache[module.layer_idx] = scores.gather(-1, indices)
        gather_index = indices.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        return keys.gather(2, gather_index).contiguous(), values.gather(2, gather_index).contiguous()
