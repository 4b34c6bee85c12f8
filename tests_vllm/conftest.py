"""Fixtures of the vLLM integration's tests (run in .venv-vllm: `make test-vllm`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_helpers import build_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[Path, Path, object, object]]:
    """arch -> (model folder, gate folder, transformers model, gate bank)."""
    from fastkvzip_press.gates import GateBank, save_gates
    from fastkvzip_press.layout import ModelLayout

    built = {}
    for arch in ("llama", "qwen3"):
        root = tmp_path_factory.mktemp(arch)
        model = build_tiny_model(arch, root / "model")
        bank = GateBank.random(ModelLayout.from_config(model.config), seed=3)
        save_gates(bank, root / "gates")
        built[arch] = (root / "model", root / "gates", model, bank)
    return built
