"""Models without a network: tiny random models of every covered architecture, and clear errors for missing ones."""

import json

import pytest
from transformers import AutoTokenizer

from fastkvzip_press import ModelLayout
from fastkvzip_press.models import (
    FAST_TOKENIZER_CLASS,
    TINY_ARCHITECTURES,
    load_default_model,
    load_model,
    tiny_model,
    tokenizer_folder,
)

# " hello world\n" in SmolLM2's byte-level BPE: "Ġhello", "Ġworld", "Ċ" (no <|endoftext|>, id 0).
HELLO = " hello world\n"
HELLO_IDS = [33662, 905, 198]


def _tokenizer_class(folder) -> str:
    return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))["tokenizer_class"]


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


def test_the_conversion_names_the_fast_tokenizer(default_model_dir):
    # A GGUF Llama class makes transformers >= 5.19 drop tokenizer.json's ByteLevel pre-tokenizer and decoder.
    assert _tokenizer_class(default_model_dir) == FAST_TOKENIZER_CLASS


def test_the_default_tokenizer_round_trips_spaces_and_newlines(default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    ids = tokenizer.encode(HELLO, add_special_tokens=False)
    assert ids == HELLO_IDS and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == HELLO


def test_a_folder_converted_by_an_earlier_version_is_repaired_on_load(tmp_path, default_model_dir):
    old = tmp_path / "smollm2"
    old.mkdir()
    for path in default_model_dir.iterdir():  # links: the weights are not copied
        if path.name != "tokenizer_config.json":
            (old / path.name).symlink_to(path)
    config = json.loads((default_model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    (old / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "CodeLlamaTokenizer"}))
    _, tokenizer = load_default_model(cache_dir=old)
    repaired = json.loads((old / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert repaired == {**config, "tokenizer_class": FAST_TOKENIZER_CLASS}  # only the class changed
    assert tokenizer.encode(HELLO, add_special_tokens=False) == HELLO_IDS
    assert not list(old.glob(".*.tmp"))  # the rewrite left no temporary behind
