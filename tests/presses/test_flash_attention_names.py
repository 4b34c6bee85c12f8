"""Ragged compaction on a model loaded with flash attention (through a CPU stand-in of the flash_attn package)."""

import pytest
import torch
from helpers import greedy_after_prefill
from stand_ins import fake_flash_attn

from fastkvzip_press import FastKVzipPress, GateBank, ModelLayout, RaggedLayer
from fastkvzip_press.cache import attention_implementation
from fastkvzip_press.models import tiny_model


def loaded_with(model, implementation: str) -> None:
    """What loading with ``attn_implementation=implementation`` leaves in the configs (loading itself checks that
    the real package is installed)."""
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}
    configs.update({id(m.config): m.config for m in model.modules() if getattr(m, "config", None) is not None})
    for config in configs.values():
        config._attn_implementation = implementation


@pytest.mark.parametrize("name", ["llama", "gemma3"])
@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3"])
def test_ragged_compaction_runs_on_flash_attention_models(monkeypatch, name, implementation):
    """The wrapper's name must not reach transformers' lazy flash import (it took it for a hub kernel name)."""
    reference, tokenizer = tiny_model(name)
    model, _ = tiny_model(name)
    loaded_with(model, implementation)
    gates = GateBank.random(ModelLayout.from_model(model), seed=1)
    runs = {}
    with fake_flash_attn(monkeypatch) as flash_attn:
        if implementation == "flash_attention_3":
            monkeypatch.setattr("transformers.modeling_flash_attention_utils.is_flash_attn_3_available", lambda: False)
            monkeypatch.setitem(__import__("sys").modules, "flash_attn_interface", flash_attn)
        calls = []
        dense_attention = flash_attn.flash_attn_func
        monkeypatch.setattr(flash_attn, "flash_attn_func", lambda *a, **k: calls.append(1) or dense_attention(*a, **k))
        for label, candidate in (("flash", model), ("sdpa", reference)):
            press = FastKVzipPress(0.5, gates=gates, window_size=4)
            runs[label] = greedy_after_prefill(candidate, tokenizer, press)
    assert calls, "the dense layers did not run through flash attention"
    assert attention_implementation(model) == f"fastkvzip_ragged_{implementation}"
    assert runs["flash"][0] == runs["sdpa"][0]
    torch.testing.assert_close(runs["flash"][1], runs["sdpa"][1], atol=1e-4, rtol=1e-4)
    layers = runs["flash"][2].layers
    assert any(isinstance(layer, RaggedLayer) for layer in layers)
