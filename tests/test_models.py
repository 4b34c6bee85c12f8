"""Models without a network: tiny random models of every covered architecture, and clear errors for missing ones."""

import pytest

from fastkvzip_press import ModelLayout
from fastkvzip_press.models import TINY_ARCHITECTURES, load_model, tiny_model, tokenizer_folder


def test_tiny_models_cover_the_architectures(tiny_models):
    for arch in TINY_ARCHITECTURES:
        model, tokenizer = tiny_models(arch)
        layout = ModelLayout.from_model(model)
        assert (layout.num_kv_heads, layout.group_size, layout.head_dim) == (2, 2, 16)
        assert tokenizer.chat_template and model.config.name_or_path == f"tiny-random-{arch}"
    assert ModelLayout.from_model(tiny_models("gemma3")[0]).gated_layer_ids == (2, 5)  # global layers only
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny_model("gpt2")


def test_a_saved_folder_loads_and_a_missing_one_is_named(tmp_path, llama):
    model, tokenizer = llama
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    loaded, _ = load_model(str(tmp_path / "model"))
    assert loaded.config.num_hidden_layers == model.config.num_hidden_layers
    assert tokenizer_folder(str(tmp_path / "model")) == str(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="missing-model"):
        load_model(str(tmp_path / "missing-model"))
