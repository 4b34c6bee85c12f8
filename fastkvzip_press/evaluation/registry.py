"""The one registry of compared presses, by the names kvpress's evaluation uses where kvpress has one.

``fastkvzip-press eval`` builds its presses here, ``fastkvzip-press kvpress-eval`` adds the entries marked ``ours``
to kvpress's ``PRESS_REGISTRY``, and the command line lists the names from here; each name is one configuration.
Ours evict for real with the shipped or given gates; kvpress's presses are its own registry entries, built fresh per
run; kvpress's own ``FastKVzipPress`` (masked eviction, prefill only) is given our gates, so the two implementations
of the method differ only in how they evict.

Builders import kvpress and the presses when called, so reading the registry (reports, help) loads neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from fastkvzip_press.gates import GateSource

CHUNK_SIZE = 512  # tokens per prefill chunk for the chunked entry: several chunks at 2k-4k contexts

Knob = Literal["ratio", "threshold", "target_size", "none"]


@dataclass(frozen=True)
class PressResources:
    """What press builders may need besides the knob value.

    Attributes:
        model: the evaluated model (``None`` when registering with kvpress's harness, which loads it later).
        gates: gate source for the Fast KVzip presses (``None``: shipped gates for the model, else the hub).
        tokenizer_path: a local folder with the model's tokenizer, for kvpress's ``KVzipPress``, which loads the
            tokenizer from ``model.config.name_or_path`` (a hub id for the default model).
        allow_other_model: accept gates recorded for another model of the same shapes (see ``load_gates``).
    """

    model: PreTrainedModel | None = None
    gates: GateSource = None
    tokenizer_path: str | None = None
    allow_other_model: bool = False

    def gate_bank(self):
        """The gates checked against the model (a source when there is no model yet)."""
        from fastkvzip_press.gates import load_gates

        if self.model is None:
            return self.gates
        return load_gates(self.gates, self.model, allow_other_model=self.allow_other_model)


@dataclass(frozen=True)
class PressSpec:
    """A named press configuration.

    Attributes:
        knob: what ``value`` sets: "ratio" (compression ratio), "threshold" (a gate-score threshold; the achieved
            ratio is measured), "target_size" (pairs per head kept while decoding; kvpress's ``--target_size``) or
            "none" (the full cache).
        default: the knob value the press is registered with in kvpress's harness, which then sets its own.
        ours: a press of this package (bold in reports, registered with kvpress's harness).
        uses_gates: the press scores with Fast KVzip gates, so its results depend on which (a run records their
            digest).
    """

    name: str
    description: str
    build: Callable[[float, PressResources], Any]
    knob: Knob = "ratio"
    ours: bool = False
    default: float = 0.0
    uses_gates: bool = False


def _gates(resources: PressResources):
    """The bank itself when the model is known (checked against it, and named in the run's config), else the
    source, loaded by the press when kvpress's harness enters it."""
    return resources.gate_bank()


def _fastkvzip(**fields) -> Callable[[float, PressResources], Any]:
    def build(value: float, resources: PressResources):
        from fastkvzip_press.presses import FastKVzipPress

        return FastKVzipPress(value, gates=_gates(resources), **fields)

    return build


def _fastkvzip_threshold(value: float, resources: PressResources):
    from fastkvzip_press.presses import FastKVzipPress

    return FastKVzipPress(threshold=value, gates=_gates(resources))


def _adakv_scorer(value: float, resources: PressResources):
    from kvpress import AdaKVPress

    from fastkvzip_press.presses import FastKVzipScorerPress

    return AdaKVPress(FastKVzipScorerPress(value, gates=_gates(resources)))


def _decoding(value: float, resources: PressResources):
    from fastkvzip_press.presses import FastKVzipDecodingPress

    return FastKVzipDecodingPress(gates=_gates(resources), target_size=int(value))


def _kvpress_fastkvzip(value: float, resources: PressResources):
    from fastkvzip_press.evaluation.kvpress_presses import kvpress_fastkvzip_with_gates

    return kvpress_fastkvzip_with_gates(resources.gate_bank(), resources.model, value)


def _kvzip(value: float, resources: PressResources):
    from fastkvzip_press.evaluation.kvpress_presses import LocalTokenizerKVzipPress

    return LocalTokenizerKVzipPress(compression_ratio=value, tokenizer_path=resources.tokenizer_path)


def _kvpress(class_name: str, **fields) -> Callable[[float, PressResources], Any]:
    def build(value: float, resources: PressResources):
        import kvpress

        return getattr(kvpress, class_name)(value, **fields)

    return build


def _expected_attention(value: float, resources: PressResources):
    from kvpress import AdaKVPress, ExpectedAttentionPress

    return AdaKVPress(ExpectedAttentionPress(value, epsilon=1e-2))


PRESS_SPECS: dict[str, PressSpec] = {
    spec.name: spec
    for spec in (
        PressSpec("no_press", "full cache", lambda value, resources: None, knob="none"),
        PressSpec(
            "fastkvzip_press",
            "ours: FastKVzipPress, one global budget, ragged (memory freed)",
            _fastkvzip(),
            ours=True,
            uses_gates=True,
        ),
        PressSpec(
            "fastkvzip_press_threshold",
            "ours: FastKVzipPress(threshold=...), ragged; the ratio is measured",
            _fastkvzip_threshold,
            knob="threshold",
            ours=True,
            uses_gates=True,
        ),
        PressSpec(
            "fastkvzip_press_chunked",
            f"ours: FastKVzipPress(chunk_size={CHUNK_SIZE}), chunked prefill with eviction after each chunk",
            _fastkvzip(chunk_size=CHUNK_SIZE),
            ours=True,
            uses_gates=True,
        ),
        PressSpec(
            "fastkvzip_press_uniform",
            "ours: FastKVzipPress(uniform=True), the same count in every layer and KV head (vLLM's budget), ragged",
            _fastkvzip(uniform=True),
            ours=True,
            uses_gates=True,
        ),
        PressSpec(
            "adakv_fastkvzip_scorer",
            "ours inside kvpress: AdaKVPress(FastKVzipScorerPress), per-layer budget, masked",
            _adakv_scorer,
            ours=True,
            uses_gates=True,
        ),
        PressSpec(
            "decoding_fastkvzip_press",
            "ours: FastKVzipDecodingPress, eviction while generating (kvpress-eval, --target_size)",
            _decoding,
            knob="target_size",
            ours=True,
            uses_gates=True,
            default=2048,
        ),
        PressSpec(
            "fastkvzip",
            "kvpress's FastKVzipPress (masked, prefill only) with the same gates",
            _kvpress_fastkvzip,
            uses_gates=True,
        ),
        PressSpec("knorm", "kvpress KnormPress", _kvpress("KnormPress")),
        PressSpec("streaming_llm", "kvpress StreamingLLMPress", _kvpress("StreamingLLMPress")),
        PressSpec("snapkv", "kvpress SnapKVPress", _kvpress("SnapKVPress")),
        PressSpec(
            "expected_attention", "kvpress AdaKVPress(ExpectedAttentionPress(epsilon=1e-2))", _expected_attention
        ),
        PressSpec("tova", "kvpress TOVAPress", _kvpress("TOVAPress")),
        PressSpec("kvzip", "kvpress KVzipPress (2-3x prefill cost)", _kvzip),
    )
}


def press_spec(name: str) -> PressSpec:
    """The spec called ``name``, or a ValueError listing the known names."""
    if name not in PRESS_SPECS:
        raise ValueError(f"unknown press {name!r}; choose from {', '.join(PRESS_SPECS)}")
    return PRESS_SPECS[name]


def our_entries(gates: GateSource = None) -> dict[str, Any]:
    """Our presses as entries for kvpress's ``PRESS_REGISTRY`` (instances with their default knob; kvpress's
    ``evaluate.py`` then sets the ratio, threshold or decoding budget). ``gates=None`` uses the shipped gates for the
    model, else the released ones from the hub."""
    resources = PressResources(gates=gates)
    return {name: spec.build(spec.default, resources) for name, spec in PRESS_SPECS.items() if spec.ours}


def press_names_help() -> str:
    """One line per press for the command line's help."""
    return "\n".join(f"  {name:26s} {spec.description}" for name, spec in PRESS_SPECS.items())
