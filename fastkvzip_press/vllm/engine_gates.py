"""The gates an engine serves with: loaded and matched to the served model once when the engine is configured (so
bad gates stop it before any engine process starts), and again in the worker."""

from __future__ import annotations

from pathlib import Path

from fastkvzip_press.gates import GateBank, load_gates, load_shipped
from fastkvzip_press.gates.gate import GateMismatchError
from fastkvzip_press.layout import ModelLayout
from fastkvzip_press.vllm.settings import SECTION, EngineSettings


class EngineGatesError(ValueError):
    """The engine's gates are missing, unreadable, or do not fit the served model; the message says what to set."""


def served_model_id(model: str) -> str:
    """The id gates are matched with: the package's default model id for its converted folder, else the model name
    or path as vLLM got it."""
    from fastkvzip_press.models import DEFAULT_MODEL_ID, default_model_dir

    try:
        if Path(model).resolve() == default_model_dir().resolve():
            return DEFAULT_MODEL_ID
    except OSError:
        pass
    return model


def engine_gates(settings: EngineSettings, hf_config, model: str) -> GateBank:
    """The gates of ``settings`` for the model of ``hf_config`` (served as ``model``), checked to fit it and to gate
    every attention layer; raises :class:`EngineGatesError` naming the setting to change."""
    layout = ModelLayout.from_config(hf_config)
    model_id = served_model_id(model)
    layout = ModelLayout(**{**layout.__dict__, "model_id": model_id})
    try:
        bank = load_shipped(model_id) if settings.gates is None else load_gates(settings.gates)
    except (OSError, ValueError) as error:
        raise EngineGatesError(f"{SECTION}.gates {settings.gates!r}: {error}") from None
    if bank is None:
        raise EngineGatesError(
            f"no gates are shipped for {model_id!r}: give a gate file or folder as "
            f'--additional-config \'{{"{SECTION}": {{"gates": "PATH"}}}}\' (train some with `fastkvzip-press train`)'
        )
    try:
        bank.check_fits(layout)
        bank.check_model(layout, settings.allow_other_model)
    except GateMismatchError as error:
        advice = str(error).replace(
            "pass --allow-other-model on the command line (allow_other_model=True to load_gates in Python)",
            f'set "allow_other_model": true in the {SECTION} section',
        )
        raise EngineGatesError(f"{SECTION}.gates: {advice}") from None
    if tuple(bank.layer_ids) != tuple(range(layout.num_layers)):
        raise EngineGatesError(
            f"Fast KVzip in vLLM gates every attention layer; these gates cover layers {bank.layer_ids} of "
            f"{layout.num_layers}. Models with ungated (sliding-window) layers are not supported in vLLM."
        )
    return bank.as_loaded()
