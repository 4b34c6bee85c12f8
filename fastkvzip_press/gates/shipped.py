"""Gates shipped inside the package, for models small enough to train on a laptop.

A shipped bank is stored in bf16 (its projections; sink keys and norm weights stay fp32) to keep the wheel small,
and loaded back in fp32 (:func:`~fastkvzip_press.gates.loading.load_gates`): on the default model's validation
shards, fp32 scores from bf16-rounded weights keep 99.9 % of the same top-half tokens per layer as the fp32 originals.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_ROOT = Path(__file__).parent / "data"

# model id (config.name_or_path) -> folder under SHIPPED_ROOT
SHIPPED_GATES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct"}


def shipped_gates_path(model_id: str) -> Path | None:
    """Folder of the shipped gates for ``model_id``, or ``None`` when the package ships none for it."""
    folder = SHIPPED_GATES.get(model_id)
    if folder is None:
        return None
    path = SHIPPED_ROOT / folder
    return path if (path / "gates.safetensors").exists() else None
