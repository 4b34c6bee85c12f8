"""The presses the ``eval`` command compares, by the names kvpress's evaluation uses where kvpress has one.

Ours (``ours=True``) evict for real with the shipped or given gates; kvpress's presses are its registry entries,
built fresh per run. kvpress's own ``FastKVzipPress`` (masked eviction, prefill only) is given our gates, so the
two implementations of the method differ only in how they evict.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from kvpress import (
    AdaKVPress,
    ExpectedAttentionPress,
    KnormPress,
    KVzipPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from kvpress import FastKVzipPress as KvpressFastKVzipPress
from kvpress.presses.base_press import BasePress
from kvpress.presses.fastkvzip_press import FastKVzipGate
from transformers import PreTrainedModel

from fastkvzip_press.gate import GateBank
from fastkvzip_press.gate_io import load_gates
from fastkvzip_press.layout import ModelLayout
from fastkvzip_press.presses import FastKVzipPress, FastKVzipScorerPress
from fastkvzip_press.presses.gate_binding import GateSource

CHUNK_SIZE = 512  # tokens per prefill chunk for the chunked entry: several chunks at 2k-4k contexts


@dataclass(frozen=True)
class PressResources:
    """What press builders may need besides the knob value.

    Attributes:
        model: the evaluated model.
        gates: gate source for the Fast KVzip presses (``None``: shipped gates for the model, else the hub).
        tokenizer_path: a local folder with the model's tokenizer, for kvpress's ``KVzipPress``, which loads the
            tokenizer from ``model.config.name_or_path`` (a hub id for the default model).
    """

    model: PreTrainedModel
    gates: GateSource = None
    tokenizer_path: str | None = None


@dataclass(frozen=True)
class PressSpec:
    """A named press for the comparison.

    Attributes:
        knob: "ratio" (``value`` is the compression ratio), "threshold" (``value`` is a gate-score threshold; the
            achieved ratio is measured) or "none" (the full cache).
    """

    name: str
    description: str
    build: Callable[[float, PressResources], BasePress | None]
    knob: Literal["ratio", "threshold", "none"] = "ratio"
    ours: bool = False


def kvpress_fastkvzip_with_gates(bank: GateBank, model: PreTrainedModel, compression_ratio: float):
    """kvpress's ``FastKVzipPress`` with ``bank``'s gates instead of the hub download it would do.

    kvpress indexes its gate list by layer id; layers without a gate in ``bank`` (Gemma3 sliding layers, which
    kvpress skips) get ``None``.
    """
    layout = ModelLayout.from_model(model)
    param = next(model.parameters())
    gates: list = [None] * layout.num_layers
    for layer_id in bank.layer_ids:
        ours = bank.gate(layer_id)
        gate = FastKVzipGate(
            layer_id, ours.hidden_size, ours.num_kv_heads, ours.group_size, param.dtype, ours.rank, ours.n_sink
        )
        gate.load_state_dict({key: value.to(param.dtype) for key, value in ours.state_dict().items()}, strict=True)
        # kvpress keeps k_base and the norms in fp32 as created; the projections follow the model dtype.
        gate.k_base.data = ours.k_base.detach().float().clone()
        gates[layer_id] = gate.to(param.device)
    press = KvpressFastKVzipPress(compression_ratio=compression_ratio)
    press.gates = gates
    return press


@dataclass
class LocalTokenizerKVzipPress(KVzipPress):
    """kvpress's ``KVzipPress`` reading the tokenizer from a local folder instead of ``name_or_path``."""

    tokenizer_path: str | None = None

    @contextmanager
    def __call__(self, model: PreTrainedModel):
        name = model.config.name_or_path
        if self.tokenizer_path:
            model.config.name_or_path = self.tokenizer_path
        try:
            with super().__call__(model):
                model.config.name_or_path = name
                yield
        finally:
            model.config.name_or_path = name


def _bank(resources: PressResources) -> GateBank:
    return load_gates(resources.gates, resources.model)


def _ours(**kwargs) -> Callable[[float, PressResources], BasePress]:
    def build(value: float, resources: PressResources) -> BasePress:
        return FastKVzipPress(value, gates=_bank(resources), **kwargs)

    return build


def _threshold(value: float, resources: PressResources) -> BasePress:
    return FastKVzipPress(threshold=value, gates=_bank(resources))


def _adakv_scorer(value: float, resources: PressResources) -> BasePress:
    return AdaKVPress(FastKVzipScorerPress(value, gates=_bank(resources)))


def _kvzip(value: float, resources: PressResources) -> BasePress:
    return LocalTokenizerKVzipPress(compression_ratio=value, tokenizer_path=resources.tokenizer_path)


PRESS_SPECS: dict[str, PressSpec] = {
    spec.name: spec
    for spec in (
        PressSpec("no_press", "full cache", lambda value, resources: None, knob="none"),
        PressSpec(
            "fastkvzip_press", "ours: FastKVzipPress, one global budget, ragged (memory freed)", _ours(), ours=True
        ),
        PressSpec(
            "fastkvzip_press_threshold",
            "ours: FastKVzipPress(threshold=...), ragged; the ratio is measured",
            _threshold,
            knob="threshold",
            ours=True,
        ),
        PressSpec(
            "fastkvzip_press_chunked",
            f"ours: FastKVzipPress(chunk_size={CHUNK_SIZE}), chunked prefill with eviction after each chunk",
            _ours(chunk_size=CHUNK_SIZE),
            ours=True,
        ),
        PressSpec(
            "adakv_fastkvzip_scorer",
            "ours inside kvpress: AdaKVPress(FastKVzipScorerPress), per-layer budget, masked",
            _adakv_scorer,
            ours=True,
        ),
        PressSpec(
            "fastkvzip",
            "kvpress's FastKVzipPress (masked, prefill only) with the same gates",
            lambda value, resources: kvpress_fastkvzip_with_gates(_bank(resources), resources.model, value),
        ),
        PressSpec("knorm", "kvpress KnormPress", lambda value, resources: KnormPress(value)),
        PressSpec("streaming_llm", "kvpress StreamingLLMPress", lambda value, resources: StreamingLLMPress(value)),
        PressSpec("snapkv", "kvpress SnapKVPress", lambda value, resources: SnapKVPress(value)),
        PressSpec(
            "expected_attention",
            "kvpress AdaKVPress(ExpectedAttentionPress(epsilon=1e-2))",
            lambda value, resources: AdaKVPress(ExpectedAttentionPress(value, epsilon=1e-2)),
        ),
        PressSpec("tova", "kvpress TOVAPress", lambda value, resources: TOVAPress(value)),
        PressSpec("kvzip", "kvpress KVzipPress (2-3x prefill cost)", _kvzip),
    )
}


def press_spec(name: str) -> PressSpec:
    """The spec called ``name``, or a ValueError listing the known names."""
    if name not in PRESS_SPECS:
        raise ValueError(f"unknown press {name!r}; choose from {', '.join(PRESS_SPECS)}")
    return PRESS_SPECS[name]
