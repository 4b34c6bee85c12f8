"""Gates shipped inside the package, for models small enough to train on a laptop.

A shipped bank is stored in bf16 (its projections; sink keys and norm weights stay fp32) to keep the wheel small,
and loaded back in fp32: on the default model's validation shards, fp32 scores from bf16-rounded weights keep
99.9 % of the same top-half tokens per layer as the fp32 originals.
"""

from __future__ import annotations

from pathlib import Path

from fastkvzip_press.gate import GateBank

BUNDLED_ROOT = Path(__file__).parent / "data" / "gates"

# model id (config.name_or_path) -> folder under BUNDLED_ROOT
BUNDLED_GATES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct"}


def bundled_gates_path(model_id: str) -> Path | None:
    """Folder of the shipped gates for ``model_id``, or ``None`` when the package ships none for it."""
    folder = BUNDLED_GATES.get(model_id)
    if folder is None:
        return None
    path = BUNDLED_ROOT / folder
    return path if (path / "gates.safetensors").exists() else None


def load_bundled(model_id: str) -> GateBank | None:
    """The shipped gates for ``model_id`` in fp32, or ``None``."""
    from fastkvzip_press.gate_io import read_native

    path = bundled_gates_path(model_id)
    return None if path is None else read_native(path).float()
