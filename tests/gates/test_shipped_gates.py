import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastkvzip_press import GateBank, ModelLayout, load_gates
from fastkvzip_press.gates import load_shipped, read_native, write_native
from fastkvzip_press.gates.shipped import SHIPPED_GATES, shipped_gates_path
from fastkvzip_press.models import DEFAULT_MODEL_ID


@pytest.fixture(scope="module")
def smollm2_shaped():
    """A weightless model with the default model's shapes and name (no conversion needed)."""
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=64, head_dim=64,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.config.name_or_path = DEFAULT_MODEL_ID
    return model


def test_default_model_ships_trained_gates(smollm2_shaped):
    path = shipped_gates_path(DEFAULT_MODEL_ID)
    assert path is not None and SHIPPED_GATES[DEFAULT_MODEL_ID] == path.name
    assert (path / "gates.safetensors").stat().st_size < 8 * 2**20  # bf16: a few MB
    bank = load_gates(None, smollm2_shaped)  # None -> shipped gates before any hub lookup
    assert bank.layer_ids == tuple(range(30)) and (bank.num_kv_heads, bank.group_size) == (3, 3)
    assert all(p.dtype == torch.float32 for p in bank.parameters())  # stored bf16, computed fp32
    training = bank.metadata.training
    assert training["source"] == "fastkvzip-press train" and training["train_tokens"] > 100_000
    accuracy = training["val_accuracy_per_layer"]
    assert len(accuracy) == 30 and sum(accuracy) / 30 > 0.9
    meta = json.loads((path / "gates.json").read_text())
    assert meta["model_id"] == DEFAULT_MODEL_ID


def test_no_shipped_gates_for_other_models():
    assert shipped_gates_path("someone/other-model") is None and load_shipped("someone/other-model") is None


def test_bf16_storage_halves_the_file_and_keeps_scores(tmp_path, llama):
    model, _ = llama
    bank = GateBank.random(ModelLayout.from_model(model), seed=2)
    full_weights, _ = write_native(bank, tmp_path / "fp32")
    small_weights, _ = write_native(bank, tmp_path / "bf16", storage_dtype=torch.bfloat16)
    assert small_weights.stat().st_size < 0.6 * full_weights.stat().st_size
    stored = read_native(tmp_path / "bf16")
    assert stored.gates[0].q_proj.weight.dtype == torch.bfloat16 and stored.gates[0].k_base.dtype == torch.float32
    restored = stored.float()
    hidden = torch.randn(1, 50, bank.hidden_size)
    for layer_id in bank.layer_ids:
        torch.testing.assert_close(restored.score(layer_id, hidden), bank.score(layer_id, hidden), atol=2e-2, rtol=0)
